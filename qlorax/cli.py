"""qlorax command line.

    qlorax train [overrides...]            compose config -> spec.yaml -> launch the train stage
    qlorax run   [overrides...]            train -> merge -> verify (stages=[...] selects)
    qlorax merge  run_dir=DIR [merge.*]    merge the latest adapter of a run
    qlorax verify run_dir=DIR [verify.*]   base vs fine-tuned generations and perplexity
    qlorax export run_dir=DIR [format=gguf gguf_type=f16|bf16|q8_0]   the merged model as GGUF
    qlorax plan  [overrides...]            resolved spec, launch plan and memory estimate; loads no model
    qlorax runs  [DIR]                     list run directories and their status

train/run accept Hydra's flags too: --help, --cfg job, -m (sweeps, one run directory per job).
Bad configuration exits with code 2 and every problem listed, before anything heavy is imported.
Any other failure exits with code 1 and one line naming the log file that holds its traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qlorax.errors import QloraxError, record_unexpected

COMMANDS = ("train", "run", "merge", "verify", "export", "plan", "runs")
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp", "--config-name",
                          "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def main(argv: list[str] | None = None) -> int:
    from qlorax.hardware import apply_runtime_defaults, reexec_with_allocator

    if argv is None:   # a program, not a call: once, under tcmalloc where installed
        reexec_with_allocator("qlorax")
    apply_runtime_defaults()   # before anything imports torch; inherited by ranks and subprocesses
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from difflib import get_close_matches

        close = get_close_matches(command, COMMANDS, 1)
        _error(f"unknown command {command!r}" + (f"; did you mean '{close[0]}'?" if close else "")
               + f" (commands: {', '.join(COMMANDS)})")
        return 2
    try:
        if command == "runs":
            return _runs(rest)
        if command in ("merge", "verify", "export"):
            return _stage_on_run_dir(command, rest)
        if command == "plan":
            return _plan(rest)
        return _hydra_command(command, rest)
    except QloraxError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:   # a bug or a broken install: one line here, the traceback in the run's log
        _error(record_unexpected(exc, f"`qlorax {command}`", _run_log(rest)))
        return 1


def _run_log(args: list[str]) -> Path | None:
    """The log file of the run directory named by ``run_dir=`` when that directory exists."""
    from qlorax.paths import RunPaths

    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    return RunPaths(run_dirs[0]).log if run_dirs and Path(run_dirs[0]).is_dir() else None


def _error(message: str) -> None:
    print(f"qlorax: error: {message}", file=sys.stderr, flush=True)


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags, overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in HYDRA_FLAGS_WITH_VALUE and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def _config_dirs(flags: list[str]) -> tuple[str, ...]:
    """Folders given with Hydra's --config-dir / -cd: the user's own group options (e.g. mydata/data/x.yaml)."""
    dirs = []
    for i, flag in enumerate(flags):
        if flag in ("--config-dir", "-cd") and i + 1 < len(flags):
            dirs.append(flags[i + 1])
        elif flag.startswith("--config-dir="):
            dirs.append(flag.split("=", 1)[1])
    return tuple(dirs)


def _hydra_command(command: str, args: list[str]) -> int:
    """train / run: validate first (exit 2 with every problem), then hand over to Hydra's main."""
    from qlorax.spec import compose, force_dict_overrides

    flags, overrides = _split_flags(args)
    asks_help = any(f in ("--help", "-h", "--hydra-help") for f in flags)
    if not asks_help:
        compose(overrides, _config_dirs(flags))   # raises ConfigError listing every problem; loads no model
    multirun = any(f in ("-m", "--multirun") for f in flags)
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
    if run_dir and not asks_help and "$" not in run_dir:
        _check_run_dir(run_dir)   # Hydra would create it first and print a traceback if it cannot
    if run_dir:
        overrides.append(f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}")
        if multirun:
            overrides = [o for o in overrides if not o.startswith("run_dir=")]
    import hydra

    from qlorax.schema import register_configs

    register_configs()
    outcome: dict = {}

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from qlorax.spec import from_config

        try:
            spec = from_config(cfg, run_dir=HydraConfig.get().runtime.output_dir)
            outcome["result"] = execute(command, spec)
        except QloraxError as exc:
            _error(str(exc))
            sys.exit(exc.exit_code)
        except Exception as exc:   # caught here, or Hydra would print the traceback itself
            from qlorax import runstatus
            from qlorax.paths import RunPaths

            paths = RunPaths(HydraConfig.get().runtime.output_dir)
            line = record_unexpected(exc, f"`qlorax {command}`", paths.log)
            if runstatus.read(paths).get("state") != "failed":   # e.g. it broke before a stage was tracked
                try:
                    runstatus.write(paths, "failed", command, error=line)
                except OSError:
                    pass
            _error(line)
            sys.exit(1)

    saved_argv = sys.argv
    sys.argv = [f"qlorax {command}"] + flags + force_dict_overrides(overrides)
    try:
        hydra.main(config_path="pkg://qlorax.conf", config_name="config", version_base="1.3")(task)()
    finally:
        sys.argv = saved_argv
    return 0


