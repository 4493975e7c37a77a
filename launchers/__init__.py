"""Launchers: how the train stage's ranks are started. One interface, ``launch(spec) -> LaunchResult``.

    local  one process, here
    ccl    N ranks on this node through torchrun (oneCCL when installed, else gloo)
    k8s    rendered Kubernetes manifests whose pods run the same worker entry point

Each backend module is imported only when chosen.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from qlorax.schema import RunSpec

LAUNCHERS = {"local": "qlorax.launchers.local", "ccl": "qlorax.launchers.torchrun", "k8s": "qlorax.launchers.k8s"}


@dataclass
class LaunchResult:
    ok: bool
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def get(name: str):
    """The launcher module registered under ``name``."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; known: {', '.join(LAUNCHERS)}")
    return importlib.import_module(LAUNCHERS[name])


def launch(spec: RunSpec) -> LaunchResult:
    """Start the train stage as ``spec.parallel.launcher`` says."""
    return get(spec.parallel.launcher).launch(spec)


def describe(spec: RunSpec) -> list[str]:
    """What ``launch`` would do, for ``qlorax plan`` (starts nothing)."""
    return get(spec.parallel.launcher).describe(spec)
