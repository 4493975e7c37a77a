"""Atomic checkpoints: manifest, damage detection, failed writes leave the previous one intact."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from qlorax.engine import checkpoint
from qlorax.errors import QloraxError
from qlorax.paths import RunPaths


class FakeAdapter:
    """Stands in for a peft model: writes the two files peft writes."""

    def __init__(self, payload: bytes = b"weights", fail: OSError | None = None):
        self.payload, self.fail = payload, fail

    def save_pretrained(self, directory, safe_serialization=True, **kwargs):
        if self.fail:
            raise self.fail
        Path(directory, "adapter_config.json").write_text("{}")
        Path(directory, "adapter_model.safetensors").write_bytes(self.payload)


def test_save_writes_manifest_and_prunes(tmp_path):
    paths = RunPaths(tmp_path)
    for step in (2, 4, 6):
        checkpoint.save(paths, step, FakeAdapter(bytes([step])), {"step": step}, keep=2)
    assert [s for s, _ in paths.checkpoint_dirs()] == [4, 6]
    manifest = json.loads((paths.checkpoint(6) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}
    assert checkpoint.check(paths.checkpoint(6)) == ""
    assert checkpoint.load_state(paths.checkpoint(6))["step"] == 6
    assert not list(paths.checkpoints.glob(".tmp-*"))


def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, caplog):
    paths = RunPaths(tmp_path)
    for step in (2, 4):
        checkpoint.save(paths, step, FakeAdapter(bytes([step])), {"step": step}, keep=3)
    (paths.checkpoint(4) / "adapter_model.safetensors").write_bytes(b"bit rot")
    with caplog.at_level("WARNING", logger="qlorax"):
        assert checkpoint.latest_valid(paths) == (2, paths.checkpoint(2))
    assert "step-000004 is damaged" in caplog.text and "checksum" in caplog.text


def test_half_written_checkpoint_is_ignored(tmp_path):
    paths = RunPaths(tmp_path)
    checkpoint.save(paths, 2, FakeAdapter(), {"step": 2}, keep=3)
    half = paths.checkpoint(4)
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")   # no manifest: the write never finished
    (paths.checkpoints / ".tmp-step-000006-x").mkdir()
    assert checkpoint.latest_valid(paths)[0] == 2
    assert checkpoint.check(half) == "no manifest (the write did not finish)"


def test_failed_write_is_a_clear_error_and_keeps_the_previous(tmp_path):
    paths = RunPaths(tmp_path)
    checkpoint.save(paths, 2, FakeAdapter(), {"step": 2}, keep=3)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(QloraxError) as info:
        checkpoint.save(paths, 4, FakeAdapter(fail=full), {"step": 4}, keep=3)
    message = str(info.value)
    assert "No space left on device" in message and "step-000002 is intact" in message and "resume=auto" in message
    assert checkpoint.latest_valid(paths)[0] == 2
    assert not list(paths.checkpoints.glob(".tmp-*"))


def test_missing_adapter_names_the_command(tmp_path):
    with pytest.raises(QloraxError) as info:
        checkpoint.require_adapter(RunPaths(tmp_path))
    assert f"qlorax train run_dir={tmp_path}" in str(info.value)