def _check_run_dir(run_dir: str) -> None:
    """A run directory that cannot be created or written is refused here, not in Hydra's mkdir."""
    from qlorax.paths import run_dir_problem

    problem = run_dir_problem(run_dir)
    if problem:
        raise QloraxError(f"run_dir={run_dir} cannot be used: {problem}; choose a writable directory, "
                          "e.g. run_dir=outputs/my-run")


def execute(command: str, spec) -> dict:
    """Prepare the run directory, launch training, then run the later stages (for ``run``).

    One process at a time works in a run directory (``qlorax.runlock``); a full disk ends in one message.
    """
    from qlorax.engine.console import setup_logging
    from qlorax.paths import RunPaths
    from qlorax.runlock import hold
    from qlorax.runstatus import disk_full_reported

    setup_logging(quiet=spec.quiet)
    paths = RunPaths(spec.run_dir)
    with hold(paths, command), disk_full_reported(paths, command):
        return _execute_locked(command, spec)


def _execute_locked(command: str, spec) -> dict:
    import logging

    log = logging.getLogger("qlorax")
    prepare_run_dir(spec)
    log.info("run directory: %s", spec.run_dir)
    from qlorax import launchers

    stages = list(spec.stages) if command == "run" else ["train"]
    result = {}
    if "train" in stages:
        outcome = launchers.launch(spec)
        result["train"] = outcome.details
        if spec.parallel.launcher == "k8s":
            log.info("%s", outcome.message)
            return result
    later = [s for s in stages if s != "train"]
    if later:
        from qlorax.engine.stages import run_stages

        result.update(run_stages(spec, later))
    return result


def prepare_run_dir(spec) -> None:
    """Write spec.yaml; refuse a run directory that belongs to a different spec."""
    from qlorax.memory import check_fits
    from qlorax.paths import RunPaths, read_json
    from qlorax.spec import identity_diff
    from qlorax.specfile import load_spec, lookup, save_spec

    paths = RunPaths(spec.run_dir)
    check_inputs(spec)
    inputs = _input_digests(spec)
    if paths.spec.is_file():
        old = load_spec(paths.spec)
        changed = identity_diff(old, spec)
        if changed:
            shown = "; ".join(f"{key}: {lookup(old, key)!r} -> {lookup(spec, key)!r}" for key in changed[:8])
            raise QloraxError(f"run_dir {paths.root} belongs to a different run: {len(changed)} setting(s) changed "
                              f"({shown}{'; ...' if len(changed) > 8 else ''}); use a new run_dir, or the original "
                              "settings to resume it")
        if spec.resume == "never" and paths.checkpoint_dirs():
            raise QloraxError(f"run_dir {paths.root} already has checkpoints and resume=never: continue it with "
                              "resume=auto, or start over in a new run_dir")
        trained_on = read_json(paths.inputs)
        moved = [k for k in inputs if trained_on.get(k) not in (None, inputs[k])]
        if moved and paths.checkpoint_dirs():
            raise QloraxError(f"run_dir {paths.root}: the content of {' and '.join(moved)} ("
                              f"{', '.join(lookup(spec, k) for k in moved)}) changed since its checkpoints were "
                              "trained; resuming would mix two inputs in one adapter. Restore the original files, or "
                              "train on the new ones in a new run_dir")
    check_fits(spec)
    save_spec(spec, paths.spec)
    paths.inputs.write_text(json.dumps(inputs, indent=1))


def _input_digests(spec) -> dict[str, str]:
    """Digests of the local data file (its bytes) and model directory (config.json, weight names and sizes)."""
    import hashlib

    from qlorax.engine.data import data_source

    digests = {}
    if spec.parallel.launcher == "k8s":
        return digests   # paths refer to the cluster's volume
    location, fmt = data_source(spec.data)
    if fmt != "hub":
        h = hashlib.sha256()
        for f in sorted(p for p in [Path(location), *Path(location).rglob("*")] if p.is_file()):
            with f.open("rb") as content:   # streamed: data files can be larger than memory
                h.update(f.name.encode() + hashlib.file_digest(content, "sha256").digest())
        digests["data.path"] = h.hexdigest()
    model = Path(spec.model.path).expanduser()
    if (model / "config.json").is_file():
        h = hashlib.sha256((model / "config.json").read_bytes())
        for f in sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        digests["model.path"] = h.hexdigest()
    return digests


