"""The worker entry point every rank runs, whoever starts it.

    python -m qlorax.launchers.worker --run-dir RUN_DIR [--stages train,merge,verify]

Started by torchrun (parallel=ccl), by a Kubeflow operator or an indexed Job (parallel=k8s),
or by mpirun (PMI_RANK/PMI_SIZE). It reads RUN_DIR/spec.yaml (never Hydra), pins itself to
its cores, trains, and on rank 0 runs the later stages it was asked for.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qlorax import runstatus
from qlorax.errors import Interrupted, PeerLost, QloraxError, record_unexpected
from qlorax.paths import RunPaths
from qlorax.specfile import load_run_spec


def _rank_env() -> tuple[int, int, int]:
    from qlorax.engine.distributed import env_world

    return env_world()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlorax-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="run directory holding spec.yaml")
    parser.add_argument("--stages", default="train", help="comma-separated stages; later ones run on rank 0")
    args = parser.parse_args(argv)
    from qlorax.hardware import apply_runtime_defaults, reexec_with_allocator

    if argv is None:   # a pod or mpirun (torchrun's ranks inherit the CLI's allocator): once, under tcmalloc
        reexec_with_allocator("qlorax.launchers.worker")
    apply_runtime_defaults()   # started by mpirun or a pod, not through the CLI
    rank, world, local_rank = _rank_env()
    try:
        spec, _ = load_run_spec(args.run_dir)   # a moved run directory is used where it is now
        from qlorax.launchers.pinning import apply

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        apply(spec, local_rank, local_world)
        stages = [s for s in args.stages.split(",") if s]
        if "train" in stages:
            from qlorax.engine.train import train

            with runstatus.tracking(RunPaths(args.run_dir), "train", enabled=rank == 0):
                train(spec)
        if rank == 0 and ("merge" in stages or "verify" in stages):
            from qlorax.engine.stages import run_stages

            run_stages(spec, [s for s in stages if s != "train"])
        return 0
    except QloraxError as exc:
        log = logging.getLogger("qlorax")
        if log.handlers:   # console and log files, set up by the stage
            log.error("error: %s", exc)
        else:
            print(f"[rank {rank}] error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:   # the traceback goes to this rank's log file only; one line on the console
        rank_logs = os.environ.get("QLORAX_RANK_LOG_DIR")
        log_file = Path(rank_logs) / f"rank-{rank}.log" if rank_logs else RunPaths(args.run_dir).log
        line = record_unexpected(exc, f"rank {rank}", log_file)
        from qlorax.engine.distributed import is_peer_lost

        if world > 1 and is_peer_lost(exc):   # not this rank's failure: say so, and exit so the launcher can tell
            reason = str(exc).split("]", 1)[-1].split(". This is typically")[0].strip()
            print(f"[rank {rank}] stopped: another rank went away during a collective ({reason}); its log holds "
                  f"the cause", file=sys.stderr, flush=True)
            return PeerLost.exit_code
        print(f"[rank {rank}] error: {line}", file=sys.stderr, flush=True)
        return 1


def _exit(code: int) -> None:
    """End a rank of several without the interpreter's teardown.

    Used when a rank finished or stopped on Ctrl-C: everything it owes is written and closed by then
    (checkpoints, status, metrics sinks). What the teardown would still do is destroy C++ objects in no fixed order, and with gloo's threads alive (a run
    stopped by Ctrl-C never destroys its process group) that now and then ended a finished rank with
    SIGABRT ("terminate called without an active exception") or left it hanging, so the launcher reported
    a failure or never returned.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if _rank_env()[1] > 1 and exit_code in (0, Interrupted.exit_code):   # a failing rank exits as usual, so the
        _exit(exit_code)                                                  # launcher names the rank that failed first
    sys.exit(exit_code)
