"""`biounet init` and `biounet info`: make and inspect model directories."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from biounet.cli.common import command_line, model_path, say
from biounet.cli.flags import add_arch_flags
from biounet.errors import BiounetError


def add_init(sub) -> None:
    q = sub.add_parser("init", help="create an untrained model directory")
    q.add_argument("model_dir", type=Path, help="the model directory to create")
    add_arch_flags(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the He initialisation")
    q.add_argument("--force", action="store_true", help="overwrite an existing model")
    q.set_defaults(func=cmd_init)


def add_info(sub) -> None:
    q = sub.add_parser("info", help="summarise a model: architecture, classes, training")
    q.add_argument("model_dir", type=Path, help="a model directory, or a shipped model's name")
    q.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the full record as JSON ('-': stdout)"
    )
    q.set_defaults(func=cmd_info)


def model_info(args: argparse.Namespace, in_channels: int):
    """The `ModelInfo` the architecture flags describe."""
    from biounet.trainer import configs_from_options

    names = ("depth", "base_channels", "classes", "class_names", "padding", "batch_norm")
    names += ("dropout", "normalize")
    options = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return configs_from_options(options, in_channels)[0]


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from biounet.io import is_model_dir
    from biounet.model import UNet
    from biounet.modeldir import save_model

    if is_model_dir(args.model_dir) and not args.force:
        raise BiounetError(f"{args.model_dir}: already holds a model; use --force to overwrite")
    if args.model_dir.exists() and not args.model_dir.is_dir():
        raise BiounetError(f"{args.model_dir}: is a file, not a folder; choose another path")
    info = model_info(args, args.in_channels or 1)
    torch.manual_seed(args.seed)
    model = UNet(info.net)
    info = info.replace(
        training={"command": command_line(args), "note": "untrained (He init)", "seed": args.seed}
    )
    save_model(args.model_dir, model, info)
    say(
        args, f"created untrained model in {args.model_dir} ({model.num_parameters():,} parameters)"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from biounet.io import json_text, write_json
    from biounet.modeldir import load_model
    from biounet.tiling import valid_tiles

    folder = model_path(args.model_dir)
    model, info = load_model(folder)
    net = info.net
    arch = {k: v for k, v in info.to_dict().items() if k in net.to_dict()}
    tiles = ", ".join(f"{t_in}->{t_out}" for t_in, t_out in valid_tiles(net, 6))
    lines = [
        f"model: {folder}",
        f"architecture: {json.dumps(arch)}",
        f"parameters: {model.num_parameters():,}",
        f"conv layers: {model.num_conv_layers()}",
        f"margin per side: {net.margin} px",
        f"valid tiles (input->output): {tiles}, ... every {net.size_step} px",
        f"classes: {', '.join(f'{k} = {n}' for k, n in enumerate(info.class_names))}",
        f"normalisation: {info.normalization.method}",
        *_training_lines(info.training),
    ]
    for name in ("instances", "membranes"):  # the stored post-processing
        if info.postprocess and info.postprocess.get(name):
            post = info.postprocess[name]
            lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in post.items()))
    if info.postprocess and info.postprocess.get("tta"):
        lines.append("predicts with TTA (8 rotations and flips) unless told --no-tta")
    to_stdout = args.json is not None and str(args.json) == "-"
    if not args.quiet:  # beside JSON on standard output, the summary goes to standard error
        print("\n".join(lines), file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        print(json_text(info.to_dict()))
    elif args.json is not None:
        write_json(args.json, info.to_dict())
        say(args, f"wrote {args.json}")
    return 0


def _training_lines(training: dict | None) -> list[str]:
    """How and how long it was trained, and how well it validated."""
    if not training:
        return ["training: none recorded"]
    if training.get("note"):
        return [f"training: {training['note']}"]
    config = training.get("train_config") or {}
    last = training.get("last") or {}
    lines = [
        f"trained: {training.get('steps_done', '?')} steps of {config.get('batch_size', '?')} "
        f"tile(s) of {config.get('tile', '?')} px, {config.get('optimizer', '?')} "
        f"lr {config.get('lr', '?')}, on {training.get('device', '?')} in "
        f"{training.get('precision', '?')}, {last.get('elapsed_s', 0) / 60:.1f} min",
        f"data: {training.get('images', '?')} ({len(training.get('train_files') or [])} "
        f"training, {len(training.get('val_files') or [])} validation images)",
    ]
    if training.get("best_val_dice") is not None:
        lines.append(f"best validation Dice: {training['best_val_dice']:.4f}")
    if training.get("command"):
        lines.append(f"command: {training['command']}")
    return lines
