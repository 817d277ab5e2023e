"""Several training processes as one: the process group of a `torchrun` (or `srun`) launch.

A launcher starts N copies of the same program and tells each its place through the
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
`world_from_environ` reads that contract from a mapping the caller passes (the command line
and `biounet.train` pass ``os.environ``); `joined` starts torch.distributed's process group
(gloo on CPU, NCCL on CUDA) for the run and ends it after. The collectives below are the
few the training loop needs; what crosses between processes is tensors and JSON, never a
pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from biounet.configs import TrainConfig
from biounet.errors import BiounetError
from biounet.optimizer import load_optimizer_parts, optimizer_parts

log = logging.getLogger(__name__)
# Rank 0 validates and fits the post-processing while the others wait at their next
# collective: the timeout must outlast that (torch's defaults are 10-30 minutes).
TIMEOUT = timedelta(hours=2)
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank `rank` of `size`.

    ``World()`` is one process on its own. `local_rank` picks the GPU on a node.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, logs and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SOLO = World()


def world_from_environ(environ: Mapping[str, str]) -> World:
    """The `World` a launcher describes in `environ`; ``World()`` where none launched us.

    Raises
    ------
    BiounetError
        A launch that sets some of `LAUNCH_VARIABLES` but not all, or values out of range.

    Examples
    --------
    >>> world_from_environ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
    ...                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    World(rank=1, size=2, local_rank=1)
    """
    size = environ.get("WORLD_SIZE")
    if size is None or size == "1":
        return World()
    missing = [v for v in LAUNCH_VARIABLES if not environ.get(v)]
    if missing:
        raise BiounetError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with torchrun, or "
            f"set all of {', '.join(LAUNCH_VARIABLES)} (see the README, Scaling out)"
        )
    try:
        world = World(int(environ["RANK"]), int(size), int(environ["LOCAL_RANK"]))
    except ValueError:
        raise BiounetError(
            f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, not {environ['RANK']!r}, "
            f"{environ['LOCAL_RANK']!r} and {size!r}"
        ) from None
    if not (world.size >= 1 and 0 <= world.rank < world.size and world.local_rank >= 0):
        raise BiounetError(f"RANK {world.rank} and WORLD_SIZE {world.size} do not fit together")
    return world


def process_device(world: World, device: torch.device) -> torch.device:
    """The device of this process: its own GPU (``cuda:LOCAL_RANK``) on CUDA."""
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise BiounetError(
            f"LOCAL_RANK {world.local_rank} but this node has {torch.cuda.device_count()} "
            "GPU(s): start at most one process per GPU (--nproc_per_node)"
        )
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def joined(world: World, device: torch.device) -> Iterator[None]:
    """The process group for the block: started (gloo on CPU, NCCL on CUDA) unless the caller
    started one already, and ended after the block when it was started here."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current GPU
    if not world.distributed or dist.is_initialized():
        if dist.is_initialized() and dist.get_world_size() != world.size:
            raise BiounetError(
                f"a process group of {dist.get_world_size()} processes is running, but the "
                f"launch says WORLD_SIZE={world.size}"
            )
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method="env://", rank=world.rank, world_size=world.size, timeout=TIMEOUT
    )
    log.info("rank %d of %d joined (%s)", world.rank, world.size, backend)
    try:
        yield
        # Rank 0 leaves its last broadcast once the bytes are sent; tearing its connections
        # down while a peer still reads them can abort the peer (gloo), so all wait here.
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        dist.destroy_process_group()


def _device_of_group() -> torch.device:
    """Where collectives need their tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (a new tensor, outside autograd)."""
    if not world.distributed:
        return tensor.detach().clone()
    total = tensor.detach().to(_device_of_group(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def any_over(world: World, *flags: bool) -> list[bool]:
    """For each flag: whether it is true in any process (every process gets the same)."""
    if not world.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=_device_of_group())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def share_json(world: World, obj=None):
    """Rank 0's JSON-able `obj`, in every process (other ranks' `obj` is ignored)."""
    if not world.distributed:
        return obj
    device = _device_of_group()
    data = json.dumps(obj).encode() if world.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if world.main:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def share_tensors(world: World, tensors: dict[str, torch.Tensor] | None = None):
    """Rank 0's named tensors, in every process (on the CPU)."""
    if not world.distributed:
        return tensors
    specs = share_json(
        world,
        {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}
        if world.main
        else None,
    )
    device, out = _device_of_group(), {}
    for name, (shape, dtype) in specs.items():
        if world.main:
            t = tensors[name].detach().to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, 0)
        out[name] = t.cpu()
    return out


def check_in_step(world: World, model: torch.nn.Module) -> None:
    """Refuse to go on if the processes' weights differ: they must stay one model (DDP only
    averages gradients; anything that lets the processes' updates differ breaks that)."""
    if not world.distributed:
        return
    with torch.no_grad():
        mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
    mine = mine.to(_device_of_group())
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise BiounetError(
            "the training processes' weights have drifted apart; this is a bug in biounet's "
            "data-parallel training: please report it, and train in one process meanwhile"
        )


def from_main(world: World, value: float) -> float:
    """Rank 0's `value`, in every process."""
    if not world.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device_of_group())
    dist.broadcast(t, 0)
    return float(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# -- what the training loop needs ---------------------------------------------------------


def check_parallel(info, config: TrainConfig, device: torch.device, world: World) -> None:
    """Refuse a data-parallel training that could not train what one process would.

    `info`: the `biounet.modeldir.ModelInfo` being trained; `config.batch_size` is the
    global batch, which the processes split into equal parts.
    """
    if not world.distributed:
        return
    if info.net.batch_norm and device.type != "cuda":
        raise BiounetError(
            "batch norm across training processes needs SyncBatchNorm, which torch runs on "
            "GPUs only: train on CUDA, without `batch_norm`, or in one process"
        )
    if config.batch_size % world.size:
        raise BiounetError(
            f"a step's {config.batch_size} tile(s) cannot be split evenly over {world.size} "
            f"processes: use a number of processes that divides {config.batch_size}"
        )


def parallel(model: torch.nn.Module, world: World, device: torch.device, batch_size: int):
    """`model` wrapped for data-parallel training (itself in one process).

    Batch norm becomes SyncBatchNorm (statistics of the global batch, as in one process);
    dropout draws the global batch's masks and keeps this process's rows.
    """
    if not world.distributed:
        return model
    part = batch_size // world.size
    dropout = getattr(model, "dropout", None)
    if hasattr(dropout, "rows"):
        dropout.rows = (world.rank * part, batch_size)
    if model.config.batch_norm:
        # Replaces the BatchNorm2d modules in place, keeping their parameters and buffers.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def share_restored(world: World, recorder, model, optimizer) -> dict:
    """Resume: rank 0 loads the checkpoint (`recorder.restore`), the others get its optimizer
    state and loop state from rank 0 (the weights travel when `parallel` wraps the model),
    so that all start from the very same bytes."""
    fields = recorder.restore(model, optimizer) if world.main else None
    if not world.distributed:
        return fields
    tensors, meta = optimizer_parts(optimizer) if world.main else (None, None)
    shared = share_json(world, {"fields": fields, "optimizer": meta})
    tensors = share_tensors(world, tensors)
    if not world.main:
        load_optimizer_parts(optimizer, tensors, shared["optimizer"])
    return shared["fields"]
