"""How many CPU threads each training process uses.

torch takes every core by default in every process. Under ``deepspeed`` (or torchrun) each rank of a node
then runs as many threads as the node has cores, and they fight: on two cores, two ranks ran slower
together than one. The default here shares the cores this process may run on among the node's local
ranks; ``--threads`` overrides it, and ``OMP_NUM_THREADS`` set by the user or the launcher is kept.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or a job scheduler's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Processes of this run on this node: torchrun's LOCAL_WORLD_SIZE or DeepSpeed's LOCAL_SIZE."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def choose_threads(requested: int | None) -> tuple[int | None, str]:
    """``(threads, why)``; ``None`` threads: leave torch as the environment set it."""
    if requested is not None:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cores, ranks = usable_cores(), local_ranks()
    return max(1, cores // ranks), f"{cores} usable cores / {ranks} local rank(s)"


def apply_threads(requested: int | None) -> dict:
    """Set torch's intra-op threads for this process; returns what was chosen and why (for the log)."""
    import torch

    threads, why = choose_threads(requested)
    if threads is not None:
        torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "threads_from": why}
