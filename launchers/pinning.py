"""Apply a rank's core plan to the current process (before torch starts its thread pool)."""
from __future__ import annotations

import logging
import os
import sys

from qlorax import hardware
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def rank_plans(spec: RunSpec, workers: int | None = None) -> list[hardware.RankPlan]:
    hw = spec.hardware
    topo = hardware.detect(hw.sysfs_root)
    return hardware.plan_ranks(topo, workers or spec.workers, hw.cores_per_worker, hw.cores)


def apply(spec: RunSpec, local_rank: int, workers: int) -> hardware.RankPlan:
    """Pin this process to its cores and set the thread variables; returns the plan applied."""
    plan = rank_plans(spec, workers)[local_rank]
    if spec.hardware.pin:
        env = plan.env()
        if "torch" in sys.modules:
            # torch's OpenMP runtime has read its variables already (transformers 4.37, used by the
            # bigdl environment, imports torch with its logging utilities). Binding variables set now
            # would only reach an OpenMP copy loaded later (sentencepiece's): it pins this thread to
            # the first core, and torch's workers, started from it, share that core (30x slower).
            env = {k: v for k, v in env.items() if k not in ("OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY")}
        os.environ.update(env)
        if hasattr(os, "sched_setaffinity") and spec.hardware.sysfs_root == "/":
            try:
                os.sched_setaffinity(0, plan.cpus)
            except OSError as exc:
                log.warning("could not pin rank %d to CPUs %s (%s); running unpinned", local_rank, plan.cpus, exc)
    else:
        os.environ["OMP_NUM_THREADS"] = str(plan.threads)
    import torch

    torch.set_num_threads(plan.threads)
    return plan


def format_plans(plans: list[hardware.RankPlan]) -> list[str]:
    lines = []
    for p in plans:
        where = f"socket {p.socket}" if p.socket is not None else "several sockets"
        lines.append(f"rank {p.rank}: {p.threads} thread(s) on CPUs {_compact(p.cpus)} ({where}), "
                     f"OMP_NUM_THREADS={p.threads}")
    return lines


def _compact(cpus) -> str:
    cpus = sorted(cpus)
    out, start, prev = [], None, None
    for c in cpus + [None]:
        if start is None:
            start = prev = c
        elif c is not None and c == prev + 1:
            prev = c
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = c
    return ",".join(out)
