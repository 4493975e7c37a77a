"""spec.yaml: the one file that crosses process and pod boundaries.

Written once by the parent after validation (``qlorax.spec``); workers and pods only read it
back here, type-checked against the schema and frozen, without Hydra or re-validation.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from qlorax.errors import ConfigError, Problem, QloraxError
from qlorax.schema import RunSpec

HEADER = "# qlorax run spec: resolved and validated; workers and pods read this file.\n"


def to_dict(spec: RunSpec) -> dict:
    """Plain dict/list form of a spec (what spec.yaml holds)."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(spec)


def lookup(spec: RunSpec, dotted: str) -> Any:
    """The value of a dotted key (``lora.r``) of a spec."""
    value: Any = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def from_dict(data: dict, source: str = "spec.yaml") -> RunSpec:
    """Rebuild a frozen spec from its dict form, checking keys and types against the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunSpec), data)
        spec: RunSpec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError([Problem(getattr(exc, "full_key", "") or source,
                                   f"{source} does not match this qlorax version: {str(exc).splitlines()[0]}",
                                   "re-create the run with `qlorax train ...`")]) from None
    return spec.freeze()


def save_spec(spec: RunSpec, path: Path) -> None:
    """Write spec.yaml atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(HEADER + yaml.safe_dump(to_dict(spec), sort_keys=False))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def load_spec(path: Path) -> RunSpec:
    """Read a run's spec.yaml; the error names the command that creates it."""
    return from_dict(_read_spec(path), source=str(path))


def load_run_spec(run_dir: str | Path) -> tuple[RunSpec, str]:
    """(spec, run_dir recorded in it) of the run in ``run_dir``.

    The directory given is the run: the spec's ``run_dir`` is set to where it is now, so a moved or
    copied run directory is worked on in place, never in the path it was created at.
    """
    from qlorax.paths import RunPaths

    paths = RunPaths(run_dir)
    data = _read_spec(paths.spec)
    recorded = str(data.get("run_dir") or "")
    data["run_dir"] = str(paths.root)
    return from_dict(data, source=str(paths.spec)), recorded


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise QloraxError(f"no run spec at {path}: create the run with `qlorax train run_dir={path.parent}`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QloraxError(f"{path} is not valid YAML ({exc}); re-create the run with `qlorax train`") from None
    if not isinstance(data, dict):
        raise QloraxError(f"{path} holds no run spec; re-create the run with `qlorax train run_dir={path.parent}`")
    return data
