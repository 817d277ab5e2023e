"""A model directory while it trains: checkpoints, the training log, curves, the lock.

Layout (beside `biounet.modeldir`'s config.json and weights.safetensors)::

    MODEL_DIR/checkpoints/step-000000200/   model.safetensors, optimizer.safetensors, state.json
    MODEL_DIR/checkpoints/last -> step-000000200
    MODEL_DIR/training.csv                  one row per logged step
    MODEL_DIR/curves.png                    training curves
    MODEL_DIR/.lock                         host and process id of the training writing it

Crash safety: a checkpoint is written into a fresh temporary folder, flushed (files and
folder), renamed to its ``step-`` name in one step, and only then does ``last`` move to it
(one atomic symlink swap) and the previous checkpoint go. A kill at any instant leaves the
previous complete checkpoint or the new one; resume takes the newest complete one. The
directory holds a model and a step-0 checkpoint from the moment training starts, so it is
resumable from then on. training.csv is appended to and rewritten only atomically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from biounet.durable import (
    atomic_path,
    ensure_dir,
    fault_point,
    fsync_dir,
    fsync_file,
    process_alive,
    remove_leftovers,
    temp_prefix,
)
from biounet.errors import BiounetError
from biounet.io import CONFIG_NAME, load_tensors, read_json, save_tensors, tensor_metadata
from biounet.model import UNet
from biounet.modeldir import ModelInfo, load_model, load_weights, save_model
from biounet.optimizer import load_optimizer_parts, optimizer_parts
from biounet.plots import training_curves

CHECKPOINTS = "checkpoints"
LAST = "last"
STEP_PREFIX = "step-"
LOG_NAME = "training.csv"
CURVES_NAME = "curves.png"
LOCK_NAME = ".lock"
DICE_OF = "foreground classes"  # what best_val_dice averages (biounet.loop.validate)
CSV_FIELDS = (
    "step",
    "loss",
    "lr",
    "tiles_per_s",
    "elapsed_s",
    "val_loss",
    "val_accuracy",
    "val_dice",
    "skipped",
)


class DirectoryRecorder:
    """Keeps a model directory complete and resumable throughout training (module docstring).

    Holds the directory's lock from `bind` until `close`.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.info: ModelInfo | None = None
        self._lock: Path | None = None

    def bind(self, info: ModelInfo) -> None:
        self.info = info
        ensure_dir(self.out_dir)
        self._lock = acquire_lock(self.out_dir)
        remove_leftovers(self.out_dir)
        remove_leftovers(self.out_dir / CHECKPOINTS)

    def close(self) -> None:
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None

    def kept_network(self, info: ModelInfo) -> UNet:
        return load_model(self.out_dir)[0]

    def on_end(self, info: ModelInfo) -> None:
        # The final provenance next to whichever weights are current.
        from biounet.io import write_json

        write_json(self.out_dir / CONFIG_NAME, info.to_dict())

    def restore(self, model: UNet, optimizer: torch.optim.Optimizer) -> dict:
        state = load_checkpoint(self.out_dir, model, optimizer)
        # A kill may have left `last` on an older checkpoint than the one resumed from.
        folder = newest_checkpoint(self.out_dir)
        if folder is not None and folder.name.startswith(STEP_PREFIX):
            _point_last_at(folder.parent, folder.name)
            _remove_other_steps(folder.parent, folder.name)
        return state

    def on_start(self) -> None:
        # A fresh training (e.g. fine-tuning in place): the checkpoints of the earlier one go
        # first, by one rename, so no kill can make --resume continue the earlier training.
        old = self.out_dir / CHECKPOINTS
        if old.exists():
            gone = self.out_dir / f"{temp_prefix(CHECKPOINTS)}old.tmp"
            os.rename(old, gone)
            fsync_dir(self.out_dir)
            shutil.rmtree(gone, ignore_errors=True)
        rewrite_log(self.out_dir / LOG_NAME, 0)

    def on_row(self, row: dict) -> None:
        append_log(self.out_dir / LOG_NAME, row)

    def on_best(self, model: UNet) -> None:
        save_model(self.out_dir, model, self.info)

    def on_checkpoint(
        self, model: UNet, optimizer: torch.optim.Optimizer, state, config, has_val: bool
    ) -> None:
        if not has_val or not math.isfinite(state.best_val_dice):
            save_model(self.out_dir, model, self.info)
        save_checkpoint(self.out_dir, model, optimizer, state, config)
        history = read_log(self.out_dir / LOG_NAME)
        if history:
            with atomic_path(self.out_dir / CURVES_NAME) as tmp:
                training_curves(history).savefig(tmp, format="png", dpi=100)


# -- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, model: UNet, optimizer: torch.optim.Optimizer, state, config):
    """Write the checkpoint of `state.step` as one complete folder, then point ``last`` at it.

    `state`: the loop's `TrainState`; `config`: its `TrainConfig` (stored for --resume).
    """
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise BiounetError(f"{out_dir}: the weights are not finite; no checkpoint written")
    root = ensure_dir(Path(out_dir) / CHECKPOINTS)
    name = f"{STEP_PREFIX}{state.step:09d}"
    if (root / name / "state.json").is_file():
        # Saved already (a stop right after a checkpoint step): no update came since, and
        # replacing it would leave a moment without any complete checkpoint.
        _point_last_at(root, name)
        return
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=root))
    stamp = {"step": str(state.step)}
    save_tensors(tmp / "model.safetensors", model.state_dict(), metadata=stamp)
    tensors, meta = optimizer_parts(optimizer)
    save_tensors(tmp / "optimizer.safetensors", tensors, metadata=stamp)
    state_json = {
        "step": state.step,
        "best_val_dice": finite_or_none(state.best_val_dice),
        "dice_of": DICE_OF,
        "elapsed_s": state.elapsed_s,
        "skipped": state.skipped,
        "skipped_in_a_row": state.skipped_in_a_row,
        "train_config": asdict(config),
        "optimizer": meta,
    }
    (tmp / "state.json").write_text(json.dumps(state_json, indent=2, allow_nan=False) + "\n")
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    fault_point(f"checkpoint {name} written")
    final = root / name
    if final.exists():  # an incomplete folder of this name (not one of ours): make way
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    fault_point(f"checkpoint {name} in place")
    _point_last_at(root, name)
    fault_point(f"checkpoint {name} is last")
    _remove_other_steps(root, name)


