"""The training engine shared by the three recipes.

``train_one_epoch`` and ``evaluate`` return dicts of metrics; ``fit`` runs the
epochs, writes ``last``/``best`` checkpoints atomically (rank 0 only) and one
JSON line per epoch to ``log.jsonl`` in the output directory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .binop import BinOp
from .checkpoint import (
    BEST_NAME,
    LAST_NAME,
    arch_mismatch,
    checkpoint_accuracy,
    load_file,
    load_model_state,
    model_state_from,
    restore_rng_state,
    save_atomic,
    training_checkpoint,
    unwrap,
)
from .cli import UserError
from .distributed import DistInfo, all_reduce_sum
from .faults import fault_point
from .metrics import MetricsLog, is_epoch_record, read_log, run_header

LOG = logging.getLogger("xnornet")

Batch = Tuple[torch.Tensor, torch.Tensor]


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Mixed precision (CUDA, or bfloat16 on the CPU) when ``dtype`` is given, else a no-op.

    Only the autocast ops (convolutions, linear layers) run in ``dtype``; parameters, the
    real weights that :class:`BinOp` saves, their corrected gradients and the optimizer
    state stay float32.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at_epoch(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Step schedule: ``base_lr * gamma**k`` where k counts milestones <= ``epoch`` (1-based)."""
    return base_lr * gamma ** sum(1 for milestone in milestones if milestone <= epoch)


