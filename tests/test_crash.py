"""Kill -9 at every place a write happens, then continue: nothing lost, nothing torn.

Training is killed (SIGKILL, via the command line's fault-injection hook) at each of its
file writes and checkpoint stages, then resumed; it must end with the weights of an
uninterrupted run, bit for bit, with one training.csv row per logged step and no temporary
files left. Prediction is killed likewise, then continued with --skip-existing.
"""

import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from biounet.cli import FAULT_ENV, main
from biounet.durable import set_fault_hook

from .conftest import write_disk_pairs

TRAIN = ["--depth", "2", "--base-channels", "4", "--tile", "28", "--steps", "6"]
TRAIN += ["--checkpoint-every", "2", "--val-every", "3", "--precision", "fp32", "--seed", "5"]
TRAIN += ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    write_disk_pairs(root / "i", root / "m", 3, (64, 72), count=4, radius=(6, 12))
    return root


def _cli(args, fault=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = str(fault)
    cmd = [sys.executable, "-m", "biounet", *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _count_fault_points(args) -> int:
    seen = []
    set_fault_hook(seen.append)
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        set_fault_hook(None)
    return len(seen)


def _leftovers(folder: Path) -> list[str]:
    names = [p.name for p in folder.rglob("*")]
    return [n for n in names if n.endswith((".part", ".tmp", ".work")) or n == ".lock"]


def test_training_survives_a_kill_at_every_write(folders, tmp_path, capsys):
    train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
    points = _count_fault_points([*train, "--out", tmp_path / "counted"])
    capsys.readouterr()
    assert points >= 30, points
    reference = tmp_path / "reference"
    assert _cli([*train, "--out", reference]).returncode == 0
    ref_weights = (reference / "weights.safetensors").read_bytes()
    ref_last = (reference / "checkpoints" / "last" / "model.safetensors").read_bytes()

    def kill_and_resume(n: int) -> tuple[int, str]:
        out = tmp_path / f"kill{n}"
        killed = _cli([*train, "--out", out], fault=n)
        if killed.returncode != -9:
            return n, f"not killed: rc {killed.returncode} {killed.stderr[-300:]}"
        resumed = _cli([*train, "--out", out, "--resume"])
        if resumed.returncode != 0:
            return n, f"resume failed: {resumed.stderr[-300:]}"
        problems = []
        if (out / "weights.safetensors").read_bytes() != ref_weights:
            problems.append("best weights differ")
        if (out / "checkpoints" / "last" / "model.safetensors").read_bytes() != ref_last:
            problems.append("last checkpoint differs")
        with (out / "training.csv").open() as f:
            steps = [int(r["step"]) for r in csv.DictReader(f)]
        if steps != [3, 6]:
            problems.append(f"training.csv steps {steps}")
        if _leftovers(out):
            problems.append(f"leftovers {_leftovers(out)}")
        return n, "; ".join(problems)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(kill_and_resume, range(1, points + 1)))
    failed = [(n, why) for n, why in results if why]
    assert failed == [], failed


def test_prediction_survives_a_kill_at_every_write(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["init", str(model), "--depth", "2", "--base-channels", "4"]) == 0
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(1)
    for k in range(5):
        iio.imwrite(images / f"{k}.png", rng.integers(0, 255, (40, 50)).astype(np.uint8))
    tifffile.imwrite(images / "big.tif", rng.integers(0, 255, (70, 90)).astype(np.uint8))
    capsys.readouterr()
    predict = ["predict", model, images, "--overlay", "--tile", "16", "--precision", "fp32"]
    stream = ["predict", model, images / "big.tif", "--stream", "--output", "instances"]
    stream += ["--instance-margin", "40", "--tile", "16", "--precision", "fp32"]
    runs = {"folder": predict, "stream": stream}
    references = {}
    for name, args in runs.items():
        assert _cli([*args, "--out", tmp_path / f"ref-{name}"]).returncode == 0
        references[name] = {p.name: p.read_bytes() for p in (tmp_path / f"ref-{name}").iterdir()}
    cases = [("folder", n) for n in range(1, 12)] + [("stream", n) for n in range(1, 4)]

    def kill_and_continue(case) -> str:
        name, n = case
        out = tmp_path / f"{name}-kill{n}"
        killed = _cli([*runs[name], "--out", out], fault=n)
        if killed.returncode != -9:
            return f"{case}: not killed (rc {killed.returncode})"
        again = _cli([*runs[name], "--out", out, "--skip-existing"])
        if again.returncode != 0:
            return f"{case}: continuing failed: {again.stderr[-300:]}"
        found = {p.name: p.read_bytes() for p in out.iterdir()}
        if found != references[name]:
            return f"{case}: outputs differ ({sorted(found)} vs {sorted(references[name])})"
        if name == "folder" and n > 2 and "skipped" not in again.stdout:
            return f"{case}: nothing was skipped: {again.stdout}"
        return ""

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [why for why in pool.map(kill_and_continue, cases) if why]
    assert failed == [], failed


def test_a_second_training_into_a_locked_directory_is_refused(folders, tmp_path, capsys):
    import json
    import socket

    out = tmp_path / "m"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid}
        (out / ".lock").write_text(json.dumps(lock))
        train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
        assert main([str(a) for a in [*train, "--out", out]]) == 2
        err = capsys.readouterr().err
        assert f"another training is writing this model directory (process {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale lock is taken over, and released at the end.
    assert main([str(a) for a in [*train, "--out", out]]) == 0
    assert not (out / ".lock").exists()


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    import socket

    from biounet.durable import remove_leftovers, temp_prefix

    host = socket.gethostname().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    (tmp_path / f".a.tif.{host}-{pid}.x1y2z3.part").write_text("torn")
    (tmp_path / f".b.tif.{host}-{pid}.q9w8e7.work").mkdir()
    mine = tmp_path / f"{temp_prefix('c.tif')}k5j4h3.part"  # a live writer's: this process
    mine.write_text("in progress")
    (tmp_path / f".d.tif.otherhost-{pid}.r1t2y3.part").write_text("another host's")
    (tmp_path / ".notes.part").write_text("not ours")
    (tmp_path / "e.tif").write_text("an output")
    assert remove_leftovers(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, f".d.tif.otherhost-{pid}.r1t2y3.part", ".notes.part", "e.tif"]
    )


