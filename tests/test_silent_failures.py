"""Faults that used to look like success (issue 18): each ends in a clear message or a correct result.

Every test runs the real CLI and asserts the exit code, that no traceback is printed, the message that
names the fix, and the state of the run directory afterwards.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, asset, run_cli

pytestmark = pytest.mark.integration


def stories_args(run_dir: Path, *extra: str) -> list[str]:
    model, data = asset("models/stories260K-hf"), asset("data/english_quotes.jsonl")
    return ["model=stories260k", f"model.path={model}", "data=english_quotes", f"data.path={data}", "data.max_rows=64",
            "data.cutoff_len=64", "train.logging_steps=1", "quiet=true", f"run_dir={run_dir}", *extra]


def train(run_dir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("train", *stories_args(run_dir, "train.max_steps=2", *extra), **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-step stories260K run; tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = train(run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def state(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- configuration that used to crash
def test_workers_zero_is_out_of_range_not_a_division_by_zero(tmp_path):
    out = assert_user_error(run_cli("train", "workers=0", f"run_dir={tmp_path / 'r'}"),
                            "workers: 0 is out of range: must be >= 1", "fix: workers=1")
    assert "ZeroDivisionError" not in out


def _read_only_dir(tmp_path: Path) -> Path:
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    return mount


@pytest.mark.parametrize("case", ["parent is a file", "it is a file", "pseudo filesystem", "read-only filesystem"])
def test_run_dir_that_cannot_be_created(case, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    mount = _read_only_dir(tmp_path) if case == "read-only filesystem" else None
    run_dir, reason = {"parent is a file": (a_file / "run", "its parent"),
                       "it is a file": (a_file, "it is a file"),
                       "pseudo filesystem": (Path("/proc/qlorax-run"), "pseudo filesystem"),
                       "read-only filesystem": ((mount or tmp_path) / "run", "read-only filesystem")}[case]
    try:
        out = assert_user_error(run_cli("train", "train.max_steps=1", f"run_dir={run_dir}"),
                                f"run_dir={run_dir} cannot be used", reason, "choose a writable directory")
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], check=False)
    assert "Hydra" not in out and "mkdir" not in out
    assert a_file.read_text() == "x"


# ---------------------------------------------------------------- a finished run, run again
def test_rerunning_a_finished_run_prints_its_real_figures(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "again")
    summary = json.loads((run / "train_summary.json").read_text())
    result = train(run)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "nan" not in out and "Traceback" not in out
    assert f"train: already finished: 2 steps, final loss {summary['final_loss']:.4f}" in out
    assert f"eval loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}" in out
    assert "raise train.max_steps to train further" in out
    assert state(run)["state"] == "finished" and metric_steps(run) == [1, 2]


# ---------------------------------------------------------------- moved and copied run directories
def test_stages_follow_a_moved_or_copied_run_directory(finished_run, tmp_path):
    original = copy_run(finished_run, tmp_path / "original")
    copied = copy_run(original, tmp_path / "copied")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.copytree(original, tmp_path / "spare")
    os.rename(tmp_path / "spare", moved)
    shutil.rmtree(tmp_path / "spare", ignore_errors=True)
    # spec.yaml inside both still names the directory they were created as
    assert str(finished_run) in (moved / "spec.yaml").read_text()

    result = run_cli("merge", f"run_dir={copied}")   # the original still exists: nothing may go there
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory moved from {finished_run}: working in {copied}" in result.stderr
    assert (copied / "merged" / "merge_info.json").is_file()
    assert not (original / "merged").exists() and not (finished_run / "merged").exists()

    shutil.rmtree(original)
    result = run_cli("verify", f"run_dir={moved}", "verify.n_predict=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (moved / "verify.json").is_file() and not original.exists()
    assert f"run_dir: {moved}" in (moved / "spec.yaml").read_text()

    listing = run_cli("runs", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    assert str(copied) in listing.stdout and str(moved) in listing.stdout
    assert "merged" in listing.stdout and "verify.json" in listing.stdout
    assert str(original) not in listing.stdout


# ---------------------------------------------------------------- one process per run directory
def _steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def test_second_train_on_a_busy_run_directory_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "qlorax", "train",
                              *stories_args(run, "train.max_steps=400", "train.save_steps=1000")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _steps_logged(run) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run should still be training"
        second = train(run)
        assert_user_error(second, f"run_dir {run} is in use by `qlorax train` (pid {first.pid} on host "
                                  f"{os.uname().nodename}", f"kill {first.pid}", "use another run_dir")
        assert state(run)["pid"] == first.pid, "the refused run must not touch status.json"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed holder's lock: the next run takes over, saying whose it was.
    result = train(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of `qlorax train` (pid {first.pid}" in result.stderr
    assert metric_steps(run) == [1, 2], "one writer: each step once in metrics.jsonl"
    assert state(run)["state"] == "finished"


HOLDER = """
import sys, time
from qlorax.paths import RunPaths
from qlorax.runlock import hold
with hold(RunPaths(sys.argv[1]), "merge"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_merge_is_locked_and_a_merge_killed_midway_is_cleaned_and_completed(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_user_error(run_cli("merge", f"run_dir={run}"), f"is in use by `qlorax merge` (pid {holder.pid}")
        assert not (run / "merged").exists()
    finally:
        holder.kill()
        holder.wait()

    killed = run_cli("merge", f"run_dir={run}", env={"QLORAX_TEST_KILL_IN_MERGE": "1"})
    assert killed.returncode == -signal.SIGKILL
    left = list(run.glob(".merged-*"))
    assert left and (left[0] / "model.safetensors").is_file(), "the kill should leave a staging directory"
    assert not (run / "merged").exists()

    result = run_cli("merge", f"run_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over the lock of `qlorax merge` (pid" in result.stderr
    assert f"merge: removing {left[0].name}, left by a merge that was stopped" in result.stderr
    assert not list(run.glob(".merged-*"))
    info = json.loads((run / "merged" / "merge_info.json").read_text())
    assert info["adapter_step"] == 2 and info["max_logit_diff"] <= info["tolerance"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "merged")   # complete: loads without qlorax
    assert state(run) == {**state(run), "state": "finished", "stage": "merge"}


# ---------------------------------------------------------------- a full disk
@contextlib.contextmanager
def small_disk(where: Path, size: str = "24m"):
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_full_disk_during_training_and_merge_keeps_the_previous_state_and_says_so(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        proc = subprocess.Popen([sys.executable, "-m", "qlorax", "train",
                                 *stories_args(run, "train.max_steps=400", "train.save_steps=2")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step-000002").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        filler = fill(disk)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in out + err and "basic_ios" not in err.splitlines()[-1]
        assert "full" in err and "is intact" in err and "free" in err
        record = state(run)
        assert record["state"] == "failed" and "full" in record["error"]
        kept = sorted((run / "checkpoints").glob("step-*"))
        from qlorax.engine import checkpoint

        assert kept and checkpoint.check(kept[-1]) == "", "the last complete checkpoint must be intact"
        assert kept[-1].name in err

        merge = run_cli("merge", f"run_dir={run}")
        assert_user_error(merge, "merge: the disk holding", "is full", "no merged model was written",
                          f"qlorax merge run_dir={run}")
        assert not list(run.glob(".merged-*")) and not (run / "merged").exists()
        assert state(run)["state"] == "failed"

        filler.unlink()
        again = run_cli("merge", f"run_dir={run}")
        assert again.returncode == 0, again.stderr[-3000:]
        assert (run / "merged" / "merge_info.json").is_file() and state(run)["state"] == "finished"


# ---------------------------------------------------------------- data and adapters without signal
def test_rows_without_signal_are_counted_and_an_oversized_rank_warns(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(24)]
    rows += [{"q": "", "a": ""}] * 4 + [{"q": None, "a": None}] * 2 + [{"q": "only a question", "a": None}] * 3
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = ["data=local", f"data.path={data}", 'data.prompt="{q} ->: "', 'data.response="{a}"']
    result = run_cli("train", *local, "lora.r=100", "train.max_steps=1", "quiet=true", f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 6 of 33 rows of" in result.stderr and "are empty in every field the templates use (a, q)" in result.stderr
    assert "null fields rendered as empty text: 'a' in 5 rows, 'q' in 2 rows (of 33 rows); 9 rows have an empty answer" \
        in result.stderr
    assert "lora.r=100 is larger than the layers it adapts" in result.stderr and "use lora.r=" in result.stderr
    summary = json.loads((tmp_path / "r" / "train_summary.json").read_text())
    assert summary["data"]["empty_rows"] == 6 and summary["data"]["empty_answers"] == 9

    data.write_text("".join(json.dumps({"q": r["q"], "a": None}) + "\n" for r in rows))
    assert_user_error(run_cli("train", *local, "train.max_steps=1", "quiet=true", f"run_dir={tmp_path / 'r2'}"),
                      "all 33 rows of", "render an empty answer", "nothing to learn", "data.response")


# ---------------------------------------------------------------- damaged weights
def model_copy(tmp_path: Path) -> Path:
    source = asset("models/stories260K-hf")
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def _garble_header(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))


def _drop_tensor(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _shard_missing(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, model / shard, metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, part in halves.items() for n in part}}))
    (model / "model.safetensors").unlink()
    (model / "model-00002-of-00002.safetensors").unlink()


def _config_only(model: Path) -> None:
    (model / "model.safetensors").unlink()


DAMAGE = {
    "truncated to half": (_truncate, ["model.safetensors is truncated", "missing", "re-download"]),
    "garbled header": (_garble_header, ["model.safetensors has a damaged header", "re-download"]),
    "a tensor missing": (_drop_tensor, ["1 tensor(s) that LlamaForCausalLM needs", "model.layers.1.mlp.down_proj.weight"]),
    "a shard missing": (_shard_missing, ["1 of the 2 weight shards", "model-00002-of-00002.safetensors", "download every shard"]),
    "config without weights": (_config_only, ["holds no weights"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_weight_files_are_refused_before_training(case, tmp_path):
    damage, needles = DAMAGE[case]
    model = model_copy(tmp_path)
    damage(model)
    run = tmp_path / "r"
    result = run_cli("train", *stories_args(run, f"model.path={model}", "train.max_steps=1"))
    assert_user_error(result, "model.path", *needles)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_a_model_no_better_than_chance_is_reported_loudly(tmp_path):
    """Zeroed weights pass every file check but predict uniformly: held-out loss = ln(vocab)."""
    from safetensors.torch import load_file, save_file

    model = model_copy(tmp_path)
    tensors = {n: t.zero_() for n, t in load_file(model / "model.safetensors").items()}
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    result = run_cli("train", *stories_args(tmp_path / "r", f"model.path={model}", "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"at or above ln(vocab size {vocab}) = {math.log(vocab):.4f}" in result.stderr
            and "no better than uniform guessing" in result.stderr and "re-download" in result.stderr)