def cosine_lr_at_epoch(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay per epoch: ``base_lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``.

    Epoch 1 trains at ``base_lr``; the last epoch at ``base_lr * (1 + cos(pi * (epochs - 1) / epochs)) / 2``,
    a small but non-zero rate, so every epoch still learns.
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def progress(batches: Iterable[Batch], total: int, desc: str) -> Iterable[Batch]:
    """A tqdm bar when stderr is a terminal, the plain iterable otherwise."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional: plain log lines then
            return batches
        return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return batches


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """How many rows of ``output`` have ``target`` among their top-k, for each k (a tensor)."""
    maxk = min(max(ks), output.size(1))
    predicted = output.topk(maxk, dim=1).indices
    hits = predicted.eq(target.unsqueeze(1))
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def train_one_epoch(
    model: nn.Module,
    bin_op: BinOp,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    epoch: int,
    device: torch.device,
    num_batches: int,
    log_interval: int = 100,
    amp_dtype: Optional[torch.dtype] = None,
    partial: Optional[EpochProgress] = None,
    on_step: Optional[Callable[[int, Callable[[], EpochProgress]], None]] = None,
    log_seconds: float = 30.0,
) -> Dict[str, float]:
    """One epoch of the XNOR-Net step: binarize, forward, backward, restore, fix grads, step.

    ``partial`` continues an epoch interrupted after ``partial.step`` steps: ``batches``
    yields the remaining batches, and the running sums go on from the saved ones.
    ``on_step(step, snapshot)`` is called after every step but the last; ``snapshot()``
    returns the :class:`EpochProgress` so far (it reads the running sums, so call it only
    when checkpointing).
    Progress (loss, steps/s, the epoch's ETA) is logged every ``log_interval`` steps and at
    least every ``log_seconds`` seconds.
    Raises :class:`NonFiniteLoss` (checked whenever progress is logged, and at the end).
    """
    model.train()
    done = partial if partial is not None else EpochProgress()
    loss_sum = torch.tensor(done.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(done.correct, device=device, dtype=torch.int64)
    seen = done.seen
    start = time.perf_counter() - done.seconds
    resumed_at, last_log = time.perf_counter(), time.perf_counter()
    bar = progress(batches, num_batches - done.step, f"epoch {epoch}")
    for step, (images, targets) in enumerate(bar, start=done.step):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with bin_op.binarized():
            with autocast(device, amp_dtype):
                output = model(images)
                loss = criterion(output, targets)
            loss.backward()
        bin_op.updateBinaryGradWeight()
        optimizer.step()
        fault_point("train.step")

        loss_sum += loss.detach().double() * targets.size(0)
        correct += (output.detach().argmax(dim=1) == targets).sum()
        seen += targets.size(0)
        now = time.perf_counter()
        if (step + 1) % log_interval == 0 or step + 1 == num_batches or now - last_log >= log_seconds:
            last_log = now
            mean_loss = (loss_sum / seen).item()
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(
                    f"training loss became {mean_loss} in epoch {epoch} by step {step + 1}; "
                    "stopped without saving (earlier checkpoints are kept): lower --lr or check the data"
                )
            rate = (step + 1 - done.step) / max(now - resumed_at, 1e-9)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            else:
                LOG.info("train epoch %d [%d/%d] loss %.6f, %.2f steps/s, epoch ETA %s", epoch, step + 1,
                         num_batches, mean_loss, rate, format_seconds((num_batches - step - 1) / rate))
        if on_step is not None and step + 1 < num_batches:
            on_step(step + 1, lambda steps=step + 1, seen=seen: EpochProgress(
                step=steps, loss_sum=loss_sum.item(), correct=int(correct.item()),
                seen=seen, seconds=time.perf_counter() - start))
    if seen == 0:
        raise UserError("the training set produced no batch: it is empty, or holds a single image "
                        "(which is left out: BatchNorm cannot train on one)")
    mean_loss = (loss_sum / seen).item()
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"training loss became {mean_loss} in epoch {epoch}; stopped without saving")
    return {
        "train_loss": mean_loss,
        "train_acc": 100.0 * correct.item() / seen,
        "train_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    bin_op: BinOp,
    batches: Iterable[Batch],
    *,
    steps: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    world_size: int = 1,
) -> int:
    """Precise BatchNorm: replace every running mean and variance by the plain average of the
    batch statistics over the first ``steps`` of ``batches``; the weights do not change.

    During training the running statistics are an exponential average (momentum 0.1: mostly
    the last ten or so batches, taken while the weights still moved). In an XNOR network
    they set the thresholds of the sign that follows, so their noise shows directly in the
    test accuracy. The network runs binarized and in training mode (dropout on, as when the
    statistics were gathered); with several processes the ranks' averages are averaged.
    Returns the number of batches used.
    """
    layers = [module for module in model.modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    if not layers or steps <= 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None: a cumulative average, every batch weighted equally
    model.train()
    used = 0
    try:
        with bin_op.binarized():
            for images, _ in itertools.islice(batches, steps):
                with autocast(device, amp_dtype):
                    model(images.to(device, non_blocking=True))
                used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    if world_size > 1:
        for layer in layers:
            for buffer in (layer.running_mean, layer.running_var):
                buffer.copy_(all_reduce_sum(buffer) / world_size)
    return used


@torch.no_grad()
def evaluate(
    model: nn.Module,
    bin_op: BinOp,
    batches: Iterable[Batch],
    criterion: nn.Module,
    *,
    device: torch.device,
    topk: Sequence[int] = (1,),
    amp_dtype: Optional[torch.dtype] = None,
    desc: str = "test",
    log_seconds: float = 30.0,
) -> Dict[str, float]:
    """Test loss and top-k accuracy (percent) of the binarized model, summed over all ranks.

    Keys: ``test_loss``, ``test_acc`` (top-1), ``test_acc5`` when 5 is in ``topk``,
    ``test_correct``, ``test_count``.
    A progress line (``desc``, images so far, images/s, and the ETA when ``batches`` has a
    length) is logged at least every ``log_seconds`` seconds; it counts images on the host,
    so it adds no device synchronization.
    """
    model.eval()
    totals = torch.zeros(2 + len(topk), device=device, dtype=torch.float64)  # loss sum, count, hits...
    num_batches = len(batches) if hasattr(batches, "__len__") else None
    start = last_log = time.perf_counter()
    images_seen = 0
    with bin_op.binarized():
        for step, (images, targets) in enumerate(batches, start=1):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                output = model(images)
            output = output.float()
            totals[0] += criterion(output, targets).double() * targets.size(0)
            totals[1] += targets.size(0)
            totals[2:] += topk_correct(output, targets, topk).double()
            images_seen += targets.size(0)
            now = time.perf_counter()
            if now - last_log >= log_seconds:
                last_log = now
                rate = images_seen / max(now - start, 1e-9)
                if num_batches:
                    eta = (now - start) / step * (num_batches - step)
                    LOG.info("%s [%d/%d] %d images, %.1f images/s, ETA %s", desc, step, num_batches,
                             images_seen, rate, format_seconds(eta))
                else:
                    LOG.info("%s: %d images, %.1f images/s", desc, images_seen, rate)
    totals = all_reduce_sum(totals)
    count = int(totals[1].item())
    if count == 0:
        raise UserError(f"the {desc} set is empty")
    result = {
        "test_loss": totals[0].item() / count,
        "test_count": count,
        "test_correct": int(totals[2].item()),
    }
    for index, k in enumerate(topk):
        result["test_acc" if k == 1 else f"test_acc{k}"] = 100.0 * totals[2 + index].item() / count
    return result


@dataclass
class EpochProgress:
    """How far an epoch got: steps done and the running sums of its training metrics."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "loss_sum": self.loss_sum, "correct": self.correct,
                "seen": self.seen, "seconds": self.seconds}


@dataclass
class RunState:
    """Where a run stands: the next epoch to train (1-based), how far into it, the accuracies so far."""

    start_epoch: int = 1
    best_acc: float = 0.0
    last_acc: float = 0.0
    rng: Optional[Mapping[str, Any]] = None
    partial: Optional[EpochProgress] = None
    last_record: Optional[Mapping[str, Any]] = None  # the log record of the last finished epoch


class CheckpointClock:
    """Decides when to write a checkpoint inside an epoch: every ``steps`` steps and/or
    every ``minutes`` minutes since the last one (0 turns either off)."""

    def __init__(self, steps: int = 0, minutes: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.steps = steps
        self.seconds = 60.0 * minutes
        self.clock = clock
        self.last = clock()

    def due(self, step: int) -> bool:
        by_steps = self.steps > 0 and step % self.steps == 0
        by_time = self.seconds > 0 and self.clock() - self.last >= self.seconds
        return by_steps or by_time

    def reset(self) -> None:
        self.last = self.clock()


def resume_run(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, arch: str) -> RunState:
    """Load a ``last``/``best`` training checkpoint into ``model`` and ``optimizer``."""
    checkpoint = load_file(path, "--resume checkpoint")
    if "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise UserError(
            f"--resume checkpoint {path!r} has no optimizer state or epoch (a shipped or 2017 file?): "
            "use --pretrained to start from its weights"
        )
    if checkpoint.get("arch") not in (None, arch):
        raise UserError(arch_mismatch(f"--resume checkpoint {path!r}", str(checkpoint["arch"]), arch))
    load_model_state(unwrap(model), model_state_from(checkpoint), f"--resume checkpoint {path!r}")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"--resume checkpoint {path!r}: optimizer state does not fit ({err})") from None
    partial = checkpoint.get("partial")
    return RunState(
        start_epoch=int(checkpoint["epoch"]) + 1,
        best_acc=float(checkpoint.get("best_acc", 0.0)),
        last_acc=float(checkpoint.get("last_acc", 0.0)),
        rng=checkpoint.get("rng"),
        partial=EpochProgress(**partial) if partial else None,
        last_record=checkpoint.get("log_record"),
    )


