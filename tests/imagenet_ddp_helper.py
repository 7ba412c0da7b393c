"""Test helper, run under torchrun: the real ImageNet recipe, then every rank's weights compared.

    torchrun --standalone --nproc_per_node 2 tests/imagenet_ddp_helper.py OUT.json [ImageNet/main.py flags]

It runs ``ImageNet/main.py``'s ``main`` unchanged, except that ``run_recipe`` is
wrapped: once training has finished, each rank hashes every tensor of its model's
state_dict, the digests are gathered with ``all_gather_object``, and rank 0
writes them to OUT.json as ``{"world_size": N, "ddp": bool, "ranks": [{name: sha256}, ...]}``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from imagenet_fixtures import recipe_main  # this script's folder (tests/) is on sys.path
from xnornet.cli import run_cli, setup_logging


def state_digest(model: torch.nn.Module) -> Dict[str, str]:
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, tensor in model.state_dict().items()}


def main() -> None:
    out_path, recipe_argv = Path(sys.argv[1]), sys.argv[2:]
    recipe = recipe_main()
    real_run_recipe = recipe.run_recipe

    def run_and_compare(args: Any, **kwargs: Any) -> Dict[str, Any]:
        result = real_run_recipe(args, **kwargs)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, state_digest(kwargs["model"]))
        if dist.get_rank() == 0:
            out_path.write_text(json.dumps({
                "world_size": dist.get_world_size(),
                "ddp": isinstance(kwargs.get("train_model"), DistributedDataParallel),
                "ranks": gathered,
            }))
        return result

    recipe.run_recipe = run_and_compare
    setup_logging()
    run_cli(recipe.main, recipe.get_args_parser().parse_args(recipe_argv))


if __name__ == "__main__":
    main()
