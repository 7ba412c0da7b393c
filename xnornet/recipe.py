"""What the three recipes' main.py share: common flags and the train/evaluate/resume driver.

A recipe parses its flags (:func:`add_arch_arg`, :func:`add_data_args`, :func:`add_common_args`
plus its own, which are only what is truly its own), calls :func:`restore_run_args` and
:func:`check_run_inputs` (every input that can be checked before slow work), loads its data,
builds its model and calls :func:`run_recipe`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .binop import LEGACY_GRAD_SCALE, BinOp
from .checkpoint import arch_mismatch, load_file, load_model_state, model_state_from, recipe_of_arch, unwrap
from .cli import (
    UserError,
    check_file,
    check_writable_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
    unit_interval,
)
from .distill import DistillationLoss
from .distributed import DistInfo
from .engine import (
    Batch,
    CheckpointClock,
    RunState,
    check_output_dir,
    cosine_lr_at_epoch,
    evaluate,
    fit,
    load_pretrained,
    lr_at_epoch,
    resume_run,
)

#: --amp values: the autocast dtype. On the CPU only bfloat16 has fast kernels.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

LOG = logging.getLogger("xnornet")


def grad_scale_arg(text: str) -> Any:
    """argparse type for --grad-scale: '2017' or a positive number."""
    if text == LEGACY_GRAD_SCALE:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected '2017' or a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be '2017' or a finite number > 0, got {text}")
    return value


def add_arch_arg(parser: argparse.ArgumentParser, architectures: Collection[str], default: str, help: str) -> None:
    """``--arch`` / ``-a``: which network of the recipe (``help`` describes the recipe's variants)."""
    parser.add_argument("--arch", "-a", default=default, choices=sorted(architectures),
                        help=f"{help} (default: {default})")


def add_data_args(
    parser: argparse.ArgumentParser,
    *,
    data_help: str,
    test_batch_size: Optional[int],
    download_help: Optional[str] = None,
    tensor_data: bool = False,
) -> argparse._ArgumentGroup:
    """The "data" group every recipe has: ``--data``, ``--test-batch-size``, and where the
    recipe has them ``--download`` and, for data held as tensors (MNIST, CIFAR-10),
    ``--train-subset``, ``--test-subset`` and ``--holdout``. Returns the group, for the
    recipe's own data flags.

    ``test_batch_size`` None: the test batch is the training batch (``--batch-size``).
    """
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, default=Path("./data"), metavar="DIR",
                       help=f"{data_help} (default: ./data)")
    if download_help is not None:
        group.add_argument("--download", action="store_true", help=download_help)
    default_text = "the training batch size" if test_batch_size is None else str(test_batch_size)
    group.add_argument("--test-batch-size", type=positive_int, default=test_batch_size, metavar="N",
                       help=f"batch size for testing (default: {default_text})")
    if tensor_data:
        group.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                           help="train on the first N training images only (default: all)")
        group.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                           help="test on the first N test images only (default: all)")
        group.add_argument("--holdout", type=non_negative_int, default=0, metavar="N",
                           help="hold the last N training images (of --train-subset) out of training and report "
                                "their accuracy after every epoch (holdout_acc in the log), for choosing a recipe "
                                "without the test set (default: 0)")
    return group


def subset_size(count: Optional[int], total: int, flag: str, what: str) -> int:
    """How many of ``total`` images ``--train-subset`` / ``--test-subset`` (``flag``) keep."""
    if count is None:
        return total
    if count > total:
        raise UserError(f"{flag} {count} exceeds the {total} {what} images of the data set")
    return count


