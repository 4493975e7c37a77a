"""Atomic, verified checkpoints: adapter (peft format) + everything resume needs.

A checkpoint is written into a temporary sibling directory, every file fsynced, a
``manifest.json`` of SHA-256 sums written last, then renamed into place and the parent
directory fsynced. Loading verifies the manifest; a damaged checkpoint is reported and
the previous one is used instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlorax.errors import QloraxError, is_disk_full
from qlorax.paths import RunPaths

log = logging.getLogger("qlorax")
MANIFEST = "manifest.json"
STATE = "trainer_state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(paths: RunPaths, step: int, model, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep``."""
    import torch

    target = paths.checkpoint(step)
    try:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=paths.checkpoints))
        # qlorax never resizes or trains the embeddings; "auto" would ask the hub about the base model
        # on every save (peft 0.10 for anything but an absolute path; offline it stalls on retries).
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        if os.environ.get("QLORAX_TEST_KILL_IN_CHECKPOINT") == str(step):   # crash-safety tests only
            os.kill(os.getpid(), 9)
        torch.save(state, staging / STATE)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for f in files:
            _fsync(f)
        manifest = {"step": step, "files": {str(f.relative_to(staging)): _sha256(f) for f in files}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(staging / MANIFEST)
        if target.exists():   # same step saved again (e.g. a resumed run's final save)
            shutil.rmtree(target)
        os.rename(staging, target)
        _fsync(paths.checkpoints)
    except (OSError, RuntimeError) as exc:   # torch.save reports a failed write as RuntimeError
        if not isinstance(exc, OSError) and not is_disk_full(exc):
            raise
        if "staging" in locals():
            shutil.rmtree(staging, ignore_errors=True)
        previous = latest_valid(paths)
        kept = f"the previous checkpoint {previous[1]} is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise QloraxError(f"cannot write checkpoint step {step} under {paths.checkpoints}: {reason} "
                          f"({kept}); free disk space or make the run directory writable, then resume with "
                          f"`qlorax train run_dir={paths.root} resume=auto`") from None
    for old_step, old in paths.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_partial(paths: RunPaths) -> None:
    """Delete temporary checkpoint directories left by a process killed while writing."""
    if paths.checkpoints.is_dir():
        for stale in paths.checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def check(checkpoint: Path) -> str:
    """'' when every file matches the manifest, else what is wrong."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "manifest is not valid JSON"
    for name, digest in manifest.get("files", {}).items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return ""


def latest_valid(paths: RunPaths) -> tuple[int, Path] | None:
    """Newest checkpoint whose files match their manifest; damaged ones are reported and skipped."""
    for step, checkpoint in reversed(paths.checkpoint_dirs()):
        problem = check(checkpoint)
        if not problem:
            return step, checkpoint
        log.warning("checkpoint %s is damaged (%s): skipping it for the previous one", checkpoint.name, problem)
    return None


def load_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    return torch.load(checkpoint / STATE, weights_only=True)


def load_adapter_weights(model, checkpoint: Path) -> None:
    """Load a peft adapter's weights into an already-built peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def require_adapter(paths: RunPaths) -> tuple[int, Path]:
    found = latest_valid(paths)
    if found is None:
        raise QloraxError(f"no trained adapter in {paths.checkpoints}: run `qlorax train run_dir={paths.root}` first")
    return found
