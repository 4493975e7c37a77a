"""Local launcher: the train stage in this process, pinned to this machine's physical cores."""
from __future__ import annotations

from qlorax import runstatus
from qlorax.launchers import LaunchResult
from qlorax.launchers.pinning import apply, format_plans, rank_plans
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec


def describe(spec: RunSpec) -> list[str]:
    return ["launcher: local (one process)"] + format_plans(rank_plans(spec, 1))


def launch(spec: RunSpec) -> LaunchResult:
    apply(spec, 0, 1)
    from qlorax.engine.train import train

    with runstatus.tracking(RunPaths(spec.run_dir), "train"):
        summary = train(spec)
    return LaunchResult(ok=True, message=f"trained {summary['steps']} steps", details=summary)