def add_common_args(
    parser: argparse.ArgumentParser, *, epochs: int, lr: float, weight_decay: float, batch_size: int
) -> None:
    """Flags every recipe has, with the recipe's 2017 defaults."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=epochs, metavar="N",
                       help="the epoch to train up to: the run's total, counting the epochs a --resume "
                            f"checkpoint already trained (default: {epochs})")
    group.add_argument("--batch-size", "-b", type=positive_int, default=batch_size, metavar="N",
                       help=f"training batch size, at least 2 per process for BatchNorm (default: {batch_size})")
    group.add_argument("--lr", "--learning-rate", type=positive_float, default=lr, metavar="LR",
                       help=f"initial Adam learning rate, > 0 (default: {lr})")
    group.add_argument("--weight-decay", "--wd", type=non_negative_float, default=weight_decay, metavar="W",
                       help=f"Adam weight decay, >= 0 (default: {weight_decay})")
    group.add_argument("--grad-scale", type=grad_scale_arg, default=LEGACY_GRAD_SCALE, metavar="S",
                       help="factor on the corrected weight gradient: '2017' = n*(1-1/C_in) per layer "
                            "(default), 1 = the pure formula (notes, eq. 9)")
    group.add_argument("--lr-schedule", choices=("step", "cosine"), default="step",
                       help="step = the recipe's 2017 steps (lr x0.1 at its milestones); cosine = cosine decay "
                            "over --epochs, one value per epoch (default: step)")
    group.add_argument("--precise-bn", type=non_negative_int, default=0, metavar="N",
                       help="after each epoch, recompute every BatchNorm's running mean and variance as the plain "
                            "average over N training batches (the weights unchanged) before testing; 0 = keep "
                            "the running averages of training, as 2017 (default: 0)")
    group.add_argument("--seed", type=seed_int, default=1, metavar="S",
                       help=f"random seed, 0 to {2**32 - 1} (default: 1)")
    group.add_argument("--log-interval", "--print-freq", "-p", type=positive_int, default=100, metavar="N",
                       help="batches between progress lines, which also come at least every 30 s (default: 100)")
    group = parser.add_argument_group("device")
    group.add_argument("--cpu", "--no-cuda", dest="cpu", action="store_true",
                       help="run on the CPU even if CUDA is available")
    group = parser.add_argument_group("precision and memory layout")
    group.add_argument("--amp", nargs="?", const="bf16", default=None, choices=sorted(AMP_DTYPES),
                       help="autocast the convolutions and linear layers: bf16 (what a bare --amp means; on the "
                            "CPU through oneDNN's bfloat16 kernels) or fp16 (CUDA only, no loss scaling). "
                            "Weights, BinOp's real weights, gradients and the optimizer stay float32 "
                            "(default: off, float32)")
    group.add_argument("--no-amp", dest="amp", action="store_const", const=None,
                       help="float32 throughout, also where a --recipe preset turns --amp on")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format for the model and images (default: on with CUDA or "
                            "--amp, off otherwise)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                       help="where last.pth, best.pth and log.jsonl go (default: runs/<arch>-<time> "
                            "beside main.py; with --resume, the checkpoint's folder)")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue training from a last.pth/best.pth where it stopped (at the step "
                            "reached, for a last.pth written inside an epoch)")
    group.add_argument("--checkpoint-minutes", type=non_negative_float, default=10.0, metavar="M",
                       help="also write last.pth inside an epoch every M minutes, so that an interrupted run "
                            "loses at most M minutes; 0 = only at the end of each epoch (default: 10)")
    group.add_argument("--checkpoint-steps", type=non_negative_int, default=0, metavar="N",
                       help="also write last.pth inside an epoch every N training steps; 0 = off (default: 0)")
    group.add_argument("--distill-from", default=None, metavar="PATH",
                       help="train with knowledge distillation from the network of this checkpoint (for example "
                            "the float NIN, with its arch recorded in the file) run on every training batch")
    group.add_argument("--distill-weight", type=unit_interval, default=0.5, metavar="W",
                       help="loss = (1 - W) cross-entropy + W T^2 KL(teacher || student) (default: 0.5)")
    group.add_argument("--distill-temperature", type=positive_float, default=1.0, metavar="T",
                       help="softmax temperature of the distillation term (default: 1)")
    group.add_argument("--init-from", default=None, metavar="PATH",
                       help="start training from the weights of a checkpoint of any variant of the same "
                            "network (for example the float NIN for the XNOR NIN); the optimizer starts fresh")
    group.add_argument("--pretrained", default=None, metavar="PATH",
                       help="start from (or, with --evaluate, test) the weights of a checkpoint; "
                            "2017-format files are accepted")
    group.add_argument("--evaluate", "-e", action="store_true",
                       help="only evaluate the --pretrained (or --resume) model on the test set")
    group.add_argument("--packed", action="store_true",
                       help="with --evaluate: run the binarized layers through the bit-packed XNOR-popcount "
                            "engine on the CPU (xnornet.packed) instead of the float simulation")


#: Flags that a resumed run may change: where things are, how much to log, when to stop, and
#: the base learning rate (a hand-made change of schedule, as the 2017 users made by resuming).
#: (Checkpoints written before --cpu was shared record MNIST's and ImageNet's "no_cuda",
#: which no parser has now: such keys are never restored.)
CHANGEABLE_ON_RESUME = frozenset({
    "epochs", "lr", "data", "data_format", "download", "cache_dir", "workers", "output_dir", "log_interval",
    "checkpoint_minutes", "checkpoint_steps", "test_batch_size", "cpu", "evaluate", "packed",
    "start_epoch",
})
#: Flags never taken from the checkpoint: they name this invocation, not the run.
NOT_RESTORED = frozenset({"resume", "pretrained", "init_from", "evaluate", "packed", "output_dir", "data",
                          "download", "data_layout", "start_epoch"})


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def restore_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--resume``: the run's own arguments, from its checkpoint.

    Every flag not given on this command line takes the value the run was started with
    (so a resumed run continues the same recipe); a flag given again must agree, unless it
    is one of :data:`CHANGEABLE_ON_RESUME` (``--epochs`` to extend a run, ``--data`` for a
    moved dataset, ...). Call it first in ``main``, before any data is loaded: it also
    refuses, at once, a checkpoint of another recipe's network and a run left with no epoch
    to train.
    """
    if not getattr(args, "resume", None):
        return args
    check_flag_combinations(args)  # before the checks below, which assume a sensible combination
    checkpoint = load_file(args.resume, "--resume checkpoint")
    check_same_recipe(checkpoint, args.arch, f"--resume checkpoint {args.resume!r}")
    saved = checkpoint.get("args")
    if not isinstance(saved, dict):
        return args  # a checkpoint without recorded arguments: the command line is all there is
    given = getattr(args, "given", frozenset(vars(args)))
    current = vars(args)
    conflicts = []
    for key, value in saved.items():
        if key not in current or key in NOT_RESTORED:
            continue
        if key in given:
            if key not in CHANGEABLE_ON_RESUME and _comparable(current[key]) != _comparable(value):
                conflicts.append(f"--{key.replace('_', '-')} {_comparable(current[key])} (the run has {value})")
        else:
            restored = Path(value) if isinstance(current[key], Path) and value is not None else value
            setattr(args, key, restored)
    if conflicts:
        raise UserError(f"--resume {args.resume}: flags differ from the run's own: {'; '.join(conflicts)}; "
                        "leave them out to continue the run as it was started")
    if not getattr(args, "evaluate", False) and isinstance(checkpoint.get("epoch"), int):
        # Here, not only once the data is loaded: the checkpoint is at hand.
        start_epoch = getattr(args, "start_epoch", None)
        check_epochs_left(start_epoch or checkpoint["epoch"] + 1, args.epochs, from_start_epoch=bool(start_epoch))
    return args


