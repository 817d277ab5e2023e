"""The training options, named once: the `biounet train` flags and the `biounet.train` keywords.

Each option is a flag's name with underscores (``--base-channels`` -> ``base_channels``) and
lands in one field of one component's config: the architecture (`UNetConfig`), the model's
description (class names, normalisation, storage dtype), the data (`DataConfig`, with its
`AugmentConfig`) or the optimisation (`TrainConfig`). Imports nothing heavy, so the command
line can use it before torch is loaded.
"""

from __future__ import annotations

import difflib

# option -> (component, field)
TRAIN_OPTIONS: dict[str, tuple[str, str]] = {
    "depth": ("net", "depth"),
    "base_channels": ("net", "base_channels"),
    "in_channels": ("net", "in_channels"),
    "classes": ("net", "num_classes"),
    "padding": ("net", "padding"),
    "batch_norm": ("net", "batch_norm"),
    "dropout": ("net", "dropout"),
    "class_names": ("model", "class_names"),
    "normalize": ("model", "normalize"),
    "save_dtype": ("model", "weights_dtype"),
    "mask_type": ("data", "mask_type"),
    "foreground": ("data", "foreground"),
    "no_class_balance": ("data", "no_class_balance"),
    "w0": ("data", "border_w0"),
    "sigma": ("data", "border_sigma"),
    "cell_class": ("data", "cell_class"),
    "touching": ("data", "touching"),
    "no_augment": ("data", "no_augment"),
    "elastic_std": ("data", "elastic_std"),
    "steps": ("train", "steps"),
    "max_minutes": ("train", "max_minutes"),
    "batch_size": ("train", "batch_size"),
    "tile": ("train", "tile"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "lr_schedule": ("train", "lr_schedule"),
    "dice": ("train", "dice"),
    "momentum": ("train", "momentum"),
    "weight_decay": ("train", "weight_decay"),
    "seed": ("train", "seed"),
    "val_every": ("train", "val_every"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "workers": ("train", "num_workers"),
    "precision": ("train", "precision"),
    "val_fraction": ("run", "val_fraction"),
    "device": ("run", "device"),
}


# `biounet predict` / `PredictConfig` and the runs' own arguments: name -> option
OTHER_OPTIONS = (
    "output", "overlay", "stream", "tta", "memory_mb", "instance_margin", "skip_existing",
    "out", "init", "resume", "val_images", "val_masks",
)  # fmt: skip


def all_option_names() -> dict[str, str]:
    """Every option, and every config field an option sets, -> the option's name."""
    names = {fld: option for option, (_, fld) in TRAIN_OPTIONS.items()}
    names.update({option: option for option in (*TRAIN_OPTIONS, *OTHER_OPTIONS)})
    return names


def split_options(options: dict, known: dict[str, tuple[str, str]] = TRAIN_OPTIONS) -> dict:
    """``{component: {field: value}}`` from options; an unknown one is refused.

    Raises
    ------
    TypeError
        For an unknown option, naming the nearest known one.
    """
    groups: dict[str, dict] = {}
    for name, value in options.items():
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(known)}"
            raise TypeError(f"unknown training option {name!r}{hint}")
        component, fld = known[name]
        groups.setdefault(component, {})[fld] = value
    return groups


def flag(option: str) -> str:
    """The command-line flag of an option: ``max_minutes`` -> ``--max-minutes``."""
    return "--" + option.replace("_", "-")
