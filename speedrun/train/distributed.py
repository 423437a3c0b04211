"""Data-parallel training over processes started by torchrun: the process group, and what ranks agree on.

One code path from 2 CPU processes to many GPUs and nodes: ``torchrun --nproc-per-node N -m speedrun
train ...`` (or ``speedrun train --nproc N``) sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in
each process's environment; ``init`` joins the group from them, over gloo on the CPU and NCCL on CUDA
(device ``cuda:LOCAL_RANK``). A plain process (no RANK in its environment) gets None and nothing changes.

Every collective has a timeout, ``SPEEDRUN_DIST_TIMEOUT_S`` seconds (default 300): a rank that dies or
hangs makes the others' next collective fail within it, so the job ends with a recorded outcome instead
of waiting for ever (gloo usually notices a dead peer's closed socket at once; the timeout is the bound).
NCCL applies it through its watchdog (torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING), which aborts the
process rather than raising: on GPUs a lost rank ends the others, and their run reads back as ``lost``.

A stop decided on one rank (a time budget on rank 0's clock, a NaN in one rank's loss, Ctrl-C) must be
the whole job's at the same step, or the other ranks wait in the next gradient all-reduce for a rank that
has left: ``Agreement`` holds each hook's StopFit until the next batch starts, and the ranks take, all
together, the stop of the lowest rank that asked for one.
"""
from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from speedrun.config import ConfigError
from speedrun.train.loop import EVENTS, FitState, StopFit

TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "SPEEDRUN_DIST_TIMEOUT_S", 300.0


class Terminated(Exception):
    """SIGTERM in a rank: torchrun stops a job's other processes so when one of them fails."""


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # gloo or nccl
    device: torch.device  # where this rank trains: cpu, or cuda:LOCAL_RANK
    timeout_s: float
    control: Any = None  # a gloo group for small CPU-side agreements (None: the default group is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What the run store keeps: the job's shape, and each rank's host and process (gathered)."""
        me = {"rank": self.rank, "local_rank": self.local_rank, "host": socket.gethostname(), "pid": os.getpid(),
              "device": str(self.device)}
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, me, group=self.control)
        return {"world_size": self.world_size, "backend": self.backend, "timeout_s": self.timeout_s, "ranks": ranks}


_WORLD: World | None = None


