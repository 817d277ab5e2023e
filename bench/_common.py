"""Helpers shared by the benchmark scripts (bench/ is no package: scripts import this by name)."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIOUNET = [sys.executable, "-m", "biounet"]


def run(cmd: list[str]) -> float:
    """Run a command (echoed), fail loudly, return its wall time in seconds."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def network_only(model_dir: str | Path, folder: Path) -> Path:
    """A copy of `model_dir` in `folder` without the stored TTA and membrane post-processing
    (its instance post-processing kept: `--output instances` asks for it by name), weights
    linked, not copied: bench/memory.py and bench/overlap.py measure the network's tiles and
    the streamed argmax, as before models stored their post-processing, so that their figures
    stay comparable over time. What TTA adds is 8x the network's passes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    post = {k: v for k, v in (config.get("postprocess") or {}).items() if k == "instances"}
    config["postprocess"] = post or None
    out = folder / f"{Path(model_dir).name}-network-only"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    weights = out / "weights.safetensors"
    if not weights.exists():
        weights.symlink_to((Path(model_dir) / "weights.safetensors").resolve())
    return out


def use_final_weights(model_dir: Path) -> None:
    """Replace the validation-selected weights by those of the last step.

    Peers have no model selection, and the validation images are the ones we report on:
    selecting on them would flatter our rows, so every row is scored with its final weights.
    """
    from biounet.model import UNet
    from biounet.modeldir import load_info, load_weights, save_model

    info = load_info(model_dir)
    last = model_dir / "checkpoints" / "last" / "model.safetensors"
    if not last.is_file():
        # Checkpoints are not shipped; a model whose best validation was its last step
        # already holds its final weights.
        t = info.training
        if t["last"]["step"] == t["steps_done"] and t["last"]["val_dice"] == t["best_val_dice"]:
            return
        if t.get("weights_step") == t["steps_done"]:  # this function ran on it already
            return
        raise SystemExit(f"{model_dir}: no last checkpoint, and its weights are not the final ones")
    info = info.replace(training=info.training | {"weights_step": info.training["steps_done"]})
    model = UNet(info.net)
    load_weights(model, last)
    if info.postprocess and "instances" in info.postprocess:
        # The stored post-processing was fitted to the other weights: fit it again, as
        # `biounet train` does, on the training images.
        from biounet.data import DataConfig
        from biounet.io import list_images, pair_by_stem
        from biounet.trainer import fit_postprocess

        t = info.training
        pairs = [
            pair
            for pair in pair_by_stem(list_images(Path(t["images"])), Path(t["masks"]))
            if pair[0].name in set(t["train_files"])
        ]
        data = DataConfig.from_dict(t["data_config"])
        post = fit_postprocess(model, info, pairs, data, t["train_config"]["precision"])
        info = info.replace(postprocess={**info.postprocess, "instances": post.to_dict()})
    save_model(model_dir, model, info)


def matmul_rates(n: int = 4096, repeat: int = 5, device=None) -> dict[str, float]:
    """FLOP/s of an n^3 `torch.mm` on `device` (default the CPU), by precision: fp32, and
    bf16 where the CPU has fast bf16. On a GPU (n at least 8192 there, so that one product
    is milliseconds long): bf16 where supported, fp16, and fp32 with TF32 allowed, as cuDNN
    runs fp32 convolutions by default.

    Without AVX512-BF16 or AMX, bf16 products are emulated at ~1 GFLOP/s (an AVX2 AMD EPYC:
    one 4096^3 product took over 2 minutes), so no bf16 limit is measured there: nothing
    runs bf16 on such a CPU by default.
    """
    import torch

    from biounet.precision import cpu_has_fast_bf16

    device = torch.device(device or "cpu")
    gpu = device.type == "cuda"
    n = max(n, 8192) if gpu else n
    dtypes = {"fp32": torch.float32}
    if gpu:
        dtypes["fp16"] = torch.float16
    if (gpu and torch.cuda.is_bf16_supported()) or (not gpu and cpu_has_fast_bf16()):
        dtypes["bf16"] = torch.bfloat16
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = gpu  # no effect on the CPU
    try:
        rates = {}
        for name, dtype in dtypes.items():
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            seconds = median_time(lambda a=a, b=b: torch.mm(a, b), repeat, True, gpu)
            rates[name] = 2 * n**3 / seconds
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rates


def format_rates(rates: dict[str, float]) -> str:
    """The rates as "bf16 0.84, fp32 0.21 TFLOP/s" (the precisions measured)."""
    return ", ".join(f"{k} {v / 1e12:.2f}" for k, v in sorted(rates.items())) + " TFLOP/s"


def median_time(fn, repeat: int, warmup: bool = False, sync: bool = False) -> float:
    """Median wall seconds of `repeat` calls of `fn` (after one uncounted call if `warmup`);
    `sync`: each call waits for the GPU's queued work (CUDA runs asynchronously)."""
    import torch

    def call() -> None:
        fn()
        if sync:
            torch.cuda.synchronize()

    if warmup:
        call()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_command(
    images: Path, masks: Path, val_images: Path, val_masks: Path, out: Path, minutes: float
) -> list[str]:
    """`biounet train` on a train/validation split for a wall-clock budget (add flags after).

    On the CPU, like every peer in these benchmarks: the budget is CPU minutes, also on a
    machine with a GPU (where `--device auto` would pick the GPU).
    """
    return [
        *BIOUNET, "train", "--images", str(images), "--masks", str(masks),
        "--val-images", str(val_images), "--val-masks", str(val_masks), "--out", str(out),
        "--steps", "1000000", "--max-minutes", str(minutes), "--device", "cpu",
    ]  # fmt: skip


def split_bench_args(doc: str, name: str, budget: float, rows: str) -> argparse.ArgumentParser:
    """The flags every train-and-score benchmark shares (data, out, ship, budget, rows)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path(f"runs/{name}"))
    p.add_argument(
        "--ship",
        type=Path,
        default=Path(f"runs/{name}/model_a"),
        help="where row (a) trains its model (shipped models come from bench/release.py)",
    )
    p.add_argument("--budget", type=float, default=budget, help="training minutes per row")
    p.add_argument("--rows", default=rows)
    p.add_argument("--base-channels", type=int, default=32)
    return p


def save_rows(path: Path, header: str, rows: dict, **extra) -> dict:
    """Merge `rows` into the results file at `path`, keeping earlier runs' other rows (so rows
    can be rerun one at a time); return all rows."""
    previous = json.loads(path.read_text())["rows"] if path.is_file() else {}
    merged = previous | rows
    path.write_text(json.dumps({"header": header, **extra, "rows": merged}, indent=2))
    return merged


def print_table(header: str, columns: list[tuple[str, object]], rows: dict) -> None:
    """A markdown table of `rows` (name -> result); `columns`: (title, function of a result)."""
    print(f"\n# {header}\n")
    print("| method | " + " | ".join(title for title, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(cell(r)) for _, cell in columns) + " |")
