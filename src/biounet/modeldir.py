"""Model directories, the one module that knows their layout::

    MODEL_DIR/config.json            architecture, classes, normalisation, how it was trained
    MODEL_DIR/weights.safetensors    best weights by validation Dice (latest without validation)
    MODEL_DIR/training.csv           one row per logged step
    MODEL_DIR/curves.png             training curves
    MODEL_DIR/checkpoints/last/      weights, optimizer state (safetensors) and state.json

Never a pickle: a model directory from someone else is data, not code. Also finds the models
shipped with biounet by name, and `DirectoryRecorder` keeps a directory usable while
`biounet.loop.fit` trains (the loop itself writes nothing).
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from biounet import __version__
from biounet.errors import BiounetError
from biounet.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_path,
    ensure_dir,
    load_tensors,
    read_json,
    read_model_config,
    save_tensors,
    tensor_metadata,
    write_json,
)
from biounet.model import UNet, UNetConfig
from biounet.normalize import NormalizeConfig
from biounet.plots import training_curves

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCH_KEYS = (
    "depth",
    "base_channels",
    "in_channels",
    "num_classes",
    "padding",
    "batch_norm",
    "dropout",
)


@dataclass(frozen=True)
class ModelInfo:
    """Everything besides the weights that prediction needs to reproduce training."""

    net: UNetConfig
    class_names: tuple[str, ...]
    normalization: NormalizeConfig = field(default_factory=NormalizeConfig)
    training: dict | None = None  # how it was trained: command, data, settings, metrics
    postprocess: dict | None = None  # what --output instances needs (later issues)
    weights_dtype: str = "float32"  # storage precision of weights.safetensors (or float16)

    def __post_init__(self) -> None:
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise BiounetError(
                f"weights dtype must be one of {tuple(WEIGHT_DTYPES)}, not {self.weights_dtype!r}"
            )
        if len(self.class_names) != self.net.num_classes:
            raise BiounetError(
                f"{len(self.class_names)} class names given for {self.net.num_classes} classes"
            )

    def to_dict(self) -> dict:
        return {
            "format": "biounet-model",
            "biounet_version": __version__,
            **self.net.to_dict(),
            "class_names": list(self.class_names),
            "normalization": self.normalization.to_dict(),
            "training": self.training,
            "postprocess": self.postprocess,
            "weights_dtype": self.weights_dtype,
        }

    @classmethod
    def from_dict(cls, d: dict, source: Path | str = "config") -> ModelInfo:
        missing = [k for k in (*ARCH_KEYS[:5], "class_names") if k not in d]
        if missing:
            raise BiounetError(f"{source}: incomplete model config, missing {', '.join(missing)}")
        try:
            _check_postprocess(d.get("postprocess"))
            net = UNetConfig(**{k: d[k] for k in ARCH_KEYS if k in d})
            norm = NormalizeConfig(**d.get("normalization", {}))
            return cls(
                net,
                tuple(d["class_names"]),
                norm,
                d.get("training"),
                d.get("postprocess"),
                d.get("weights_dtype", "float32"),
            )
        except (TypeError, BiounetError) as exc:
            raise BiounetError(f"{source}: invalid model config ({exc})") from None

    def replace(self, **changes) -> ModelInfo:
        from dataclasses import replace

        return replace(self, **changes)


def _check_postprocess(post) -> None:
    """A stored post-processing must be one `InstanceConfig` can take (checked on load, not
    after a prediction)."""
    from dataclasses import fields

    from biounet.instances import InstanceConfig

    if post is None:
        return
    if not isinstance(post, dict) or not isinstance(post.get("instances", {}), dict | None):
        raise BiounetError("postprocess must be an object with an 'instances' object")
    stored = post.get("instances") or {}
    known = {f.name for f in fields(InstanceConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise BiounetError(
            f"unknown postprocess.instances key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        InstanceConfig(**stored)
    except (TypeError, ValueError) as exc:
        raise BiounetError(f"postprocess.instances: {exc}") from None


def default_class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == 2:
        return ("background", "foreground")
    return tuple(f"class{k}" for k in range(num_classes))


def save_model(folder: Path, model: UNet, info: ModelInfo) -> None:
    """Write weights then config (the config's presence marks a complete directory)."""
    folder = Path(folder)
    dtype = WEIGHT_DTYPES[info.weights_dtype]
    # Half-precision storage halves a shipped model; the network still computes in fp32.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        # A model that computes NaN would give all-background masks without a word.
        raise BiounetError(
            f"{folder}: not saved, {len(bad)} weight tensor(s) hold NaN or infinite values "
            f"({bad[0]}, ...)"
        )
    save_tensors(folder / WEIGHTS_NAME, state, metadata={"format": "biounet"})
    write_json(folder / CONFIG_NAME, info.to_dict())


def load_info(folder: Path) -> ModelInfo:
    folder = Path(folder)
    return ModelInfo.from_dict(read_model_config(folder), folder / CONFIG_NAME)


def load_model(folder: Path) -> tuple[UNet, ModelInfo]:
    """Build the network from ``config.json`` and load ``weights.safetensors`` into it (on the
    CPU; `biounet.inference.Engine` moves it where it runs)."""
    folder = Path(folder)
    info = load_info(folder)
    model = UNet(info.net)
    load_weights(model, folder / WEIGHTS_NAME)
    return model, info


def load_weights(model: UNet, path: Path) -> None:
    state = load_tensors(path)
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise BiounetError(
            f"{path}: weights do not match the architecture in {CONFIG_NAME} "
            "(different depth, width or classes); the model directory is inconsistent"
        )
    # Batch norm's step counter is the one integer tensor the project writes.
    allowed = (*WEIGHT_DTYPES.values(), torch.int64)
    wrong = [k for k, v in state.items() if v.dtype not in allowed]
    if wrong:
        raise BiounetError(
            f"{path}: tensor {wrong[0]} has dtype {state[wrong[0]].dtype}; biounet writes "
            "float32, float16 or bfloat16 weights: re-save the model"
        )
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise BiounetError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({bad[0]}, ...); "
            "the model would predict nothing: retrain it or use another"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


# -- shipped models ---------------------------------------------------------------------------


def shipped_model_dirs() -> dict[str, Path]:
    """The model directories that come with biounet, by name.

    Found in the checkout's ``models/`` folder, or, in an installed wheel, where its data
    files go (``<prefix>/share/biounet/models``).
    """
    roots = (
        Path(__file__).resolve().parents[2] / "models",  # src/biounet/ -> the checkout
        Path(sys.prefix) / "share" / "biounet" / "models",
    )
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
                    found.setdefault(folder.name, folder)
    return found


def describe(folder: Path) -> str:
    """One line on a model directory: its README's title, else its classes."""
    readme = Path(folder) / "README.md"
    if readme.is_file():
        title = readme.read_text().splitlines()[0].lstrip("# ").strip()
        if title:
            return title.split(" — ", 1)[-1]
    return "classes " + ", ".join(load_info(folder).class_names)


def resolve_model(source: str | Path) -> Path:
    """A model directory from a path or the name of a shipped model.

    A model directory at the path wins over a name (a data folder called ``isbi2012`` does
    not); an unknown name is refused listing the known ones.
    """
    path = Path(source)
    shipped = shipped_model_dirs()
    if (path / CONFIG_NAME).is_file() or (path.exists() and str(source) not in shipped):
        return path  # a model directory; or a path whose own error says what is wrong
    if str(source) in shipped:
        return shipped[str(source)]
    known = ", ".join(shipped) or "none found"
    raise BiounetError(
        f"{source}: no such model directory, nor the name of a shipped model (known: {known})"
    )


# -- training outputs: checkpoints, the training log, curves ----------------------------

CHECKPOINT_DIR = Path("checkpoints") / "last"
DICE_OF = "foreground classes"  # what best_val_dice averages (biounet.loop.validate)
LOG_NAME = "training.csv"
CURVES_NAME = "curves.png"
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
    """Keeps a model directory usable throughout training (see the module docstring)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.info: ModelInfo | None = None

    def bind(self, info: ModelInfo) -> None:
        self.info = info

    def kept_network(self, info: ModelInfo) -> UNet:
        return load_model(self.out_dir)[0]

    def on_end(self, info: ModelInfo) -> None:
        # The final provenance next to whichever weights are current.
        write_json(self.out_dir / CONFIG_NAME, info.to_dict())

    def restore(self, model: UNet, optimizer: torch.optim.Optimizer) -> dict:
        return load_checkpoint(self.out_dir, model, optimizer)

    def on_start(self) -> None:
        ensure_dir(self.out_dir)
        _truncate_csv(self.out_dir / LOG_NAME, 0)

    def on_row(self, row: dict) -> None:
        _append_csv(self.out_dir / LOG_NAME, row)

    def on_best(self, model: UNet) -> None:
        save_model(self.out_dir, model, self.info)

    def on_checkpoint(
        self,
        model: UNet,
        optimizer: torch.optim.Optimizer,
        state,
        config,
        has_val: bool,
    ) -> None:
        save_checkpoint(self.out_dir, model, optimizer, state, config)
        if not has_val or not math.isfinite(state.best_val_dice):
            save_model(self.out_dir, model, self.info)
        history = _read_csv(self.out_dir / LOG_NAME)
        if history:
            with atomic_path(self.out_dir / CURVES_NAME) as tmp:
                training_curves(history).savefig(tmp, format="png", dpi=100)


def save_checkpoint(
    out_dir: Path,
    model: UNet,
    optimizer: torch.optim.Optimizer,
    state,
    config,
) -> None:
    """Weights and optimizer state as safetensors, the rest as JSON; state.json written last.

    `state`: the loop's `TrainState`; `config`: its `TrainConfig` (stored for --resume).
    """
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise BiounetError(f"{out_dir}: the weights are not finite; no checkpoint written")
    folder = ensure_dir(out_dir / CHECKPOINT_DIR)
    # Each file is atomic, the set is not: every file carries its step, checked on resume.
    stamp = {"step": str(state.step)}
    save_tensors(folder / "model.safetensors", model.state_dict(), metadata=stamp)
    tensors, scalars = {}, {}
    opt_state = optimizer.state_dict()
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_tensors(folder / "optimizer.safetensors", tensors, metadata=stamp)
    write_json(
        folder / "state.json",
        {
            "step": state.step,
            "best_val_dice": finite_or_none(state.best_val_dice),
            "dice_of": DICE_OF,
            "elapsed_s": state.elapsed_s,
            "skipped": state.skipped,
            "skipped_in_a_row": state.skipped_in_a_row,
            "train_config": asdict(config),
            "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
        },
    )


def read_checkpoint_config(out_dir: Path) -> dict:
    path = out_dir / CHECKPOINT_DIR / "state.json"
    if not path.is_file():
        raise BiounetError(f"{out_dir}: no checkpoint to resume from (missing {path})")
    return read_json(path)["train_config"]


def load_checkpoint(out_dir: Path, model: UNet, optimizer: torch.optim.Optimizer) -> dict:
    """Load the last checkpoint into `model` and `optimizer`; returns the loop's state
    (`biounet.loop.TrainState` fields)."""
    folder = out_dir / CHECKPOINT_DIR
    meta = read_json(folder / "state.json")
    for name in ("model.safetensors", "optimizer.safetensors"):
        stamped = tensor_metadata(folder / name).get("step")
        if stamped != str(meta["step"]):
            raise BiounetError(
                f"{folder / name}: holds step {stamped} but state.json step {meta['step']} "
                "(training was killed while saving); delete checkpoints/ to restart"
            )
    load_weights(model, folder / "model.safetensors")
    tensors = load_tensors(folder / "optimizer.safetensors")
    opt_state: dict = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[key] = value
    for idx, entries in meta["optimizer"]["scalars"].items():
        opt_state["state"].setdefault(int(idx), {}).update(entries)
    optimizer.load_state_dict(opt_state)
    step = int(meta["step"])
    _truncate_csv(out_dir / LOG_NAME, step)
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


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after `step` (an interrupted run may have logged past its checkpoint)."""
    rows = [r for r in _read_csv(path) if r["step"] <= step]
    if path.is_file():
        path.unlink()
    for r in rows:
        _append_csv(path, {k: (int(v) if k == "step" else v) for k, v in r.items()})
