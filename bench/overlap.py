"""The tile loop's three threads against the same code in one thread, file to file.

`biounet.tiling.tile_outputs` reads and normalises the next windows, runs the forward pass
and hands the previous outputs to the caller in three threads (`biounet.ahead`). This runs
`biounet predict --stream` on a zlib-tiled synthetic TIFF in child processes, alternately as
shipped and with `biounet.tiling.ahead` replaced by a plain iterator (everything in one
thread), after a first run that converts the network into a fresh cache; it prints each
pair's wall times and peak RSS and the median ratio.

Usage:  .venv/bin/python bench/overlap.py [--model models/isbi2012] [--size 4096] [--pairs 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import network_only
from memory import write_synthetic
from throughput import run_child


def child(mode: str, argv: list[str]) -> None:
    import biounet.tiling
    from biounet.cli import main

    if mode == "one-thread":
        biounet.tiling.ahead = lambda items, **_: iter(items)
    raise SystemExit(main(argv))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/isbi2012")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=4)
    args = p.parse_args()
    print(f"# {time.strftime('%F %H:%M')}, {platform.machine()}, model {args.model}, "
          f"{args.size} x {args.size} zlib-tiled uint8, --stream, engine auto")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.tif"
        write_synthetic(image, args.size)
        env = {"BIOUNET_CACHE": str(Path(tmp) / "cache")}  # on top of this environment
        model = str(network_only(args.model, Path(tmp)))  # the network's tiles, no stored TTA

        def predict(mode: str) -> tuple[float, float]:
            argv = ["predict", model, str(image), "--out", str(Path(tmp) / mode),
                    "--stream", "--device", "cpu"]  # fmt: skip
            return run_child([sys.executable, __file__, "--child", mode, *argv], env)

        predict("threads")  # converts into the cache
        ratios = []
        print("| pair | three threads s | one thread s | ratio | peak RSS MB (three / one) |")
        print("|---|---|---|---|---|")
        for i in range(args.pairs):
            (a, ra), (b, rb) = predict("threads"), predict("one-thread")
            ratios.append(a / b)
            print(f"| {i + 1} | {a:.2f} | {b:.2f} | {a / b:.3f} | {ra:.0f} / {rb:.0f} |",
                  flush=True)  # fmt: skip
        print(f"median ratio (three threads / one thread): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
