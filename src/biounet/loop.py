"""The training loop: a visible loop over random tiles, with validation and exact resume.

`fit` writes nothing: what it reports (logged rows, better weights, checkpoint moments) goes
to a recorder, `Recorder` (memory) or `biounet.checkpoints.DirectoryRecorder` (a model
directory). Resuming is exact on CPU because every random draw is a function of
(seed, step): tiles come from `TileDataset` by index, and dropout's torch generator is
re-seeded each step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from biounet.augment import AugmentConfig
from biounet.configs import TrainConfig
from biounet.data import (
    Sample,
    TileDataset,
    tile_geometry,
)
from biounet.distributed import (
    SOLO,
    World,
    any_over,
    check_in_step,
    check_parallel,
    from_main,
    parallel,
    share_restored,
    sum_over,
)
from biounet.errors import BiounetError
from biounet.inference import Engine
from biounet.losses import segmentation_loss, soft_dice_loss, weighted_cross_entropy
from biounet.metrics import dice_from_counts
from biounet.model import UNet
from biounet.modeldir import ModelInfo
from biounet.optimizer import make_optimizer
from biounet.precision import autocast, memory_format, resolve_precision

log = logging.getLogger(__name__)
# A non-finite loss or gradient is recomputed this many times before the update is skipped
# (a transient non-finite value from a kernel then leaves the trajectory unchanged), and this
# many skipped updates in a row stop training: the model has diverged.
STEP_RETRIES = 2
MAX_SKIPS_IN_A_ROW = 10


class TrainingDiverged(BiounetError):
    """Training produced non-finite losses or gradients at too many steps in a row."""


def lr_factor(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """Learning-rate multiplier for the step after `step` steps and `elapsed_s` seconds.

    Returns
    -------
    float
        1 for ``"constant"``; for ``"cosine"`` it falls from 1 to 0 over the run, the run's
        progress being the larger of ``step / steps`` and ``elapsed_s / max_minutes``.
    """
    if config.lr_schedule == "constant":
        return 1.0
    progress = step / config.steps
    if config.max_minutes:
        progress = max(progress, elapsed_s / (60 * config.max_minutes))
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepInfo:
    """Progress report passed to the callback after every step."""

    step: int
    steps: int
    loss: float
    tiles_per_s: float
    val: dict | None = None


@dataclass
class TrainState:
    step: int = 0
    best_val_dice: float = -math.inf
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    skipped: int = 0  # updates skipped for a non-finite loss or gradient, all steps so far
    skipped_in_a_row: int = 0


Callback = Callable[[StepInfo], bool | None]


def fit(
    model: UNet,
    info: ModelInfo,
    train_samples: list[Sample],
    val_samples: list[Sample],
    config: TrainConfig,
    recorder: Recorder,
    *,
    resume: bool = False,
    augment: AugmentConfig | None = None,
    callback: Callback | None = None,
    device: torch.device | None = None,
    world: World = SOLO,
) -> TrainState:
    """Train `model` in place: a loop over steps that writes nothing itself.

    What is worth keeping (logged rows, better weights, checkpoints) goes to `recorder`:
    a `Recorder` keeps the best weights in memory, a `DirectoryRecorder` writes a model
    directory.

    Parameters
    ----------
    model : UNet
        Initialised network (fresh, from a model directory, or to be overwritten by resume).
    info : ModelInfo
        The model's description (architecture, classes, normalisation).
    train_samples, val_samples : list of Sample
    config : TrainConfig
    recorder : Recorder
    resume : bool
        Continue from the recorder's last checkpoint (weights, optimizer, step).
    augment : AugmentConfig, optional
        Augmentation of training tiles (None: plain crops).
    callback : callable(StepInfo) -> bool or None, optional
        Called after each step; returning False stops after a checkpoint.
    device : torch.device, optional
    world : World, optional
        This process's place in a data-parallel training (`biounet.distributed`): the
        processes split each step's ``config.batch_size`` tiles (the global batch) and
        average their gradients, so they train the model one process would. Only rank 0
        validates and reports to `recorder`.

    Returns
    -------
    TrainState
    """
    device = device or torch.device("cpu")
    check_parallel(info, config, device, world)
    precision = resolve_precision(config.precision, device)
    log.info("training on %s in %s", device, precision)
    model.to(device).to(memory_format=memory_format(precision))
    optimizer = make_optimizer(model, config)
    if not world.main:
        recorder, val_samples = Recorder(), []  # rank 0 writes, logs and validates
    recorder.bind(info)
    if resume:
        state = TrainState(**share_restored(world, recorder, model, optimizer))
    else:
        state = TrainState()
    net = parallel(model, world, device, config.batch_size)
    loader = _loader(train_samples, info, config, augment, state.step, world)
    # fp16 gradients underflow without loss scaling; a disabled scaler is a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    meter = _Meter(state.elapsed_s)
    model.train()

    def checkpoint() -> None:
        check_in_step(world, model)
        recorder.on_checkpoint(model, optimizer, state, config, bool(val_samples))

    if not resume:
        recorder.on_start()
        checkpoint()  # step 0: the model directory is complete and resumable from the start

    try:
        for batch in loader:
            step = state.step + 1
            elapsed = meter.elapsed()
            if config.max_minutes and config.lr_schedule != "constant":
                elapsed = from_main(world, elapsed)  # one clock, one learning rate for all
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config, step - 1, elapsed)
            batch = _to_device(batch, device, precision)
            loss = _guarded_step(net, optimizer, scaler, batch, config, precision, device, step,
                                 world)  # fmt: skip
            state.step = step  # weights and optimizer now belong to `step` (for Ctrl-C saves)
            _count_skips(state, loss, config)
            meter.add(loss, config.batch_size)
            # Rank 0's clock decides for all: every process must take the same last step.
            (budget_spent,) = any_over(
                world,
                world.main
                and config.max_minutes is not None
                and meter.elapsed() >= 60 * config.max_minutes,
            )
            last = step == config.steps or budget_spent
            val = None
            if val_samples and (step % config.val_every == 0 or last):
                val = validate(model, val_samples, info, precision, device, config.dice)
                model.train()
            if step % config.log_every == 0 or val is not None or last:
                row = meter.row(step, optimizer.param_groups[0]["lr"], state.skipped, val)
                recorder.on_row(row)
                state.history.append(row)
            if _better(val, state, model):
                state.best_val_dice = val["dice"]
                recorder.on_best(model)
            state.elapsed_s = meter.elapsed()
            if step % config.checkpoint_every == 0 or last:
                checkpoint()
            if budget_spent:
                log.info("time budget of %s min spent at step %d", config.max_minutes, step)
                break
            report = StepInfo(step, config.steps, math.nan if loss is None else loss,
                              meter.step_speed(), val)  # fmt: skip
            (stop,) = any_over(world, callback is not None and callback(report) is False)
            if stop:  # asked for in any process (Ctrl-C reaches them all)
                checkpoint()
                break
    except KeyboardInterrupt:
        # Raised at any instant, possibly between an update and `state.step`: no checkpoint
        # here, the last complete one stands. (`biounet train` turns Ctrl-C into a stop at the
        # next step, which the callback reports and which does save one.)
        raise
    if state.skipped:
        log.warning("%d of %d updates skipped for a non-finite loss or gradient",
                    state.skipped, state.step)  # fmt: skip
    return state


def _loader(
    samples: list[Sample],
    info: ModelInfo,
    config: TrainConfig,
    augment: AugmentConfig | None,
    done: int,
    world: World = SOLO,
) -> torch.utils.data.DataLoader:
    """Batches of the steps after `done`: step s draws tiles s * B ... (s + 1) * B - 1 (B the
    global batch), of which rank r of N takes the r-th of N equal parts."""
    geometry = tile_geometry(info.net, config.tile)
    b = config.batch_size
    dataset = TileDataset(samples, geometry, config.seed, config.steps * b, augment)
    part = b // world.size
    batches = [
        list(range(s * b + world.rank * part, s * b + (world.rank + 1) * part))
        for s in range(done, config.steps)
    ]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=config.num_workers, persistent_workers=False
    )


def _to_device(batch, device: torch.device, precision: str):
    image, target, weight = batch
    image = image.to(device).to(memory_format=memory_format(precision))
    return image, target.to(device), weight.to(device)


def _count_skips(state: TrainState, loss: float | None, config: TrainConfig) -> None:
    """Count a skipped update; too many in a row mean the training diverged."""
    if loss is not None:
        state.skipped_in_a_row = 0
        return
    state.skipped += 1
    state.skipped_in_a_row += 1
    log.warning("step %d: non-finite loss or gradient; update skipped", state.step)
    if state.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise TrainingDiverged(
            f"training diverged: the loss or gradient was not finite at "
            f"{state.skipped_in_a_row} steps in a row (up to step {state.step}); lower "
            f"the learning rate (`lr`, now {config.lr:g}) or the border weight "
            "(`w0`), or set `batch_norm`"
        )


def _better(val: dict | None, state: TrainState, model: UNet) -> bool:
    """Whether validation found the best weights so far.

    On validation Dice, not loss: the weighted loss rises with the border term's emphasis
    even while masks improve (seen on ISBI 2012). Weights that compute NaN score a Dice of 0
    or more, so a non-finite loss or weight never wins.
    """
    return (
        val is not None
        and val["dice"] > state.best_val_dice
        and math.isfinite(val["loss"])
        and _finite_weights(model)
    )


class _Meter:
    """Wall time since the run began (resumes included), and the figures of one log row."""

    def __init__(self, elapsed_before: float) -> None:
        self.t_start = time.perf_counter() - elapsed_before
        self.t_window = self.t_step = time.perf_counter()
        self.losses: list[float] = []
        self.tiles = 0
        self.last_tiles = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def add(self, loss: float | None, tiles: int) -> None:
        if loss is not None:
            self.losses.append(loss)
        self.tiles += tiles
        self.last_tiles = tiles

    def step_speed(self) -> float:
        """Tiles per second of the step just done."""
        now = time.perf_counter()
        speed = self.last_tiles / max(now - self.t_step, 1e-9)
        self.t_step = now
        return speed

    def row(self, step: int, lr: float, skipped: int, val: dict | None) -> dict:
        """The training.csv row for the steps since the last one; starts a new window."""
        now = time.perf_counter()
        row = {
            "step": step,
            "loss": float(np.mean(self.losses)) if self.losses else math.nan,
            "lr": lr,
            "tiles_per_s": self.tiles / max(now - self.t_window, 1e-9),
            "elapsed_s": now - self.t_start,
            "skipped": skipped,
        }
        row.update({f"val_{k}": v for k, v in (val or {}).items()})
        self.losses.clear()
        self.tiles, self.t_window = 0, now
        log.info("step %d loss %.4f", step, row["loss"])
        return row


def _guarded_step(
    model: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config: TrainConfig,
    precision: str,
    device: torch.device,
    step: int,
    world: World = SOLO,
) -> float | None:
    """One update from `batch`; returns its loss, or None when the update was skipped.

    A non-finite loss (or, without loss scaling, a non-finite gradient) is recomputed from the
    same inputs and dropout draws up to `STEP_RETRIES` times: a value that was non-finite by
    accident of a kernel is then replaced by the one an undisturbed run computes. If it stays
    non-finite, the weights and the optimizer state are left as they were. (With fp16 loss
    scaling, infinite gradients are the scaler's to handle: it skips and lowers the scale.)
    """
    image, target, weight = batch
    for _ in range(1 + STEP_RETRIES):
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout draws, reproducible
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = model(image)
        objective, loss = _objective(logits, target, weight, config.dice, world)
        if not torch.isfinite(loss):  # the global batch's loss: every process agrees
            continue
        scaler.scale(objective).backward()  # under DDP: gradients averaged over processes
        if scaler.is_enabled() or _finite_grads(model):
            scaler.step(optimizer)
            scaler.update()
            return loss.item()
    optimizer.zero_grad(set_to_none=True)
    return None


def _objective(logits, target, weight, dice: float, world: World):
    """What to differentiate, and the loss of the global batch (the same in every process).

    One process: both are `segmentation_loss`. Under DDP, whose gradient is the mean of the
    processes' gradients: each process's cross-entropy (a mean over equally many pixels)
    averages to the global one; the Dice of the pooled sums enters N times, since each
    process's gradient carries only its own pixels' part of it.
    """
    if not world.distributed:
        loss = segmentation_loss(logits, target, weight, dice)
        return loss, loss.detach()
    ce = weighted_cross_entropy(logits, target, weight)
    loss = sum_over(world, ce) / world.size
    if dice <= 0:
        return ce, loss
    term = soft_dice_loss(logits, target, weight, pool=lambda t: sum_over(world, t))
    return ce + dice * world.size * term, loss + dice * term.detach()


def _finite_grads(model: UNet) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def _finite_weights(model: UNet) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())  # fmt: skip


class Recorder:
    """Keeps what training reports, in memory: logged rows and the best weights.

    `fit` calls ``on_start`` (or ``restore`` when resuming), ``on_row`` for each logged row,
    ``on_best`` when validation found better weights, and ``on_checkpoint`` at checkpoint
    steps and at the end. Nothing is written anywhere; `DirectoryRecorder` writes a model
    directory instead.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.best: dict[str, torch.Tensor] | None = None  # best weights, else the last ones
        self.info: ModelInfo | None = None

    def bind(self, info: ModelInfo) -> None:
        """The model being trained (called first by `fit`)."""
        self.info = info

    def kept_network(self, info: ModelInfo) -> UNet:
        """A network holding the kept weights: the best validated, else the last."""
        net = UNet(info.net)
        net.load_state_dict(self.best)
        return net

    def on_end(self, info: ModelInfo) -> None:
        """The finished model's description (provenance, fitted post-processing)."""

    def close(self) -> None:
        """Training is over, finished or not (a directory recorder releases its lock)."""

    def restore(self, model: UNet, optimizer: torch.optim.Optimizer) -> dict:
        """Load the last checkpoint into `model` and `optimizer`; returns `TrainState`'s
        fields."""
        raise BiounetError("nothing to resume from: this training keeps no checkpoints")

    def on_start(self) -> None:
        self.rows.clear()

    def on_row(self, row: dict) -> None:
        self.rows.append(row)

    def on_best(self, model: UNet) -> None:
        self.best = _copy_state(model)

    def on_checkpoint(
        self,
        model: UNet,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        config: TrainConfig,
        has_val: bool,
    ) -> None:
        if not has_val or not math.isfinite(state.best_val_dice):
            self.best = _copy_state(model)


def _copy_state(model: UNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def validate(
    model: UNet,
    samples: list[Sample],
    info: ModelInfo,
    precision: str,
    device: torch.device,
    dice_weight: float = 0.0,
) -> dict:
    """Whole-image validation with overlap-tile prediction: loss (the training loss), pixel
    accuracy, and the mean Dice of the foreground classes (all but class 0), pooled over the
    images."""
    engine = Engine(model, device, precision, training=True)
    losses, correct, total = [], 0, 0
    inter = np.zeros(info.net.num_classes)
    sums = np.zeros(info.net.num_classes)
    for s in samples:
        logits = engine.logits(s.image)
        t_logits = torch.from_numpy(logits)[None]
        losses.append(
            float(
                segmentation_loss(
                    t_logits,
                    torch.from_numpy(s.classes)[None],
                    torch.from_numpy(s.weights)[None],
                    dice_weight,
                )
            )
        )
        pred = logits.argmax(0)
        correct += int((pred == s.classes).sum())
        total += s.classes.size
        for k in range(info.net.num_classes):
            inter[k] += np.sum((pred == k) & (s.classes == k))
            sums[k] += np.sum(pred == k) + np.sum(s.classes == k)
    # The foreground classes only: class 0 (background, or ISBI's cell interior) is most of
    # every image, so its Dice is high even for an empty prediction and would let one win.
    foreground = dice_from_counts(inter[1:], sums[1:])  # NaN for a class absent throughout
    dice = float(np.nanmean(foreground)) if np.isfinite(foreground).any() else 0.0
    return {"loss": float(np.mean(losses)), "accuracy": correct / total, "dice": dice}
