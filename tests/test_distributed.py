"""Data-parallel training (torchrun, gloo on CPU) trains the model one process trains.

N processes at ``--batch-size B`` split the global batch one process at ``N * B`` draws, so
their weights agree with it to float32 rounding, the Dice term, dropout and resume included.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from biounet.cli import FAULT_ENV, main
from biounet.distributed import World, world_from_environ
from biounet.durable import set_fault_hook
from biounet.errors import BiounetError
from biounet.losses import soft_dice_loss

from .conftest import write_disk_pairs

TRAIN = ["--depth", "2", "--base-channels", "8", "--tile", "36", "--steps", "4"]
TRAIN += ["--precision", "fp32", "--val-every", "2", "--checkpoint-every", "2"]
TRAIN += ["--dice", "0.5", "--dropout", "0.3", "--seed", "3", "--device", "cpu"]
LAUNCH = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Instance masks, so the post-processing fit (rank 0 only) runs too."""
    root = tmp_path_factory.mktemp("ddp")
    write_disk_pairs(root / "i", root / "m", 4, (96, 120), instances=True)
    return root


def _env(fault=None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core machine
    if fault is not None:
        env[FAULT_ENV] = str(fault)
    return env


def _torchrun(args, processes=2, fault=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(processes), "-m", "biounet", *map(str, args)]
    return subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300)


