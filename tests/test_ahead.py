"""The background stages of the tile loop: order, bounded look-ahead, errors, early stops."""

import threading
import time

import numpy as np
import pytest
import torch

from biounet.ahead import ahead
from biounet.architecture import UNetConfig
from biounet.errors import BiounetError
from biounet.model import UNet
from biounet.tiling import model_forward, plan_tiles, tile_outputs


def _ours() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("biounet-")]


def test_items_come_in_order_and_the_producer_runs_at_most_depth_ahead():
    made = []

    def produce():
        for i in range(20):
            made.append(i)
            yield i

    got = []
    for item in ahead(produce(), depth=2):
        time.sleep(0.01)  # a slow consumer: the producer must wait, not run to the end
        assert len(made) - len(got) <= 2 + 2  # waiting (depth), handed over, being made
        got.append(item)
    assert got == list(range(20))
    assert not _ours()


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    def produce():
        yield 1
        yield 2
        raise BiounetError("image.tif: cannot be read")

    got = []
    with pytest.raises(BiounetError, match="image.tif: cannot be read"):
        for item in ahead(produce()):
            got.append(item)
    assert got == [1, 2]
    assert not _ours()


def test_a_consumer_that_stops_early_stops_and_closes_the_producer():
    closed = threading.Event()

    def produce():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    for item in ahead(produce(), name="biounet-test"):
        if item == 3:
            break
    assert closed.is_set()  # the generator's clean-up ran in its thread, and it ended
    assert not _ours()
    with pytest.raises(ValueError, match="depth"):
        next(ahead(iter([1]), depth=0))
    with pytest.raises(TypeError):  # not iterable: raised here, not a consumer waiting forever
        next(ahead(42))


def test_tile_loop_errors_and_early_stops_leave_no_thread():
    torch.manual_seed(0)
    net = UNetConfig(depth=2, base_channels=4)
    forward = model_forward(UNet(net))
    image = np.random.default_rng(0).random((1, 150, 170), dtype=np.float32)
    plan = plan_tiles(net, image.shape[1:], tile=40)
    origins = list(plan.tiles(image.shape[1:]))
    keep = (plan.y.tile_out, plan.x.tile_out)
    batched = tile_outputs(forward, image, plan, origins, keep, batch_size=2)
    assert [(oy, ox) for oy, ox, _ in batched] == origins  # the order asked for
    blocks = list(tile_outputs(forward, image, plan, origins, keep))

    calls = []

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise BiounetError("the engine stopped")
        return forward(batch)

    with pytest.raises(BiounetError, match="the engine stopped"):
        list(tile_outputs(failing, image, plan, origins, keep))
    assert len(calls) == 3  # nothing computed after the failure
    stream = tile_outputs(forward, image, plan, origins, keep)
    first = next(stream)
    assert np.array_equal(first[2], blocks[0][2])
    stream.close()
    assert not _ours()