def _remove_other_steps(root: Path, keep: str) -> None:
    for old in root.iterdir():
        if old.name.startswith(STEP_PREFIX) and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(root)


def _point_last_at(root: Path, name: str) -> None:
    """Swap the ``last`` symlink to `name` in one rename (a real folder from older versions
    of biounet is removed once the new checkpoint is in place)."""
    last = root / LAST
    if last.is_dir() and not last.is_symlink():
        shutil.rmtree(last)
    link = root / f"{temp_prefix(LAST)}link.tmp"
    link.unlink(missing_ok=True)
    os.symlink(name, link)
    os.replace(link, last)
    fsync_dir(root)


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder: the highest ``step-N`` (each appears only by
    the rename of a complete folder, so ``last`` may trail it after a kill), else a
    ``last`` folder written by an older biounet."""
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted(
        (d for d in root.glob(f"{STEP_PREFIX}*") if (d / "state.json").is_file()),
        key=lambda d: d.name,
    )
    if steps:
        return steps[-1]
    last = root / LAST
    return last if (last / "state.json").is_file() else None


def stored_train_config(out_dir: Path) -> dict:
    """The `TrainConfig` fields a training into `out_dir` ran with, for --resume."""
    folder = newest_checkpoint(out_dir)
    if folder is None:
        raise BiounetError(
            f"{out_dir}: no checkpoint to resume from (no {CHECKPOINTS}/{STEP_PREFIX}*); "
            "train into it again without resume"
        )
    return read_json(folder / "state.json")["train_config"]


def load_checkpoint(out_dir: Path, model: UNet, optimizer: torch.optim.Optimizer) -> dict:
    """Load the newest complete checkpoint into `model` and `optimizer`; returns the loop's
    state (`biounet.loop.TrainState` fields). training.csv is cut back to its step."""
    folder = newest_checkpoint(out_dir)
    if folder is None:
        raise BiounetError(f"{out_dir}: no checkpoint to resume from")
    meta = read_json(folder / "state.json")
    for name in ("model.safetensors", "optimizer.safetensors"):
        stamped = tensor_metadata(folder / name).get("step")
        if stamped != str(meta["step"]):
            raise BiounetError(
                f"{folder / name}: holds step {stamped} but state.json step {meta['step']} "
                "(training was killed while saving, or the files were changed by hand); delete "
                "checkpoints/ to restart"
            )
    load_weights(model, folder / "model.safetensors")
    load_optimizer_parts(
        optimizer, load_tensors(folder / "optimizer.safetensors"), meta["optimizer"]
    )
    step = int(meta["step"])
    rewrite_log(Path(out_dir) / LOG_NAME, step)
    best = meta.get("best_val_dice")
    if meta.get("dice_of") != DICE_OF:
        best = None  # scored another way (all classes, before 0.1.0's foreground Dice)
    return {
        "step": step,
        "best_val_dice": -math.inf if best is None else best,
        "elapsed_s": float(meta.get("elapsed_s", 0.0)),
        "skipped": int(meta.get("skipped", 0)),
        "skipped_in_a_row": int(meta.get("skipped_in_a_row", 0)),
    }


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- training.csv ----------------------------------------------------------------------------


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
            if row.get("step")  # a row a kill cut short has no step; it is rewritten
        ]


def append_log(path: Path, row: dict) -> None:
    fault_point(f"append {path.name}")
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        f.flush()
        os.fsync(f.fileno())


def rewrite_log(path: Path, step: int) -> None:
    """Keep the rows up to `step` (a killed run may have logged past its checkpoint), by one
    atomic rewrite: a kill leaves the old file or the new one."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (int(v) if k == "step" else v) for k, v in r.items()})


# -- the lock ----------------------------------------------------------------------------------


def acquire_lock(out_dir: Path) -> Path:
    """Take ``out_dir/.lock`` for this process, or refuse naming the training that holds it.

    A lock left by a dead process on this host is taken over.
    """
    path = Path(out_dir) / LOCK_NAME
    host = socket.gethostname()
    # Written whole under a temporary name, then linked into place: the lock never exists
    # without its holder's name in it, and the link fails if another process holds it.
    tmp = Path(out_dir) / f"{temp_prefix(LOCK_NAME)}mine.tmp"
    tmp.write_text(json.dumps({"host": host, "pid": os.getpid()}))
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                holder = _read_lock(path)
                if holder.get("host") == host and not process_alive(holder.get("pid")):
                    path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise BiounetError(
                    f"{out_dir}: another training is writing this model directory (process "
                    f"{holder.get('pid')} on {holder.get('host')}); wait for it, or delete "
                    f"{path} if that process is gone"
                ) from None
        raise BiounetError(f"{path}: cannot take the lock; delete it if no training runs")
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if _read_lock(path).get("pid") == os.getpid():
            path.unlink()


def _read_lock(path: Path) -> dict:
    """The holder named in a lock; an unreadable one (hand-made) counts as this host's dead
    process, so it is taken over."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        holder = None
    return holder if isinstance(holder, dict) else {"host": socket.gethostname(), "pid": None}
