"""The inference engines: which one `auto` picks, each one's outputs against torch fp32, the
cache of converted graphs, and what a prediction's files say about the engine."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import tifffile
import torch

import biounet
import biounet.runtimes as rt
from biounet.architecture import UNetConfig
from biounet.cli import main
from biounet.errors import BiounetError
from biounet.export import TOLERANCE
from biounet.inference import Engine
from biounet.model import UNet
from biounet.modeldir import ModelInfo, save_model

from .conftest import concurrent_matches_alone

pytestmark = pytest.mark.runtimes
CPU = torch.device("cpu")
RUNTIMES = [e for e in ("openvino", "onnxruntime") if e in rt.installed()]
NNPACK = ["nnpack"] if "nnpack" in rt.installed() else []  # in PyTorch's x86 and ARM builds
needs_runtimes = pytest.mark.skipif(
    len(RUNTIMES) < 2, reason="needs biounet[openvino] and biounet[onnxruntime] (make test)"
)


def _net(seed: int = 0, **fields) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(depth=2, base_channels=8, **fields)).eval()


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU of a given class with given runtimes installed."""

    def make(cls: str, ready: tuple[str, ...]):
        monkeypatch.setattr(rt, "cpu_class", lambda: cls)
        monkeypatch.setattr(rt, "installed", lambda: ready)
        monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: cls != "avx2")
        monkeypatch.setattr("biounet.precision.cpu_has_fast_bf16", lambda: cls != "avx2")

    return make


def test_auto_follows_the_table(cpu):
    both = ("torch", "openvino", "onnxruntime")
    cpu("avx512_bf16", both)
    assert rt.choose("auto", "auto", CPU) == ("openvino", "bf16")
    assert rt.choose("auto", "fp32", CPU) == ("openvino", "fp32")
    cpu("amx", both)
    assert rt.choose("auto", "auto", CPU) == ("openvino", "bf16")
    assert rt.choose("auto", "fp32", CPU) == ("onnxruntime", "fp32")
    cpu("amx", ("torch", "onnxruntime"))  # no fast bf16 engine but torch
    assert rt.choose("auto", "auto", CPU) == ("torch", "bf16")
    cpu("avx2", ("torch", "nnpack", "openvino", "onnxruntime"))
    assert rt.choose("auto", "auto", CPU) == ("nnpack", "fp32")
    paper, shipped = UNetConfig(base_channels=64), UNetConfig(base_channels=32)
    assert rt.choose("auto", "auto", CPU, paper) == ("nnpack", "fp32")
    assert rt.choose("auto", "auto", CPU, shipped) == ("openvino", "fp32")  # too narrow
    assert rt.choose("nnpack", "auto", CPU, shipped) == ("nnpack", "fp32")  # asked for
    cpu("avx2", ("torch", "nnpack"))
    assert rt.choose("auto", "auto", CPU, shipped) == ("torch", "fp32")
    cpu("avx512_bf16", ("torch", "nnpack", "openvino", "onnxruntime"))  # not measured there
    assert rt.choose("auto", "fp32", CPU) == ("openvino", "fp32")
    cpu("avx2", both)
    assert rt.choose("auto", "auto", CPU) == ("openvino", "fp32")
    cpu("avx2", ("torch", "onnxruntime"))
    assert rt.choose("auto", "auto", CPU) == ("onnxruntime", "fp32")
    cpu("avx2", ("torch",))  # nothing installed: torch
    assert rt.choose("auto", "auto", CPU) == ("torch", "fp32")
    cpu("avx512_bf16", both)
    assert rt.choose("auto", "fp32", torch.device("cuda")) == ("torch", "fp32")  # GPUs: torch