def test_a_checkpoint_of_the_older_layout_resumes(folders, tmp_path, capsys):
    """Before step-N folders, the checkpoint was a plain checkpoints/last/ folder."""
    train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
    assert main([str(a) for a in [*train, "--out", tmp_path / "ref"]]) == 0
    out = tmp_path / "old"
    assert main([str(a) for a in [*train, "--out", out, "--steps", "4"]]) == 0
    root = out / "checkpoints"
    target = (root / "last").resolve()
    (root / "last").unlink()
    target.rename(root / "last")  # the older layout: a real folder, no step-N
    assert main([str(a) for a in [*train, "--out", out, "--resume"]]) == 0
    capsys.readouterr()
    assert (root / "last").is_symlink()
    assert sorted(p.name for p in root.iterdir()) == ["last", "step-000000006"]
    ref = (tmp_path / "ref" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert (root / "last" / "model.safetensors").read_bytes() == ref


def test_skip_existing_redoes_outputs_of_another_kind(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["init", str(model), "--depth", "2", "--base-channels", "4"]) == 0
    iio.imwrite(tmp_path / "a.png", np.zeros((30, 30), np.uint8))
    base = ["predict", model, tmp_path / "a.png", "--out", tmp_path / "o", "--skip-existing"]
    assert main([str(a) for a in base]) == 0  # a mask
    assert main([str(a) for a in [*base, "--output", "prob"]]) == 0
    assert "skipped" not in capsys.readouterr().out  # the mask is no probability map
    assert tifffile.imread(tmp_path / "o" / "a.tif").dtype == np.float32


def test_resume_into_a_folder_without_a_training_is_refused(folders, tmp_path, capsys):
    train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
    assert main([str(a) for a in [*train, "--out", tmp_path / "typo", "--resume"]]) == 2
    assert "no training to resume here" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_fine_tuning_in_place_starts_its_own_checkpoints(folders, tmp_path, capsys):
    train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
    out = tmp_path / "m"
    assert main([str(a) for a in [*train, "--out", out]]) == 0
    again = [*train, "--out", out, "--init", out, "--steps", "2"]
    assert main([str(a) for a in again]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "step-000000002"]
    with (out / "training.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2]


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(folders, tmp_path):
    train = ["train", "--images", folders / "i", "--masks", folders / "m", *TRAIN]
    assert _cli([*train, "--out", tmp_path / "ref"]).returncode == 0
    out = tmp_path / "m"
    stopped = _cli([*train, "--out", out], fault="20:INT")  # in the middle of the run
    assert stopped.returncode == 130, stopped.stderr
    assert "stopping after this step" in stopped.stderr
    assert _cli([*train, "--out", out, "--resume"]).returncode == 0
    ref = (tmp_path / "ref" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert (out / "checkpoints" / "last" / "model.safetensors").read_bytes() == ref
    assert (out / "weights.safetensors").read_bytes() == (
        tmp_path / "ref" / "weights.safetensors"
    ).read_bytes()