def load_pretrained(path: str, model: nn.Module, arch: Optional[str] = None) -> Optional[float]:
    """Load weights from any supported checkpoint format; returns the accuracy it claims.

    Variants of one network (XNOR, float, BWN, K) share their state_dict keys, so a
    checkpoint that names its ``arch`` must match ``arch``.
    """
    checkpoint = load_file(path, "--pretrained checkpoint")
    if arch is not None and checkpoint.get("arch") not in (None, arch):
        raise UserError(arch_mismatch(f"--pretrained checkpoint {path!r}", str(checkpoint["arch"]), arch))
    load_model_state(unwrap(model), model_state_from(checkpoint), f"--pretrained checkpoint {path!r}")
    return checkpoint_accuracy(checkpoint)


LOG_NAME = "log.jsonl"


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    """Refuse to start a fresh run over the results of an earlier one: its checkpoints, or a
    log.jsonl that holds finished epochs. (A log.jsonl with no finished epoch, from a run
    stopped during its first epoch, is started anew by :func:`fit` with ``fresh_log``.)"""
    if resuming:
        return
    existing = [name for name in (LAST_NAME, BEST_NAME) if (output_dir / name).exists()]
    if existing:
        raise UserError(
            f"{output_dir} already holds {', '.join(existing)} from an earlier run; "
            "pass --resume to continue it, or choose another --output-dir"
        )
    log_path = output_dir / LOG_NAME
    logged = sum(1 for record in read_log(log_path) if is_epoch_record(record)) if log_path.exists() else 0
    if logged:
        raise UserError(
            f"{output_dir} already holds a {LOG_NAME} with {logged} epoch record(s) of an earlier run (and no "
            "checkpoint to resume it from); choose another --output-dir"
        )


