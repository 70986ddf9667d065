"""Several processes (``torchrun --nproc_per_node=N``) for the feature and scoring stages.

``torchrun --nproc_per_node=N -m llm_influence.cli attribute --run RUN ...`` starts ``N``
copies of the command; each is one *rank*. :func:`current` initialises
``torch.distributed`` from the environment torchrun sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) the first time it is asked, and only when
``WORLD_SIZE > 1``; otherwise it returns the one-process :class:`World` and nothing here
communicates. Backend: ``nccl`` when CUDA is available (rank ``r`` uses ``cuda:LOCAL_RANK``),
``gloo`` on the CPU.

How the work is divided (see :mod:`llm_influence.features.extract` and
:mod:`llm_influence.attribute`):

* a split's examples are cut into fixed chunks of ``chunk_size`` consecutive examples;
  chunk ``i`` of ``C`` belongs to rank :func:`owner` ``(i, C) = i * N // C`` (contiguous
  training-example ranges). The chunks do not depend on ``N``, so every matrix product has
  the same shape whatever the number of ranks;
* ranks exchange bulk data through the run directory, which all ranks must see (one
  machine, or a shared filesystem): each rank writes its chunk files, rank 0 assembles them
  after a barrier, and every rank then reads the assembled (memory-mapped) files;
* statistics are summed with :func:`all_reduce_sum`; score columns computed on different
  ranks are combined with an all-reduce in which every entry comes from exactly one rank
  (the others add exact zeros), so the combination itself adds no rounding.

Only rank 0 writes shared files (config, summaries, scores) and prints progress; the other
ranks are quiet. A failure on one rank is turned into an error on every rank by
:func:`agree` (otherwise the others would wait at the next collective until the timeout).
No collective here pickles anything: only tensors travel.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")

#: seconds a rank waits at a collective for the others (env ``LLM_INFLUENCE_DIST_TIMEOUT``):
#: long, because one rank may still be extracting while another waits at a barrier.
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``size == 1``: a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """The device of this rank's model: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.active else torch.cuda.current_device())
        return torch.device("cpu")


_WORLD: Optional[World] = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def current() -> World:
    """The :class:`World` of this process, initialising ``torch.distributed`` on first use
    when ``WORLD_SIZE > 1`` (an already initialised default group is adopted as is)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UserError(f"WORLD_SIZE={size} but {var} is not set; start the command with "
                                "`torchrun --nproc_per_node=N -m llm_influence.cli ...`")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"rank with LOCAL_RANK={local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                "use --nproc_per_node <= the number of GPUs, or CUDA_VISIBLE_DEVICES= for CPU "
                                "processes (gloo)")
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=_env_int("LLM_INFLUENCE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=timeout)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                   backend=dist.get_backend())
    if _WORLD.rank != 0:
        from .progress import set_quiet

        set_quiet(True)
    return _WORLD


def shutdown() -> None:
    """Destroy the process group (if this module created one) and forget the world."""
    global _WORLD
    if _WORLD is not None and _WORLD.active:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                barrier(_WORLD)
            finally:
                dist.destroy_process_group()
    _WORLD = None


# ---------------------------------------------------------------------------------------
# who does what


def owner(index: int, count: int, size: int) -> int:
    """The rank that owns item ``index`` of ``count`` among ``size`` ranks: contiguous
    ranges, ``index * size // count`` (rank ``r`` owns items ``ceil(r C / N) ..``)."""
    if not 0 <= index < count:
        raise ValueError(f"index {index} out of range for {count} items")
    return index * size // count


def mine(count: int, world: Optional[World] = None) -> list[int]:
    """The item indices in ``range(count)`` owned by this rank (all of them in one process)."""
    world = world or current()
    return [i for i in range(count) if owner(i, count, world.size) == world.rank]


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in consecutive pieces of ``chunk_size``."""
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, got {chunk_size}")
    return [(a, min(n, a + chunk_size)) for a in range(0, n, chunk_size)]


# ---------------------------------------------------------------------------------------
# collectives (no-ops in one process)


def _on_backend(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.backend == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def barrier(world: Optional[World] = None) -> None:
    world = world or current()
    if world.active:
        import torch.distributed as dist

        if world.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, world: Optional[World] = None) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks (a new tensor on ``t``'s device and
    dtype; ``t`` itself in one process). Every rank must call it with the same shape."""
    world = world or current()
    if not world.active:
        return t
    import torch.distributed as dist

    buf = _on_backend(t.detach().clone().contiguous(), world)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast_flags(flags: Sequence[bool], world: Optional[World] = None) -> list[bool]:
    """Rank 0's ``flags`` on every rank (so that all ranks take the same branches)."""
    world = world or current()
    if not world.active:
        return list(flags)
    import torch.distributed as dist

    buf = _on_backend(torch.tensor([1 if f else 0 for f in flags] or [0], dtype=torch.int64), world)
    dist.broadcast(buf, src=0)
    return [bool(v) for v in buf.cpu().tolist()[:len(flags)]]


def agree(fn: Callable[[], T], what: str, world: Optional[World] = None) -> T:
    """Run ``fn()`` on every rank and make its failure anywhere a failure everywhere.

    The rank whose ``fn`` raised re-raises its own exception; the others raise a
    :class:`UserError` naming the first failed rank and ``what`` it was doing. In one
    process this is just ``fn()``.
    """
    world = world or current()
    if not world.active:
        return fn()
    error: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the other ranks have been told
        error = exc
    failed = torch.zeros(world.size, dtype=torch.float64)
    failed[world.rank] = 1.0 if error is not None else 0.0
    failed = all_reduce_sum(failed, world)
    if error is not None:
        raise error
    bad = [r for r, v in enumerate(failed.tolist()) if v]
    if bad:
        raise UserError(f"rank {bad[0]} failed while {what} (its error is printed above)")
    return result  # type: ignore[return-value]