def _said(done: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: its start (where it went wrong) and its end (torchrun's
    report); the middle of a long log says little."""
    err = done.stderr
    return err if len(err) <= 4000 else f"{err[:2500]}\n[...]\n{err[-1500:]}"


def _train(folders, out, batch, extra=()):
    return ["train", "--images", folders / "i", "--masks", folders / "m", "--out", out,
            "--batch-size", batch, *TRAIN, *extra]  # fmt: skip


def _gap(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """One process at --batch-size 2, and two processes at 1 (uninterrupted)."""
    root = tmp_path_factory.mktemp("runs")
    one = root / "one"
    assert main([str(a) for a in _train(folders, one, 2)]) == 0
    two = root / "two"
    done = _torchrun(_train(folders, two, 1))
    assert done.returncode == 0, _said(done)
    return one, two, done


def test_two_processes_train_the_one_process_model(reference):
    one, two, done = reference
    assert _gap(one, two) <= 1e-5
    config = json.loads((two / "config.json").read_text())
    assert config["training"]["processes"] == 2
    assert config["training"]["train_config"]["batch_size"] == 2  # the global batch
    assert config["postprocess"]["instances"]["seed_threshold"] > 0  # fitted by rank 0
    # Rank 0 alone reports: one closing line, one progress line per validation.
    assert done.stdout.count("trained 4 steps") == 1
    assert done.stderr.count("step 4/4") == 1
    rows = (two / "training.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "2", "4"]


def _kill_point(folders, tmp_path, name: str) -> int:
    """The number of the fault point `name` in rank 0 (whose writes are one process's)."""
    seen = []
    set_fault_hook(seen.append)
    try:
        assert main([str(a) for a in _train(folders, tmp_path / "count", 2)]) == 0
    finally:
        set_fault_hook(None)
    return seen.index(name) + 1


def test_killed_and_resumed_equals_uninterrupted(folders, reference, tmp_path):
    _, two, _ = reference
    at = _kill_point(folders, tmp_path, "checkpoint step-000000002 in place")
    out = tmp_path / "killed"
    killed = _torchrun(_train(folders, out, 1), fault=at)
    assert killed.returncode != 0
    assert "SIGKILL at checkpoint step-000000002 in place" in killed.stderr
    resume = ["train", "--images", folders / "i", "--masks", folders / "m", "--out", out]
    done = _torchrun([*resume, "--resume"])
    assert done.returncode == 0, _said(done)
    assert _gap(out, two) == 0.0  # the same processes: bit for bit
    rows = (out / "training.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "2", "4"]


def test_resume_in_another_number_of_processes(folders, reference, tmp_path):
    _, two, _ = reference
    at = _kill_point(folders, tmp_path, "checkpoint step-000000002 in place")
    out = tmp_path / "killed"
    assert _torchrun(_train(folders, out, 1), fault=at).returncode != 0
    resume = ["train", "--images", folders / "i", "--masks", folders / "m", "--out", out]
    assert main([str(a) for a in [*resume, "--resume"]]) == 0  # the global batch, in one
    assert _gap(out, two) <= 1e-5


def test_time_budget_and_cosine_schedule_keep_one_model(folders, tmp_path):
    """The learning rate follows rank 0's clock: the processes' weights stay equal (checked
    by the loop at every checkpoint) while the budget, not the steps, ends the run."""
    flags = ["--lr-schedule", "cosine", "--max-minutes", "0.03", "--steps", "100000",
             "--checkpoint-every", "3"]  # fmt: skip
    done = _torchrun(_train(folders, tmp_path / "budget", 1, flags))
    assert done.returncode == 0, _said(done)
    assert "drifted apart" not in done.stderr
    steps = json.loads((tmp_path / "budget" / "config.json").read_text())["training"]
    assert 3 < steps["steps_done"] < 100000


def test_refused_in_one_line(folders, tmp_path):
    # A global batch of 3 tiles cannot be split over 2 processes.
    odd = tmp_path / "odd"
    assert main([str(a) for a in _train(folders, odd, 3, ["--steps", "2"])]) == 0
    resume = ["train", "--images", folders / "i", "--masks", folders / "m", "--out", odd]
    done = _torchrun([*resume, "--resume", "--steps", "4"])
    assert done.returncode != 0  # torchrun's own (exit 1, and its report) for our exit 2
    assert "biounet: error: a step's 3 tile(s) cannot be split evenly over 2 processes" in (
        done.stderr
    )
    assert "biounet: error (rank 1): a step's 3" in done.stderr
    assert "/biounet/" not in done.stderr  # no traceback through our code
    # Batch norm would need SyncBatchNorm, which torch runs on GPUs only.
    bn = _torchrun(_train(folders, tmp_path / "bn", 1, ["--batch-norm"]))
    assert bn.returncode != 0
    assert "SyncBatchNorm" in bn.stderr and "/biounet/" not in bn.stderr
    assert not (tmp_path / "bn" / "weights.safetensors").exists()


SCRIPT = """
import sys, numpy as np, biounet
from safetensors.numpy import save_file
from tests.conftest import disks, disk_image
rng = np.random.default_rng(1)
masks = [disks((80, 96), rng) for _ in range(3)]
images = [disk_image(m, rng) for m in masks]
model = biounet.train(images, [m > 0 for m in masks], steps=3, depth=2, base_channels=8,
                      tile=36, precision="fp32", batch_size=int(sys.argv[2]), dice=0.5,
                      seed=4, val_every=3, device="cpu")
import os
rank = os.environ.get("RANK", "solo")
save_file({k: v.numpy() for k, v in model._net.state_dict().items()},
          f"{sys.argv[1]}/{rank}.safetensors")
"""


def test_python_api_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    repo = Path(__file__).resolve().parents[1]
    env = _env() | {"PYTHONPATH": str(repo)}
    solo = [sys.executable, str(script), str(tmp_path), "2"]
    assert subprocess.run(solo, env=env, timeout=300).returncode == 0
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), str(tmp_path), "1"]  # fmt: skip
    done = subprocess.run(ddp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _said(done)
    weights = {n: load_file(tmp_path / f"{n}.safetensors") for n in ("solo", "0", "1")}
    for k, v in weights["solo"].items():
        assert np.array_equal(weights["0"][k], weights["1"][k])  # every rank returns one model
        assert np.abs(weights["0"][k] - v).max() <= 1e-5


def test_pooled_dice_gradient_is_the_global_one():
    """Each part's gradient of the pooled Dice, summed over parts, is the full batch's."""
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 10, 12, generator=rng, requires_grad=True)
    target = torch.randint(0, 3, (4, 10, 12), generator=rng)
    weight = (torch.rand(4, 10, 12, generator=rng) > 0.1).float()
    full = soft_dice_loss(logits, target, weight)
    (want,) = torch.autograd.grad(full, logits)
    parts = [slice(0, 2), slice(2, 4)]
    sums = []
    for p in parts:  # each part's own sums, as the other processes would contribute them
        with torch.no_grad():
            soft_dice_loss(logits[p], target[p], weight[p], pool=lambda t: sums.append(t) or t)
    got = torch.zeros_like(logits)
    for k, p in enumerate(parts):
        others = sums[1 - k]
        value = soft_dice_loss(logits[p], target[p], weight[p], pool=lambda t, o=others: t + o)
        assert torch.allclose(value, full, atol=1e-6)
        (g,) = torch.autograd.grad(value, logits)
        got += g
    assert torch.allclose(got, want, atol=1e-7)


def test_world_from_environ():
    assert world_from_environ({}) == World()
    assert world_from_environ({"WORLD_SIZE": "1"}) == World()
    full = LAUNCH | {"MASTER_PORT": "29500"}
    assert world_from_environ(full) == World(rank=1, size=2, local_rank=1)
    with pytest.raises(BiounetError, match="MASTER_PORT not set"):
        world_from_environ(LAUNCH)
    with pytest.raises(BiounetError, match="must be integers"):
        world_from_environ(full | {"RANK": "one"})
    with pytest.raises(BiounetError, match="do not fit"):
        world_from_environ(full | {"RANK": "2"})