def precision(args: argparse.Namespace, device: torch.device) -> tuple:
    """``(amp_dtype or None, memory_format)`` from ``--amp`` and ``--channels-last``."""
    amp_dtype = AMP_DTYPES[args.amp] if getattr(args, "amp", None) else None
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA: on the CPU use --amp bf16")
    channels_last = getattr(args, "channels_last", None)
    if channels_last is None:
        channels_last = device.type == "cuda" or amp_dtype is not None
    return amp_dtype, (torch.channels_last if channels_last else torch.contiguous_format)


def distillation_loss(
    args: argparse.Namespace, model: nn.Module, build_model: Optional[Callable[[str], nn.Module]]
) -> DistillationLoss:
    """The --distill-from teacher, loaded and attached to ``model``."""
    if build_model is None:
        raise UserError("this recipe does not support --distill-from")
    source = load_file(args.distill_from, "--distill-from checkpoint")
    teacher_arch = source.get("arch")
    if not isinstance(teacher_arch, str):
        raise UserError(f"--distill-from checkpoint {args.distill_from!r} does not record its arch")
    try:
        teacher = build_model(teacher_arch)
    except KeyError:
        raise UserError(f"--distill-from checkpoint {args.distill_from!r} is a {teacher_arch}, "
                        "which this recipe does not build") from None
    load_model_state(teacher, model_state_from(source), f"--distill-from checkpoint {args.distill_from!r}")
    device = next(unwrap(model).parameters()).device
    _, memory_format = precision(args, device)
    teacher = teacher.to(device, memory_format=memory_format)
    loss = DistillationLoss(teacher, weight=args.distill_weight, temperature=args.distill_temperature)
    loss.attach(unwrap(model))
    LOG.info("distilling from %s (%s), weight %g, temperature %g", args.distill_from, teacher_arch,
             args.distill_weight, args.distill_temperature)
    return loss


