"""The stages after training, run in order on one process: merge -> verify -> report."""
from __future__ import annotations

import logging

from qlorax import runstatus
from qlorax.engine.console import setup_logging
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def run_stages(spec: RunSpec, stages: list[str]) -> dict:
    """Run ``merge`` / ``verify`` (in that order, those asked for), then refresh the run report."""
    paths = RunPaths(spec.run_dir)
    setup_logging(paths.log, 0, spec.quiet)
    results = {}
    for stage in ("merge", "verify"):
        if stage not in stages:
            continue
        runstatus.write(paths, "running", stage)
        try:
            if stage == "merge":
                from qlorax.engine.merge import merge

                results[stage] = merge(spec)
            else:
                from qlorax.engine.verify import verify

                results[stage] = verify(spec)
        except BaseException as exc:
            runstatus.write(paths, "failed", stage, error=str(exc)[:500])
            raise
        runstatus.write(paths, "finished", stage)
    from qlorax.engine.report import write_report

    write_report(paths)
    return results
