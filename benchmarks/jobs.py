"""Where a benchmark's training runs live and how they are run: shared by reproduce.py (one corpus) and
multi_corpus.py (several), which import this and not each other."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dir(out_dir: str, regime: str, seed: int, name: str) -> str:
    return os.path.join(out_dir, regime, f"s{seed}", name)


def run_jobs(jobs: list[tuple[str, list[str], str]], parallel: int) -> None:
    """Each job (label, command, run dir) unless its run finished; ``parallel`` at a time. A finished run
    is never run again, so a table is built over several invocations (and days)."""

    def one(job):
        label, cmd, d = job
        if os.path.isfile(os.path.join(d, "summary.json")):  # finished meanwhile (by an earlier command)
            return
        os.makedirs(os.path.dirname(d), exist_ok=True)
        t0 = time.time()
        with open(d + ".log", "w", encoding="utf-8") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{label}: exit {rc} in {time.time() - t0:.0f} s" + ("" if rc == 0 else f" (see {d}.log)"), flush=True)

    todo = [j for j in jobs if not os.path.isfile(os.path.join(j[2], "summary.json"))]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, todo))
