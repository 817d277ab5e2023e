"""`biounet predict`: files in, masks, probabilities or instance labels out."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from biounet.cli.common import (
    ENGINE_ENV,
    Progress,
    add_device_flag,
    add_engine_flag,
    add_precision_flag,
    as_flags,
    data_input,
    default,
    engine_cache,
    model_path,
    say,
)
from biounet.configs import ENGINES, OUTPUTS, PredictConfig
from biounet.errors import BiounetError


def add_parser(sub) -> None:
    def d(name: str):
        return default(PredictConfig, name)

    q = sub.add_parser("predict", help="segment images with a model")
    q.add_argument("model_dir", type=Path, help="a model directory, or a shipped model's name")
    q.add_argument(
        "inputs",
        nargs="+",
        help="image files, zarr arrays or OME-Zarr images (X.zarr, X.ome.zarr: written as "
        "zarr, block by block), folders of them, or glob patterns",
    )
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument(
        "--tile",
        type=int,
        help="output tile side, snapped down to a valid size (default: the tile with the least "
        "computation per image that fits --memory-mb)",
    )
    q.add_argument("--batch-size", type=int, default=d("batch_size"), help="tiles per forward pass")
    q.add_argument(
        "--memory-mb",
        type=float,
        default=d("memory_mb"),
        help="MiB of feature maps per batch of tiles for the automatic tile size (default "
        "%(default)s; torch and the model take ~0.3-0.5 GB more)",
    )
    q.add_argument(
        "--output",
        choices=OUTPUTS,
        default=d("output"),
        help="mask: uint8 class TIFF; prob: float32 TIFF, one plane per class; instances: "
        "uint16 labels 1..N (touching cells separated as the model config says)",
    )
    q.add_argument("--overlay", action="store_true", help="also write STEM_overlay.png")
    q.add_argument(
        "--stream",
        action="store_true",
        help="read and write TIFF masks or instances tile by tile whatever their size "
        "(automatic above 16 megapixels): memory stays flat for images of any size; instances "
        "need 4 x (classes + 1) bytes per pixel of temporary disk in the output folder",
    )
    q.add_argument(
        "--instance-margin",
        type=int,
        default=d("instance_margin"),
        help="px of context around each block of 1024 px or more when instances (or the masks "
        "of a model with a stored membrane post-processing) are made block by block (streamed "
        "TIFFs, zarr, --cluster): must exceed the widest clump of touching cells "
        "(default %(default)s)",
    )
    q.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave out inputs whose outputs (and overlay, if asked) are all there: continues a "
        "killed run (outputs appear only complete)",
    )
    q.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over the 8 rotations/flips of each tile (8x slower, smoother borders); "
        "default: as the model's config says (postprocess.tta), else off",
    )
    q.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="predict block by block on dask.distributed: a running scheduler "
        "(tcp://host:8786) or local:N (start N worker processes for this run); every output "
        "is then zarr (STEM.zarr), written by the workers. Zarr inputs are predicted block by "
        "block anyway, in this process without --cluster",
    )
    add_precision_flag(q)
    add_engine_flag(q)
    add_device_flag(q)
    q.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from biounet.precision import parse_device
    from biounet.predict import predict_files

    if args.engine not in ENGINES:  # from the environment: argparse checks only flags
        raise BiounetError(
            f"${ENGINE_ENV}={args.engine!r} is not an engine: set it to one of "
            f"{', '.join(ENGINES)}, or unset it"
        )
    try:
        config = PredictConfig(
            tile=args.tile,
            batch_size=args.batch_size,
            precision=args.precision,
            output=args.output,
            overlay=args.overlay,
            tta=args.tta,
            memory_mb=args.memory_mb,
            instance_margin=args.instance_margin,
            stream=args.stream,
            skip_existing=args.skip_existing,
            blockwise=args.cluster is not None,
            engine=args.engine,
            cache=engine_cache(),
        )
    except BiounetError as exc:
        raise BiounetError(as_flags(str(exc))) from None
    progress = Progress(args)
    state = {"file": 0, "files": 1, "name": "", "t0": time.monotonic()}

    def on_file(path: Path, i: int, n: int) -> None:
        state.update(file=i, files=n, name=path.name)
        progress.update(i / n, f"{i + 1}/{n} {path.name}", force=i == 0)  # then every 30 s

    def on_tiles(done: int, total: int) -> None:
        # Files done plus the share of the current one: the ETA covers the whole run.
        fraction = (state["file"] + done / max(total, 1)) / state["files"]
        progress.update(
            fraction, f"{state['file'] + 1}/{state['files']} {state['name']} tile {done}/{total}"
        )

    skipped: list[Path] = []
    try:
        with contextlib.ExitStack() as stack:
            written = predict_files(
                model_path(args.model_dir),
                [data_input(i) for i in args.inputs],
                args.out,
                config,
                device=parse_device(args.device),
                on_file=on_file,
                progress=on_tiles,
                on_skip=skipped.append,
                connect=lambda: stack.enter_context(_scheduler(args.cluster, args.verbose)),
            )
    finally:
        progress.close()
    n_images = sum(1 for w in written if w.suffix in (".tif", ".zarr"))
    done = f" ({len(skipped)} skipped: their outputs exist)" if skipped else ""
    say(args, f"wrote {n_images} {args.output} file(s) to {args.out}{done}")
    return 0


@contextlib.contextmanager
def _scheduler(address: str | None, verbose: bool = False) -> Iterator:
    """Where dask computes block-wise predictions: this process (one task at a time, torch
    using every core), or the --cluster's workers."""
    if address is None:
        yield "synchronous"
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise BiounetError(
            "--cluster needs dask.distributed: pip install 'biounet[cluster]'"
        ) from None
    if not verbose:  # the engine's own INFO lines (workers starting, closing) stay out
        logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    if address.startswith("local:"):
        n = address.removeprefix("local:")
        if not (n.isdigit() and int(n) >= 1):
            raise BiounetError(f"--cluster local:N needs a number of workers N >= 1, not {n!r}")
        # dask runs torch single-threaded in its workers (OMP_NUM_THREADS=1), so the cores
        # are used by running one block per thread: the cores' share of each worker.
        threads = max(1, (os.cpu_count() or 1) // int(n))
        cluster = LocalCluster(
            n_workers=int(n), threads_per_worker=threads, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise BiounetError(
                f"--cluster {address}: no dask scheduler answers there ({exc.__class__.__name__}); "
                "start one (dask scheduler, dask worker ADDRESS) or use --cluster local:N"
            ) from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