def test_cpu_classes_by_capability(monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    for capability, cls in [("AVX2", "avx2"), ("AVX512", "avx512"), ("DEFAULT", "other"),
                            ("SVE256", "other")]:  # fmt: skip
        monkeypatch.setattr(rt, "cpu_capability", lambda c=capability: c)
        assert rt.cpu_class() == cls
        assert ("nnpack" in rt.FASTEST[(cls, "fp32")]) == (cls == "avx2")  # measured there only


def test_auto_engine_weighs_the_width_and_falls_back(cpu, monkeypatch, caplog):
    """An Engine asks `choose` with its network: nnpack for wide networks, not narrow ones;
    where nnpack fails its check under auto, the next engine runs and says so."""
    cpu("avx2", ("torch", "nnpack"))
    narrow = UNet(UNetConfig(depth=1, base_channels=8))
    assert Engine(narrow, CPU, "auto", engine="auto").runtime == "torch"

    def broken(net):
        raise BiounetError("engine nnpack: this PyTorch's NNPACK gives results that differ")

    monkeypatch.setattr("biounet.inference.winograd_forward", broken)
    wide = UNet(UNetConfig(depth=1, base_channels=48))
    engine = Engine(wide, CPU, "auto", engine="auto")
    assert engine.runtime == "torch" and engine.describe() == "engine torch, fp32, cpu"
    assert any("predicting with the next engine" in r.getMessage() for r in caplog.records)
    with pytest.raises(BiounetError, match="differ"):
        Engine(wide, CPU, "auto", engine="nnpack")
    monkeypatch.setattr("biounet.inference.winograd_forward", lambda net: lambda x: x)
    assert Engine(wide, CPU, "auto", engine="auto").runtime == "nnpack"


def test_engines_refuse_what_they_cannot_run(cpu, caplog):
    cpu("avx512_bf16", ("torch", "openvino", "onnxruntime"))
    assert rt.choose("onnxruntime", "auto", CPU) == ("onnxruntime", "fp32")
    with pytest.raises(BiounetError, match="onnxruntime runs fp32 on the CPU, not bf16"):
        rt.choose("onnxruntime", "bf16", CPU)
    with pytest.raises(BiounetError, match="engine openvino runs on the CPU"):
        rt.choose("openvino", "fp32", torch.device("cuda"))
    with pytest.raises(BiounetError, match="engine must be one of"):
        rt.choose("tensorrt", "auto", CPU)
    cpu("avx2", ("torch", "openvino"))
    with pytest.raises(BiounetError, match="bf16 only on CPUs with AVX512-BF16 or AMX"):
        rt.choose("openvino", "bf16", CPU)
    assert not caplog.records  # the error alone, no warning of slow bf16 before it
    with pytest.raises(BiounetError, match=r"pip install 'biounet\[onnxruntime\]'"):
        rt.choose("onnxruntime", "auto", CPU)
    with pytest.raises(BiounetError, match="engine nnpack needs a PyTorch build with NNPACK"):
        rt.choose("nnpack", "auto", CPU)
    cpu("avx512_bf16", ("torch", "nnpack"))
    assert rt.choose("nnpack", "auto", CPU) == ("nnpack", "fp32")  # auto: its one precision
    with pytest.raises(BiounetError, match="nnpack runs fp32 on the CPU, not bf16"):
        rt.choose("nnpack", "bf16", CPU)
    with pytest.raises(BiounetError, match="engine nnpack runs on the CPU"):
        rt.choose("nnpack", "fp32", torch.device("cuda"))


@pytest.mark.parametrize("engine", ["nnpack", "openvino", "onnxruntime"])
def test_each_engine_equals_torch_fp32(engine, tmp_path):
    """Tiled logits of odd-sized images, at fp32: within the export tolerance of torch."""
    if engine not in RUNTIMES + NNPACK:
        pytest.skip(f"engine {engine} is not installed (make test installs every engine)")
    net = _net(1, in_channels=2, num_classes=3)
    image = np.random.default_rng(0).random((2, 157, 203), dtype=np.float32)
    want = Engine(net, CPU, "fp32").logits(image)
    got = Engine(net, CPU, "fp32", engine=engine, cache=tmp_path).logits(image)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())


@needs_runtimes
def test_converted_once_then_loaded(tmp_path, caplog):
    net = _net(2)
    image = np.random.default_rng(1).random((1, 120, 120), dtype=np.float32)
    with caplog.at_level(logging.INFO, logger="biounet.runtimes"):
        first = Engine(net, CPU, "fp32", engine="openvino", cache=tmp_path).logits(image)
        entries = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        again = Engine(net, CPU, "fp32", engine="openvino", cache=tmp_path).logits(image)
    said = [r.getMessage() for r in caplog.records]
    assert sum("graph converted" in m for m in said) == 1
    assert sum("graph loaded" in m for m in said) == 1
    assert np.array_equal(first, again)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == entries
    assert len(list((tmp_path / "openvino").iterdir())) == 1  # one entry, no leftovers
    # A converter killed mid-way leaves its temporary folder: the next conversion removes it.
    host = __import__("socket").gethostname().split(".")[0]
    killed = tmp_path / "openvino" / f".abc.{host}-999999999.x1.part"
    killed.mkdir()
    # Other weights, another entry: a cache never answers for a different network.
    Engine(_net(3), CPU, "fp32", engine="openvino", cache=tmp_path).logits(image)
    assert len(list((tmp_path / "openvino").iterdir())) == 2
    assert not killed.exists()


