"""The stages after training, run in order on one process: merge -> verify -> export -> report."""
from __future__ import annotations

import logging

from qlorax import runstatus
from qlorax.engine.console import setup_logging
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def run_stages(spec: RunSpec, stages: list[str]) -> dict:
    """Run ``merge`` / ``verify`` / ``export`` (in that order, those asked for), then refresh the run report."""
    paths = RunPaths(spec.run_dir)
    setup_logging(paths.log, 0, spec.quiet)
    results = {}
    for stage in ("merge", "verify", "export"):
        if stage not in stages:
            continue
        with runstatus.tracking(paths, stage):
            if stage == "merge":
                from qlorax.engine.merge import merge

                results[stage] = merge(spec)
            elif stage == "verify":
                from qlorax.engine.verify import verify

                results[stage] = verify(spec)
            else:
                from qlorax.engine.export import export

                results[stage] = export(spec)
        runstatus.write(paths, "finished", stage)
    from qlorax.engine.report import write_report

    write_report(paths)
    return results