def fit(
    *,
    model: nn.Module,
    bin_op: BinOp,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    num_train_batches: int,
    test_batches: Callable[[], Iterable[Batch]],
    epochs: int,
    lr_for_epoch: Callable[[int], float],
    state: RunState,
    output_dir: Path,
    arch: str,
    args: Mapping[str, Any],
    dist_info: DistInfo,
    log_interval: int = 100,
    topk: Sequence[int] = (1,),
    amp_dtype: Optional[torch.dtype] = None,
    holdout_batches: Optional[Callable[[], Iterable[Batch]]] = None,
    checkpoint_clock: Optional[CheckpointClock] = None,
    precise_bn_steps: int = 0,
    fresh_log: bool = False,
) -> RunState:
    """Train epochs ``state.start_epoch .. epochs``; checkpoint and log after each one.

    ``train_batches(epoch)`` must be deterministic given the epoch (a shuffle
    seeded by seed and epoch), so that a resumed run repeats an uninterrupted one.
    ``checkpoint_clock`` also writes ``last`` inside an epoch (with the step reached, the
    running sums and the RNG states), from which a resumed run continues at that step.
    ``holdout_batches``, when given, is evaluated after each epoch as ``holdout_*`` metrics
    (held-out training images, for choosing a recipe without the test set).
    ``precise_bn_steps`` > 0 recomputes the BatchNorm statistics on that many batches of
    ``train_batches(epoch)`` after each epoch's training, before testing and checkpointing.
    ``fresh_log`` starts ``log.jsonl`` anew (a new run; :func:`check_output_dir` has made sure
    that it holds no finished epoch); otherwise the run's header is appended (a resumed run).
    """
    metrics = MetricsLog(output_dir / LOG_NAME) if dist_info.is_main else None
    if metrics is not None and state.start_epoch > 1:
        dropped = metrics.reconcile(state.start_epoch - 1, state.last_record)
        if dropped:
            LOG.warning("dropped %d record(s) of epochs after %d from %s: they are trained again",
                        dropped, state.start_epoch - 1, metrics.path)
    if metrics is not None:
        if fresh_log and metrics.path.exists():
            LOG.info("starting %s anew: it holds no finished epoch", metrics.path)
        metrics.write(run_header(args, arch=arch, device=dist_info.device, world_size=dist_info.world_size),
                      fresh=fresh_log)
    if state.rng is not None and state.partial is None:
        restore_rng_state(state.rng)
    if checkpoint_clock is not None:
        checkpoint_clock.reset()
    for epoch in range(state.start_epoch, epochs + 1):
        lr = lr_for_epoch(epoch)
        set_lr(optimizer, lr)
        partial, state.partial = state.partial, None
        start = time.perf_counter() - (partial.seconds if partial is not None else 0.0)
        batches: Iterable[Batch] = train_batches(epoch)
        if partial is not None:
            # Draw the batches already trained on (a seeded shuffle, augmentation and loader
            # advance as they did), then restore the RNG states saved at that step (dropout).
            batches = iter(batches)
            for _ in range(partial.step):
                next(batches, None)
            if state.rng is not None:
                restore_rng_state(state.rng)

        def save_within_epoch(step: int, snapshot: Callable[[], EpochProgress], epoch: int = epoch) -> None:
            if checkpoint_clock is None or not dist_info.is_main or not checkpoint_clock.due(step):
                return
            checkpoint = training_checkpoint(
                arch=arch, model=model, optimizer=optimizer, epoch=epoch - 1,
                best_acc=state.best_acc, last_acc=state.last_acc, args=args,
            )
            checkpoint["partial"] = snapshot().as_dict()
            save_atomic(checkpoint, output_dir / LAST_NAME)
            checkpoint_clock.reset()

        train_stats = train_one_epoch(
            model, bin_op, batches, optimizer, criterion,
            epoch=epoch, device=dist_info.device, num_batches=num_train_batches,
            log_interval=log_interval, amp_dtype=amp_dtype, partial=partial, on_step=save_within_epoch,
        )
        if precise_bn_steps > 0:
            recalibrate_batchnorm(model, bin_op, train_batches(epoch), steps=precise_bn_steps,
                                  device=dist_info.device, amp_dtype=amp_dtype, world_size=dist_info.world_size)
        extra_stats: Dict[str, Any] = {}
        if holdout_batches is not None:
            held = evaluate(model, bin_op, holdout_batches(), criterion,
                            device=dist_info.device, topk=topk, amp_dtype=amp_dtype, desc="holdout")
            extra_stats = {key.replace("test_", "holdout_"): value for key, value in held.items()}
        test_stats = evaluate(model, bin_op, test_batches(), criterion,
                              device=dist_info.device, topk=topk, amp_dtype=amp_dtype)
        seconds = time.perf_counter() - start
        state.last_acc = test_stats["test_acc"]
        improved = state.last_acc > state.best_acc
        state.best_acc = max(state.best_acc, state.last_acc)
        state.start_epoch = epoch + 1
        record = {"epoch": epoch, "lr": lr, **train_stats, **extra_stats, **test_stats,
                  "best_acc": state.best_acc, "seconds": seconds}
        held_text = f" holdout acc {extra_stats['holdout_acc']:.2f}%" if "holdout_acc" in extra_stats else ""
        LOG.info(
            "epoch %d/%d lr %.2g train loss %.4f%s test loss %.4f test acc %.2f%% (best %.2f%%) %.1fs, run ETA %s",
            epoch, epochs, lr, train_stats["train_loss"], held_text, test_stats["test_loss"],
            state.last_acc, state.best_acc, seconds, format_seconds(seconds * (epochs - epoch)),
        )
        if dist_info.is_main:
            checkpoint = training_checkpoint(
                arch=arch, model=model, optimizer=optimizer, epoch=epoch,
                best_acc=state.best_acc, last_acc=state.last_acc, args=args,
            )
            checkpoint["log_record"] = record  # for a stop between this save and the log line
            save_atomic(checkpoint, output_dir / LAST_NAME)
            if improved:
                save_atomic(checkpoint, output_dir / BEST_NAME)
            assert metrics is not None
            metrics.write(record)
        if checkpoint_clock is not None:
            checkpoint_clock.reset()
    return state


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and augmentation: a function of (seed, epoch) only,
    so that a resumed run sees the same batches as an uninterrupted one."""
    return seed * 1_000_003 + epoch


def train_batch_count(count: int, batch_size: int) -> int:
    """The number of training batches of ``count`` samples: every batch of ``batch_size``, then
    the rest, unless the rest is a single sample (BatchNorm cannot train on one sample: it is
    left out, as :func:`iterate_tensors` with ``drop_single_last`` and ImageNet's loader do)."""
    rest = count % batch_size
    return count // batch_size + (1 if rest > 1 else 0)


def iterate_tensors(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    generator: Optional[torch.Generator] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    drop_last: bool = False,
    drop_single_last: bool = False,
) -> Iterator[Batch]:
    """Batches of a dataset held as tensors, by indexing (shuffled if ``generator`` is given).

    ``drop_last`` leaves out a last batch smaller than ``batch_size``; ``drop_single_last``
    only a last batch of one sample (for training: :func:`train_batch_count` batches).
    """
    count = images.size(0)
    order = torch.randperm(count, generator=generator) if generator is not None else None
    if drop_last:
        stop = count - count % batch_size
    elif drop_single_last:
        stop = min(count, train_batch_count(count, batch_size) * batch_size)
    else:
        stop = count
    for begin in range(0, stop, batch_size):
        end = min(begin + batch_size, stop)
        if order is None:
            batch_images, batch_labels = images[begin:end], labels[begin:end]
        else:
            index = order[begin:end].to(images.device)
            batch_images, batch_labels = images[index], labels[index]
        yield (transform(batch_images) if transform is not None else batch_images), batch_labels