def launched() -> bool:
    """True in a process torchrun started (its environment names a rank and a world size)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds; got {text!r}")
    return value


def current() -> World | None:
    return _WORLD


def init(device_type: str) -> World | None:
    """Join torchrun's process group once per process (later calls return the same World); None outside
    torchrun. ``device_type``: cpu (gloo) or cuda (NCCL, each rank on the GPU of its local rank)."""
    global _WORLD
    if not launched():
        return None
    if _WORLD is not None:
        if _WORLD.device.type != device_type:
            raise ConfigError(f"this job's ranks train on {_WORLD.device.type}; a run on {device_type} cannot join")
        signal.signal(signal.SIGTERM, _terminated)  # held while the previous run was recorded
        return _WORLD
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    seconds = timeout_s()
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                              "start at most one process per GPU (--nproc-per-node)")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=seconds)
    dist.init_process_group(backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    _WORLD = World(rank, world_size, local_rank, backend, device, seconds, control)
    signal.signal(signal.SIGTERM, _terminated)  # recorded as a failed run, not a silent death
    return _WORLD


def _terminated(signum: int, frame: Any) -> None:
    # Raised once per run: a second SIGTERM must not cut short the handling of the first (or of the
    # collective's own error, which a lost rank raises at about the same moment).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("terminated (SIGTERM): torchrun stops every process of a job when one of them fails")


def hold_termination() -> None:
    """Ignore SIGTERM from now until the next run of this process starts (``init``): its outcome is being
    recorded, and torchrun, stopping the job's processes after another rank failed, waits 30 s before it
    kills (SIGKILL), ample for rank 0 to write what happened."""
    if _WORLD is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def finish(world: World) -> None:
    """The end of a run: every rank waits here for rank 0 to have recorded it, so torchrun, which stops
    the others when one exits with a non-zero status (a target not reached), never cuts the record short.
    A job that already failed (a rank lost) has no barrier to wait at: its error is passed over."""
    try:
        barrier(world)
    except Exception:  # the process group broke with the run: what the run recorded stands
        pass


def shutdown() -> None:
    """Leave the process group (the end of a job's process); a no-op when none was joined."""
    global _WORLD
    if _WORLD is not None and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


# ---------------------------------------------------------------- collectives

def broadcast_object(world: World, obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=world.control)
    return box[0]


def agree(world: World, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: a decision taken on rank 0's clock."""
    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0, group=world.control)
    return bool(value.item())


def barrier(world: World) -> None:
    dist.barrier(group=world.control)


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sums over the job's ranks of ``values`` (float64, on the training device: NCCL reduces on the GPU)."""
    if _WORLD is None:
        raise RuntimeError("all_reduce_sums outside a job (distributed.init was not called)")
    total = torch.tensor(values, dtype=torch.float64, device=_WORLD.device)
    dist.all_reduce(total)
    return total.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in every rank's ``model``: each rank's were updated
    by its own last batch, and an evaluation must be of one model (DDP itself broadcasts them only at
    the start of the next forward)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def local_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel (and under torch.compile's wrapper of it), whose forward
    starts no collective; any other model as it is (compiled or not)."""
    inner = getattr(model, "_orig_mod", model)
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's wrapper and DistributedDataParallel: whose state_dict a checkpoint
    keeps and a weight average copies."""
    inner = getattr(model, "_orig_mod", model)
    return inner.module if isinstance(inner, DistributedDataParallel) else inner


def wrap(model: torch.nn.Module, world: World, *, freezes: bool = False) -> torch.nn.Module:
    """``model`` under DistributedDataParallel: its gradients are averaged over the ranks in backward, so
    every rank's optimizer takes the same step from the same weights (DDP broadcasts rank 0's at the start).
    The optimizer holds ``model``'s own parameters, which DDP shares: Muon and LARS/LAMB see the
    all-reduced gradients of the real tensors. ``freezes``: parameters stop training mid-run (stem
    freezing), so DDP must look for the ones without a gradient after each backward (a walk of the graph
    per step), else it waits for them."""
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=freezes)


# ---------------------------------------------------------------- the stop, the whole job's

class Agreement:
    """The ranks stop together, at the same step, for the same reason.

    Hooks are wrapped (``defer``) so that a StopFit they raise is held, not acted on; Ctrl-C only sets a
    flag. Before each batch (the last ``before_batch`` hook) the ranks all-reduce the lowest rank holding
    a stop: one integer per step, on the CPU, so it never waits for a GPU. That rank's outcome and detail
    are broadcast and every rank raises it. A stop held when the loop ends by itself is settled in
    ``after_fit``. Hooks whose decisions are already the same on every rank (the evaluator, judging an
    all-reduced accuracy) raise directly.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.pending: StopFit | None = None
        self._interrupted = False
        self._old_sigint: Any = None

    def defer(self, hook: object) -> object:
        return _Deferred(hook, self)

    def hold(self, stop: StopFit) -> None:
        if self.pending is None:
            self.pending = stop

    def before_fit(self, state: FitState) -> None:
        self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True

    def _settle(self, state: FitState) -> StopFit | None:
        if self._interrupted:
            self.hold(StopFit("interrupted", f"interrupted at step {state.step}"))
        lowest = torch.tensor([self.world.rank if self.pending is not None else self.world.world_size])
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=self.world.control)
        src = int(lowest.item())
        if src == self.world.world_size:
            return None
        mine = (self.pending.outcome, self.pending.detail) if self.pending is not None else None
        outcome, detail = broadcast_object(self.world, mine, src=src)
        self.pending, self._interrupted = None, False
        return StopFit(outcome, detail + ("" if src == 0 else f" (on rank {src})"))

    def before_batch(self, state: FitState) -> None:
        if (stop := self._settle(state)) is not None:
            raise stop

    def after_fit(self, state: FitState) -> None:
        stop = self._settle(state)
        if stop is not None and state.outcome == "completed":
            state.outcome, state.detail = stop.outcome, stop.detail
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)


class _Deferred:
    """A hook whose StopFit the Agreement holds until the ranks agree."""

    def __init__(self, hook: object, agreement: Agreement) -> None:
        self.hook = hook
        for event in EVENTS:
            if callable(fn := getattr(hook, event, None)):
                setattr(self, event, _holding(fn, agreement))


def _holding(fn: Callable[[FitState], None], agreement: Agreement) -> Callable[[FitState], None]:
    def call(state: FitState) -> None:
        try:
            fn(state)
        except StopFit as stop:
            agreement.hold(stop)
    return call
