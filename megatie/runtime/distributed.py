"""Ranks that agree: starting the process group, and the few collectives the tying schedule needs.

Every rank runs the same schedule, but nothing makes two ranks compute the same reward or draw the
same random numbers (each rank sees its own batches; GPU kernels are not bitwise deterministic;
nodes may differ). Two ranks that apply different tie maps hang in the next collective. So rank 0's
view is the only one, through ``RankSync``:

- ``mean(x)``: a scalar averaged over ranks (the reward);
- ``broadcast(obj)``: rank 0's object on every rank (a decision, the policy's state);
- ``verify(what, value)``: every rank holds the same value, or a ``DistributedError`` on every
  rank naming the ranks that differ - checked before anything that would hang on a mismatch.

``param_checksum`` fingerprints the weights exactly (an integer sum of their bit patterns), cheap
enough to compare after every regroup. A single process uses the same object; every collective is
then a no-op.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as tdist

from megatie.errors import MegatieError


class DistributedError(MegatieError):
    """Ranks that disagree, or a collective that failed; raised on every rank alike."""


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def param_checksum(tensors) -> int:
    """An exact fingerprint of ``tensors``: per tensor the int64 sum of its bit patterns, combined with
    position weights. Integer sums do not depend on summation order, so equal weights give equal
    checksums on any hardware; the weights make a swap of two tensors visible."""
    tensors = list(tensors)
    if not tensors:
        return 0
    sums = torch.stack([t.detach().view(_INT_OF_SIZE[t.element_size()]).sum(dtype=torch.int64).cpu()
                        for t in tensors])
    total = 0
    for i, s in enumerate(sums.tolist()):
        total = (total + (2 * i + 1) * s) % (2 ** 61 - 1)
    return total


def _describe(values: list) -> str:
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {v}" for v, r in groups.items())


class RankSync:
    """Collectives of one data-parallel group (the default group), or no-ops for one process."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, value: float) -> float:
        return self._reduce([float(value)], tdist.ReduceOp.SUM)[0] / self.world_size

    def sum(self, value: float) -> float:
        return self._reduce([float(value)], tdist.ReduceOp.SUM)[0]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (other ranks may pass anything, e.g. None)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` (a small picklable object), in rank order."""
        if self.world_size == 1:
            return [value]
        out = [None] * self.world_size
        tdist.all_gather_object(out, value)
        return out

    def verify(self, what: str, value) -> None:
        """Raise ``DistributedError`` on every rank unless all ranks hold an equal ``value``."""
        if self.world_size == 1:
            return
        values = self.gather(value)
        if any(v != values[0] for v in values[1:]):
            raise DistributedError(f"ranks disagree on {what} ({_describe(values)}); stopping before the "
                                   "ranks' next collective would hang")


@contextmanager
def failures_as_errors(sync: RankSync, timeout_s: int):
    """A collective that timed out, or whose peer went away, becomes one ``DistributedError`` line
    instead of a backend traceback (NCCL raises ``DistBackendError``, gloo a ``RuntimeError``)."""
    try:
        yield
    except RuntimeError as e:
        backend = isinstance(e, getattr(tdist, "DistBackendError", ())) or any(
            s in str(e) for s in ("Timed out", "Connection closed", "Connection reset", "Broken pipe"))
        if not backend:
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistributedError(f"rank {sync.rank}: a collective failed ({first[-200:]}); another rank stopped, "
                               f"or waited longer than --dist-timeout-s {timeout_s}") from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env(local_rank: int | None) -> None:
    """Defaults that let one process run DeepSpeed without its launcher (no MPI discovery)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", str(local_rank or 0))
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 1


def _launcher_chain() -> list[int]:
    """The processes that started this rank: DeepSpeed's per-node ``launch`` and, on the node where
    the user typed ``deepspeed``, its runner above it (or just the parent, for other launchers)."""
    chain, pid = [], os.getppid()
    while pid > 1 and "deepspeed" in _cmdline(pid):
        chain.append(pid)
        pid = _parent_of(pid)
    return chain or ([os.getppid()] if os.getppid() > 1 else [])


def _end_with_launcher() -> None:
    """Send this rank SIGTERM as soon as a process that launched it is gone. A ``deepspeed`` command
    killed with SIGKILL (an OOM killer, a scheduler, ``kill -9``) can forward nothing: its per-node
    ``launch`` process and the ranks would run on as orphans, holding GPUs and the run directory.
    Watched from a daemon thread once a second; the SIGTERM handler unwinds the rank, prints the resume
    hint and releases the run lock."""
    global _WATCHER
    if _WATCHER is not None or sys.platform != "linux":
        return
    from megatie.runtime.runlock import process_start_time

    watched = {pid: process_start_time(pid) for pid in _launcher_chain()}

    def watch():
        while not _STOP_WATCHING.wait(1.0):
            if any(process_start_time(pid) != start for pid, start in watched.items()):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    _STOP_WATCHING.clear()
    _WATCHER = threading.Thread(target=watch, name="megatie-launcher-watch", daemon=True)
    _WATCHER.start()


def _stop_watching() -> None:
    """Join the watcher before the interpreter exits: a daemon thread still running at interpreter
    shutdown is ended from under it, which is one way a finished rank aborts at exit."""
    global _WATCHER
    if _WATCHER is not None:
        _STOP_WATCHING.set()
        _WATCHER.join(timeout=5)
        _WATCHER = None


_WATCHER: threading.Thread | None = None
_STOP_WATCHING = threading.Event()


def init_deepspeed_distributed(local_rank: int | None = None, timeout_s: int = 600) -> RankSync:
    """Start the process group the way DeepSpeed does (NCCL on GPUs, gloo on CPUs), with a timeout
    after which a stuck collective raises instead of waiting forever."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by a launcher
        _end_with_launcher()
    _single_process_env(local_rank)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", local_rank or 0)))
    if not tdist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    _bound_deepspeed_groups(timeout_s)
    device = torch.device(accelerator.current_device_name())
    return RankSync(tdist.get_rank(), tdist.get_world_size(), device)


def _bound_deepspeed_groups(timeout_s: int) -> None:
    """ZeRO reduces gradients on DeepSpeed's clone of the world group, which DeepSpeed makes with
    torch's default timeout (30 minutes on gloo), not the process group's: a stopped peer would hold the
    other ranks far past --dist-timeout-s. The clone is made here, by every rank, with the run's timeout."""
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", None) is None and tdist.get_world_size() > 1:
        groups._WORLD_GROUP = tdist.new_group(ranks=list(range(tdist.get_world_size())),
                                              timeout=timedelta(seconds=timeout_s))


def shutdown_distributed() -> None:
    """Explicit teardown: without it a rank can abort at interpreter exit."""
    _stop_watching()
    if tdist.is_initialized():
        tdist.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it clones from the world; once the world is destroyed they are dead
    handles, and a second run in the same process (a notebook, a test session) would broadcast on one."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