def check_inputs(spec) -> None:
    """Model directory and data rows are checked here, once, before any rank or pod starts."""
    from qlorax.engine.data import check_rows, data_source, read_rows, split_sizes
    from qlorax.engine.model import check_model_path, check_vocab_fits

    if spec.parallel.launcher == "k8s":
        return   # paths refer to the cluster's volume, not to this machine
    check_vocab_fits(check_model_path(spec))
    if "export" in spec.stages:   # refuse an architecture the exporter cannot map before training it
        from qlorax.engine.export import check_exportable
        from qlorax.engine.model import resolve_model_path

        check_exportable(spec, resolve_model_path(spec))
    if data_source(spec.data)[1] == "hub":
        return   # fetched by the ranks themselves
    rows, source = read_rows(spec.data)
    check_rows(rows, spec.data, source)
    split_sizes(len(rows), spec.data.val_set_size, source)


def _stage_on_run_dir(command: str, args: list[str]) -> int:
    import logging

    from qlorax.engine.console import setup_logging
    from qlorax.engine.stages import run_stages
    from qlorax.paths import RunPaths
    from qlorax.runlock import hold
    from qlorax.runstatus import disk_full_reported
    from qlorax.spec import with_overrides
    from qlorax.specfile import load_run_spec, save_spec

    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    if not run_dirs:
        raise QloraxError(f"`qlorax {command}` works on an existing run: give run_dir=<dir> "
                          "(the directory `qlorax train` created; `qlorax runs` lists them)")
    paths = RunPaths(run_dirs[0])
    if not paths.spec.is_file():
        raise QloraxError(f"{paths.root} is not a run directory (no spec.yaml): create it with "
                          f"`qlorax train run_dir={paths.root}`")
    allowed = ("merge.", "verify.", "export.", "quiet", "run_dir")
    extra = [a for a in args if not a.startswith("run_dir=")]
    if command == "export":   # `qlorax export format=gguf gguf_type=q8_0` reads better than export.format=...
        extra = [f"export.{a}" if a.split("=", 1)[0] in ("format", "gguf_type") else a for a in extra]
    wrong = [a for a in extra if not a.startswith(allowed)]
    if wrong:
        raise QloraxError(f"`qlorax {command}` on an existing run only takes merge.* / verify.* / export.* / quiet overrides, "
                          f"not {', '.join(wrong)}; start a new run to change training settings")
    stored, recorded = load_run_spec(paths.root)   # the directory given is the run, wherever it was created
    spec = with_overrides(stored, extra)
    setup_logging(quiet=spec.quiet)
    with hold(paths, command), disk_full_reported(paths, command):
        if recorded and Path(recorded) != paths.root:
            log = logging.getLogger("qlorax")
            log.info("run directory moved from %s: working in %s", recorded, paths.root)
            try:
                save_spec(stored, paths.spec)
            except OSError as exc:   # e.g. a full disk: the stage still works here, only the record lags
                log.warning("run_dir: cannot record the new location in spec.yaml (%s)", exc.strerror or exc)
        run_stages(spec, [command])
    return 0


def _plan(args: list[str]) -> int:
    from qlorax import launchers
    from qlorax.memory import estimate, format_estimate
    from qlorax.spec import compose, to_dict

    import yaml

    flags, overrides = _split_flags(args)
    spec = compose(overrides, _config_dirs(flags))
    print("# resolved run spec")
    print(yaml.safe_dump(to_dict(spec), sort_keys=False).rstrip())
    print("\n# launch plan")
    for line in launchers.describe(spec):
        print(line)
    print("\n# memory estimate (per rank)")
    print(format_estimate(estimate(spec)))
    return 0


def _runs(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from qlorax.runstatus import describe, find_runs

    root = Path(args[0] if args else "outputs")
    if not root.exists():
        raise QloraxError(f"{root} does not exist: give the folder that holds your runs (`qlorax runs DIR`)")
    rows = [describe(p) for p in find_runs(root)]
    table = Table(title=f"qlorax runs under {root}")
    for column in ("run", "status", "steps", "final loss", "outputs"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(str(r.path), r.status, r.steps, r.final_loss, r.outputs)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if not rows:
        print(f"no runs under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
