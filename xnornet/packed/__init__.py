"""Bit-packed XNOR-popcount inference on the CPU (notes, section 8, eq. 13-14).

- :func:`pack_model`: a copy of a model with every BinConv2d replaced by a packed module.
- :func:`save_packed` / :func:`load_packed`: the ``.xnor`` file (safetensors, no pickle).
- ``python -m xnornet.export``: checkpoint -> ``.xnor``, with a per-layer size summary.
- ``python -m xnornet.packed.verify_mnist``: packed vs simulated on the MNIST test set.
- ``python -m xnornet.packed.benchmark``: packed vs float timings.

See ``xnornet/packed/README.md``.
"""

from .engine import BlockConfig, PackedBinConv2d, pack_for_evaluation, pack_model
from .fileformat import load_packed, save_packed

__all__ = ["BlockConfig", "PackedBinConv2d", "load_packed", "pack_for_evaluation", "pack_model", "save_packed"]