@needs_runtimes
def test_damaged_or_unwritable_cache(tmp_path, caplog):
    net = _net(4)
    image = np.random.default_rng(2).random((1, 100, 140), dtype=np.float32)
    want = Engine(net, CPU, "fp32").logits(image)
    cache = tmp_path / "cache"
    Engine(net, CPU, "fp32", engine="openvino", cache=cache).logits(image)
    (entry,) = (cache / "openvino").iterdir()
    for damage in ("xml", "bin", "one weight", "seal", "folder"):
        if damage == "xml":
            (entry / "model.xml").write_text("<not a graph")
        elif damage == "bin":  # weights cut: a graph that loads and computes something else
            weights = np.fromfile(entry / "model.bin", np.float32)
            (weights[::7] * 3 + 1).tofile(entry / "model.bin")
        elif damage == "one weight":  # same size, one value changed
            weights = np.fromfile(entry / "model.bin", np.float32)
            weights[len(weights) // 2] += 1
            weights.tofile(entry / "model.bin")
        elif damage == "seal":  # the checksums themselves gone
            (entry / "sha256.json").unlink()
        else:  # something that is not a plain file
            (entry / "extra").mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="biounet.runtimes"):
            got = Engine(net, CPU, "fp32", engine="openvino", cache=cache).logits(image)
        assert "converting again" in caplog.text, damage
        assert np.abs(got - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())
    # A cache that cannot be written: converted for this run only, nothing left anywhere.
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biounet.runtimes"):
        got = Engine(net, CPU, "fp32", engine="onnxruntime", cache=blocked / "c").logits(image)
    assert "converting for this run only" in caplog.text
    assert np.abs(got - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())
    assert blocked.read_text() == "in the way"


@needs_runtimes
def test_processes_converting_at_once_share_one_entry(tmp_path):
    """Two models of one network, predicting at once in one process into one empty cache:
    one converts, the other loads its entry; both compute the right thing, one entry stays.
    (Processes meet at the rename into place, `_keep`.)"""
    net = _net(9)
    image = np.random.default_rng(4).random((1, 120, 150), dtype=np.float32)
    want = Engine(net, CPU, "fp32").logits(image)
    got = [None, None]

    def run(k):
        got[k] = Engine(net, CPU, "fp32", engine="openvino", cache=tmp_path).logits(image)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        assert np.abs(g - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())
    assert len(list((tmp_path / "openvino").iterdir())) == 1


@needs_runtimes
def test_a_conversion_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    net = _net(5)
    other = _net(6)

    def convert_other(self, folder):  # as if the runtime had mistranslated the graph
        import openvino

        from biounet.export import check_exported

        example = torch.zeros(1, 1, 140, 140)
        model = openvino.convert_model(other, example_input=example)
        openvino.save_model(model, str(folder / self.FILE))
        self.load(folder)
        check_exported(self.net, lambda x: self._compile(x.shape, "fp32")(x)[0], "OpenVINO")

    monkeypatch.setattr(rt._OpenVino, "convert", convert_other)
    engine = Engine(net, CPU, "fp32", engine="openvino", cache=tmp_path)
    for _ in range(2):  # refused again, without converting again
        with pytest.raises(BiounetError, match="OpenVINO export differs from the network"):
            engine.logits(np.zeros((1, 140, 140), np.float32))
    assert not any((tmp_path / "openvino").iterdir())  # nothing kept


@needs_runtimes
def test_concurrent_predictions_agree(tmp_path):
    net = _net(7)
    save_model(tmp_path / "m", net, ModelInfo(net.config, ("background", "cell")))
    model = biounet.load(tmp_path / "m", engine="openvino", precision="fp32", cache=tmp_path)
    assert concurrent_matches_alone(model)
    assert model.engine == "openvino" and "engine='openvino'" in repr(model)


@needs_runtimes
def test_cli_engine_flag_and_what_the_file_says(tmp_path, monkeypatch, capsys):
    net = _net(8)
    save_model(tmp_path / "m", net, ModelInfo(net.config, ("background", "cell")))
    image = (np.random.default_rng(3).random((130, 150)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image)
    monkeypatch.setenv("BIOUNET_CACHE", str(tmp_path / "cache"))
    masks = {}
    engines = ("torch", *NNPACK, "openvino", "onnxruntime")
    for engine in engines:
        out = tmp_path / engine
        args = ["predict", str(tmp_path / "m"), str(tmp_path / "a.tif"), "--out", str(out)]
        assert main([*args, "--engine", engine, "--precision", "fp32"]) == 0
        with tifffile.TiffFile(out / "a.tif") as tif:
            assert f"engine {engine}, fp32, cpu" in tif.pages[0].tags["Software"].value
            masks[engine] = tif.asarray()
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"openvino", "onnxruntime"}
    for engine in engines[1:]:
        assert (masks[engine] == masks["torch"]).mean() >= 0.999
    monkeypatch.setenv("BIOUNET_ENGINE", "fastest")
    capsys.readouterr()
    args = ["predict", str(tmp_path / "m"), str(tmp_path / "a.tif"), "--out", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "biounet: error: $BIOUNET_ENGINE='fastest' is not an engine: set it to one of auto, "
        "torch, nnpack, openvino, onnxruntime, or unset it"
    ]
    assert not (tmp_path / "x").exists()