def check_epochs_left(next_epoch: int, epochs: int, *, from_start_epoch: bool) -> None:
    """Refuse a training run with nothing to train: its first epoch (``--start-epoch`` or the
    one after a checkpoint's) is past ``--epochs``."""
    if next_epoch <= epochs:
        return
    if from_start_epoch:
        raise UserError(f"--start-epoch {next_epoch} is past --epochs {epochs}: nothing to train")
    raise UserError(f"the checkpoint already finished epoch {next_epoch - 1} of --epochs {epochs}; "
                    "raise --epochs to train further")


def check_same_recipe(checkpoint: Dict[str, Any], arch: str, source: str) -> None:
    """Refuse a checkpoint whose recorded arch another recipe trains (a MNIST file given to
    the CIFAR-10 recipe, ...), naming the recipe it belongs to. Files without an arch pass."""
    found = checkpoint.get("arch")
    if isinstance(found, str) and recipe_of_arch(found) != recipe_of_arch(arch):
        raise UserError(arch_mismatch(source, found, arch))


def resolve_output_dir(args: argparse.Namespace, recipe_dir: Path) -> Path:
    """``--output-dir``, else the ``--resume`` checkpoint's folder, else ``runs/<arch>-<time>``
    beside the recipe's main.py."""
    if args.output_dir is not None:
        return Path(args.output_dir)
    if args.resume:
        return Path(args.resume).resolve().parent
    return recipe_dir / "runs" / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Flags that exclude or need one another (cheap: reads no file)."""
    if args.resume and args.pretrained:
        raise UserError("--resume and --pretrained exclude each other: --resume already restores the weights")
    if getattr(args, "init_from", None) and (args.resume or args.pretrained or args.evaluate):
        raise UserError("--init-from starts a new training run: it excludes --resume, --pretrained and --evaluate")
    if args.evaluate and not (args.pretrained or args.resume):
        raise UserError("--evaluate needs the model to test: pass --pretrained PATH (or --resume PATH)")
    if getattr(args, "packed", False) and not args.evaluate:
        raise UserError("--packed needs --evaluate: the packed engine is inference-only")
    if getattr(args, "distill_from", None) and args.evaluate:
        raise UserError("--distill-from is for training: it has no effect with --evaluate")


def check_run_inputs(
    args: argparse.Namespace,
    recipe_dir: Path,
    *,
    architectures: Collection[str],
    batch_per_process: Optional[int] = None,
) -> None:
    """Check every input that can be checked before slow work (loading data, preprocessing,
    building models); call it at the start of ``main``, after :func:`restore_run_args`.

    Flag combinations; ``--arch`` (possibly restored from a checkpoint) is one of
    ``architectures``; every checkpoint flag names a readable checkpoint of this recipe (of
    ``--arch`` for ``--pretrained``); a training run needs at least 2 samples per process
    (``batch_per_process``, default ``--batch-size``: BatchNorm), a first epoch within
    ``--epochs`` and an output folder that is writable and holds no earlier run's results.
    The output folder is resolved once here (``args.output_dir``), so that the folder
    checked is the one written.
    """
    check_flag_combinations(args)
    if args.arch not in architectures:
        raise UserError(f"--arch {args.arch} (from the --resume checkpoint) is not an arch of this recipe: "
                        f"one of {', '.join(sorted(architectures))}")
    for flag in ("pretrained", "init_from", "distill_from"):
        path = getattr(args, flag, None)
        if not path:
            continue
        what = f"--{flag.replace('_', '-')} checkpoint"
        checkpoint = load_file(path, what)
        check_same_recipe(checkpoint, args.arch, f"{what} {path!r}")
        if flag == "pretrained" and checkpoint.get("arch") not in (None, args.arch):
            raise UserError(arch_mismatch(f"{what} {path!r}", str(checkpoint["arch"]), args.arch))
    if args.resume:
        check_file(args.resume, "--resume checkpoint")  # read already by restore_run_args
    if args.evaluate:
        return
    start_epoch = getattr(args, "start_epoch", None)
    if start_epoch and not args.resume:
        check_epochs_left(start_epoch, args.epochs, from_start_epoch=True)
    per_process = args.batch_size if batch_per_process is None else batch_per_process
    if per_process < 2:
        share = "" if per_process == args.batch_size else f", split over the processes, gives {per_process} per process"
        raise UserError(f"--batch-size {args.batch_size}{share}: training needs at least 2 samples per batch "
                        "and process (BatchNorm normalizes over the batch)")
    output_dir = resolve_output_dir(args, recipe_dir)
    check_writable_dir(output_dir, "--output-dir")
    check_output_dir(output_dir, resuming=bool(args.resume))
    args.output_dir = output_dir


def run_recipe(
    args: argparse.Namespace,
    *,
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    num_train_batches: int,
    test_batches: Callable[[], Iterable[Batch]],
    milestones: Sequence[int],
    dist_info: DistInfo,
    recipe_dir: Path,
    topk: Sequence[int] = (1,),
    amp_dtype: Optional[torch.dtype] = None,
    train_model: Optional[nn.Module] = None,
    start_epoch: Optional[int] = None,
    lr_for_epoch: Optional[Callable[[int], float]] = None,
    holdout_batches: Optional[Callable[[], Iterable[Batch]]] = None,
    build_model: Optional[Callable[[str], nn.Module]] = None,
) -> Dict[str, Any]:
    """Evaluate (``--evaluate``) or train with checkpoints, resume and JSON logs.

    ``model`` is the bare network; ``train_model`` an optional wrapper of it
    (DistributedDataParallel) used for the training forward pass.
    ``start_epoch`` (1-based) overrides the epoch to train first, e.g. after ``--resume``.
    ``lr_for_epoch`` replaces the step schedule (lr / 10 at each of ``milestones``);
    ``--lr-schedule cosine`` replaces both.
    ``holdout_batches`` (held-out training images) are evaluated after every epoch.
    ``build_model(arch)`` builds the teacher of ``--distill-from`` (on the model's device).
    Returns the final metrics (evaluation results, or the last epoch's state).
    """
    check_flag_combinations(args)
    train_model = train_model if train_model is not None else model
    bin_op = BinOp(train_model, grad_scale=args.grad_scale, grad_multiplier=getattr(args, "grad_multiplier", 1.0))
    criterion: nn.Module = nn.CrossEntropyLoss()
    if getattr(args, "distill_from", None) and not args.evaluate:
        criterion = distillation_loss(args, model, build_model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    state = RunState()
    if args.resume:
        state = resume_run(args.resume, model, optimizer, args.arch)
        if not args.evaluate:
            within = f", step {state.partial.step}" if state.partial is not None else ""
            LOG.info("resuming %s at epoch %d%s (best %.2f%%)", args.resume, state.start_epoch, within, state.best_acc)
    elif args.pretrained:
        claimed = load_pretrained(args.pretrained, model, args.arch)
        LOG.info("loaded %s%s", args.pretrained, "" if claimed is None else f" (it claims {claimed:.2f}%)")
    elif getattr(args, "init_from", None):
        source = load_file(args.init_from, "--init-from checkpoint")
        load_model_state(unwrap(model), model_state_from(source), f"--init-from checkpoint {args.init_from!r}")
        LOG.info("initialized from %s (trained as %s)", args.init_from, source.get("arch", "an unnamed arch"))
    if start_epoch is not None:
        state.start_epoch = start_epoch
        LOG.info("starting at epoch %d (--start-epoch)", start_epoch)

    if args.evaluate:
        if getattr(args, "packed", False):
            from .packed import pack_for_evaluation  # numba is imported only when asked for

            model = pack_for_evaluation(model, dist_info.device)
        result = evaluate(model, BinOp(model), test_batches(), criterion,
                          device=dist_info.device, topk=topk, amp_dtype=amp_dtype, desc="test")
        if dist_info.is_main:
            accs = ", ".join(f"{k} {v:.2f}%" for k, v in result.items() if k.startswith("test_acc"))
            print(f"Test set: {result['test_correct']}/{result['test_count']} correct, {accs}, "
                  f"loss {result['test_loss']:.4f}")
            print(json.dumps(result))
        return result

    check_epochs_left(state.start_epoch, args.epochs, from_start_epoch=start_epoch is not None)
    if num_train_batches < 1:
        raise UserError("the training set gives no batch to train on: it is empty, or holds a single image "
                        "(which is left out: BatchNorm cannot train on one)")
    if getattr(args, "lr_schedule", "step") == "cosine":
        def schedule(epoch: int) -> float:
            return cosine_lr_at_epoch(args.lr, epoch, args.epochs)
    elif lr_for_epoch is not None:
        schedule = lr_for_epoch
    else:
        def schedule(epoch: int) -> float:
            return lr_at_epoch(args.lr, epoch, milestones)
    output_dir = resolve_output_dir(args, recipe_dir)
    check_output_dir(output_dir, resuming=bool(args.resume))
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        LOG.info("writing checkpoints and log.jsonl to %s", output_dir)
    state = fit(
        model=train_model, bin_op=bin_op, optimizer=optimizer, criterion=criterion,
        train_batches=train_batches, num_train_batches=num_train_batches, test_batches=test_batches,
        epochs=args.epochs,
        lr_for_epoch=schedule,
        state=state, output_dir=output_dir, arch=args.arch, args=vars(args), dist_info=dist_info,
        log_interval=args.log_interval, topk=topk, amp_dtype=amp_dtype, holdout_batches=holdout_batches,
        checkpoint_clock=CheckpointClock(steps=getattr(args, "checkpoint_steps", 0),
                                         minutes=getattr(args, "checkpoint_minutes", 0.0)),
        precise_bn_steps=getattr(args, "precise_bn", 0),
        fresh_log=not args.resume,
    )
    LOG.info("done: last %.2f%%, best %.2f%% (checkpoints in %s)", state.last_acc, state.best_acc, output_dir)
    return {"best_acc": state.best_acc, "last_acc": state.last_acc, "output_dir": str(output_dir)}

