"""Model directories, the one module that knows their layout::

    MODEL_DIR/config.json            architecture, classes, normalisation, how it was trained
    MODEL_DIR/weights.safetensors    best weights by validation Dice (latest without validation)

Never a pickle: a model directory from someone else is data, not code. Also finds the models
shipped with biounet by name. What training adds (checkpoints, training.csv, curves, the
lock) is `biounet.checkpoints`'s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from biounet import __version__
from biounet.architecture import UNetConfig
from biounet.errors import BiounetError
from biounet.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_tensors,
    read_model_config,
    save_tensors,
    write_json,
)
from biounet.model import UNet
from biounet.normalize import NormalizeConfig

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
        if not all(isinstance(n, str) and n for n in self.class_names):
            raise BiounetError(f"class names must be non-empty strings, not {self.class_names}")
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
            _check_postprocess(d.get("postprocess"), d["num_classes"])
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


def _check_postprocess(post, num_classes: int) -> None:
    """A stored post-processing must be what `InstanceConfig` (``instances``) and
    `MembraneConfig` (``membranes``) take, for this model's classes, and ``tta`` true or false
    (checked on load, not after a prediction)."""
    from biounet.instances import InstanceConfig
    from biounet.membranes import MembraneConfig

    if post is None:
        return
    sections = {"instances": InstanceConfig, "membranes": MembraneConfig}
    if not isinstance(post, dict):
        raise BiounetError("postprocess must be an object with 'instances', 'membranes', 'tta'")
    unknown = sorted(set(post) - {*sections, "tta"})
    if unknown:
        raise BiounetError(
            f"unknown postprocess key(s) {', '.join(unknown)}; known: instances, membranes, tta"
        )
    if post.get("tta") is not None and not isinstance(post["tta"], bool):
        raise BiounetError(f"postprocess.tta must be true or false, not {post['tta']!r}")
    for name, kind in sections.items():
        stored = post.get(name)
        if stored is None:
            continue
        if not isinstance(stored, dict):
            raise BiounetError(f"postprocess.{name} must be an object")
        known = {f.name for f in fields(kind)}
        unknown = sorted(set(stored) - known)
        if unknown:
            raise BiounetError(
                f"unknown postprocess.{name} key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        try:
            config = kind(**stored)
        except (TypeError, ValueError) as exc:
            raise BiounetError(f"postprocess.{name}: {exc}") from None
        classes = {"membranes": ("membrane_class",), "instances": ("cell_class", "border_class")}
        for key in classes[name]:
            value = getattr(config, key)
            if value is not None and value >= num_classes:
                raise BiounetError(
                    f"postprocess.{name}: {key} {value} is not one of the model's "
                    f"{num_classes} classes"
                )


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