# -- the accuracy guard: the shipped models on real images -----------------------------------


def _engines_auto_may_pick() -> list[tuple[str, str]]:
    """Every (engine, precision) of `FASTEST` this machine runs, torch's aside."""
    fast_bf16 = rt.cpu_has_fast_bf16()
    pairs = {(e, p) for ranked in rt.FASTEST.values() for e in ranked for p in ("fp32", "bf16")}
    return sorted(
        (e, p)
        for e, p in pairs
        if e in RUNTIMES + NNPACK and p in rt.PRECISIONS[e] and (p == "fp32" or fast_bf16)
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@needs_runtimes
def test_isbi_masks_agree_with_torch_fp32(shared_data, cache):
    """All 30 ISBI 2012 test slices: each engine's mask equals torch fp32's on >= 99.9 % of
    the pixels (of each slice, not only pooled)."""
    import imageio.v3 as iio

    slices = sorted((shared_data / "isbi2012" / "test_images").glob("*.png"))
    assert len(slices) == 30
    images = [iio.imread(p) for p in slices]
    ref = biounet.load("isbi2012", engine="torch", precision="fp32")
    # Without the model's stored TTA: the engines differ in the network alone, and 8 views of
    # 30 slices per engine would cost minutes for the same comparison.
    want = [ref.predict(im, tta=False) for im in images]
    for engine, precision in _engines_auto_may_pick():
        model = biounet.load("isbi2012", engine=engine, precision=precision, cache=cache)
        agree = [float((model.predict(im, tta=False) == w).mean())
                 for im, w in zip(images, want, strict=True)]  # fmt: skip
        assert min(agree) >= 0.999, (engine, precision, min(agree))


@needs_runtimes
def test_bbbc039_instances_score_as_torch_fp32(shared_data, cache):
    """BBBC039 (every third of the 100 images): each engine's instance AP at IoU 0.5 and mean
    AP over 0.5:0.95 within 0.005 of torch fp32's, against the true instance masks."""
    import imageio.v3 as iio

    from biounet.metrics_instances import instance_scores, pool_instance_scores

    names = sorted((shared_data / "bbbc039" / "images").glob("*.tif"))[::3]
    pairs = [
        (iio.imread(p), iio.imread(shared_data / "bbbc039" / "masks" / f"{p.stem}.png"))
        for p in names
    ]

    def scores(model) -> tuple[float, float]:
        results = []
        for image, truth in pairs:
            labels = model.predict(image, "instances")
            results.append(instance_scores(labels, truth))
        pooled = pool_instance_scores(results)
        return pooled["ap"][0], pooled["mean_ap"]

    ap50, mean_ap = scores(biounet.load("bbbc039", engine="torch", precision="fp32"))
    assert ap50 > 0.8  # the model works on these images at all
    for engine, precision in _engines_auto_may_pick():
        model = biounet.load("bbbc039", engine=engine, precision=precision, cache=cache)
        got50, got_mean = scores(model)
        assert abs(got50 - ap50) <= 0.005 and abs(got_mean - mean_ap) <= 0.005, (
            engine, precision, got50, ap50, got_mean, mean_ap,
        )  # fmt: skip


def test_keep_leaves_a_faster_process_entry(tmp_path):
    first, mine = tmp_path / "entry", tmp_path / ".entry-mine"
    first.mkdir()
    (first / "model.xml").write_text("theirs")
    mine.mkdir()
    (mine / "model.xml").write_text("mine")
    rt._keep(mine, first)  # no error: the same graph is there already
    assert (first / "model.xml").read_text() == "theirs"


def test_a_worker_without_the_chosen_engine_says_so(monkeypatch):
    from biounet.graph import NetSpec, _engine

    net = _net(10)
    info = ModelInfo(net.config, ("background", "cell"))
    client = Engine(net, CPU, "fp32")
    spec = NetSpec.of(net, info, client, "relative/cache")
    assert spec.cache.startswith("/")  # the client's folder, whatever the workers' cwd
    spec = NetSpec(**{**spec.__dict__, "engine": "openvino", "digest": "other"})
    monkeypatch.setattr(rt, "installed", lambda: ("torch",))
    with pytest.raises(BiounetError, match="this dask worker cannot run what the client chose"):
        _engine(spec)


@needs_runtimes
def test_the_cache_key_follows_the_code_the_graph_is_traced_from(monkeypatch):
    # A development checkout changes the model's code without a new version number: an entry
    # converted before must not answer for it.
    net = _net(5)
    before = rt.digest(net, "openvino")
    assert rt.digest(net, "openvino") == before
    source = rt.inspect.getsource

    def edited(module):
        return source(module) + ("\n# edited" if module.__name__ == "biounet.model" else "")

    monkeypatch.setattr(rt.inspect, "getsource", edited)
    assert rt.digest(net, "openvino") != before
