"""Faults users meet (issue 17): broken models and data files, reused or damaged run directories, crashes.

Every case runs the real CLI and checks the exit code (2: your input, 1: an internal error), that no
traceback reaches the console, that the message names the fix, and that nothing already in the run
directory is lost. `python tests/fault_table.py` prints the table of cases with their first message line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ASSETS, asset, run_cli

FAST = ["train.max_steps=2", "train.logging_steps=1", "quiet=true"]
STORIES = ASSETS / "models/stories260K-hf"
ROWS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(12)]


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def data_args(path: Path, *extra: str) -> list[str]:
    return ["data=local", f"data.path={path}", 'data.prompt="{q} ->: "', 'data.response="{a}"', *extra]


def stories_copy(tmp: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    """stories260K with some files left out and config.json changed (weights linked, not copied)."""
    model = tmp / "model"
    model.mkdir()
    for f in STORIES.iterdir():
        if f.name not in drop and f.name != "config.json":
            (model / f.name).symlink_to(f)
    base = json.loads((STORIES / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**base, **(config or {})}))
    return model


def pickle_only(tmp: Path) -> Path:
    model = stories_copy(tmp, drop=("model.safetensors",))
    write(model, "pytorch_model.bin", b"PK\x03\x04 a pickle archive, never opened")
    return model


def corrupt_parquet(tmp: Path) -> Path:
    return write(tmp, "rows.parquet", b"PAR1" + bytes(range(256)) * 4 + b"PAR1")


def middle_bad_line(tmp: Path) -> Path:
    lines = jsonl(ROWS).splitlines()
    lines[5] = '{"q": "question 5", "a": answer 5}'
    return write(tmp, "rows.jsonl", "\n".join(lines) + "\n")


# name -> (argv builder, exit code, needles that must all be in the output)
FAULTS = {
    # --- model
    "model.path is a file": (lambda t: ["train", f"model.path={asset('models/stories260K-hf') / 'config.json'}"], 2,
                             ["is a file, not a model directory", "stories260K-hf"]),
    "missing tokenizer files": (lambda t: ["train", f"model.path={stories_copy(t, drop=('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json'))}"],
                                2, ["has no tokenizer files", "copy the tokenizer files"]),
    "unknown architecture": (lambda t: ["train", f"model.path={stories_copy(t, config={'model_type': 'llamazing'})}"], 2,
                             ["model_type 'llamazing'", "does not know", "upgrade transformers"]),
    "config.json without model_type": (lambda t: ["train", f"model.path={stories_copy(t, config={'model_type': None})}"], 2,
                                       ["config.json has no model_type", "download the model's config.json again"]),
    "encoder-only architecture": (lambda t: ["train", f"model.path={stories_copy(t, config={'model_type': 'bert'})}"], 2,
                                  ["'bert' model, an encoder", "causal"]),
    "pickle-only weights": (lambda t: ["train", f"model.path={pickle_only(t)}"], 2,
                            ["only has pickle weights", "model.allow_pickle=true", "safetensors"]),
    # --- data
    "empty json file": (lambda t: ["train", *data_args(write(t, "empty.json", "  \n"))], 2, ["holds no rows"]),
    "malformed line in the middle of a jsonl": (lambda t: ["train", *data_args(middle_bad_line(t))], 2,
                                                ["rows.jsonl line 6: invalid JSON", "fix that line"]),
    "csv without a template column": (lambda t: ["train", *data_args(write(t, "rows.csv", "q,answer\nhello,world\nx,y\n"))], 2,
                                      ["field 'a' is not in row 1", "rows.csv"]),
    "csv with an unclosed quote": (lambda t: ["train", *data_args(write(t, "rows.csv", 'q,a\nhello,world\n"x,y\nz,w\n'))], 2,
                                   ["a quote opened after line 2 is never closed", "close it"]),
    "csv line with an extra field": (lambda t: ["train", *data_args(write(t, "rows.csv", "q,a\nhello,world\nx,y,z\n"))], 2,
                                     ["rows.csv line 3: not valid CSV", "2 columns in the header"]),
    "json object instead of a list": (lambda t: ["train", *data_args(write(t, "rows.json", json.dumps(ROWS[0])))], 2,
                                      ["holds one JSON object", "put the rows in a list"]),
    "json object with several lists": (lambda t: ["train", *data_args(write(t, "rows.json", json.dumps({"a": ROWS, "b": ROWS})))], 2,
                                       ["several lists (a, b)", "data.split=a"]),
    "json list of non-objects": (lambda t: ["train", *data_args(write(t, "rows.json", json.dumps([ROWS[0], "text"])))], 2,
                                 ["item 2 is a str"]),
    "non-UTF-8 bytes in a csv": (lambda t: ["train", *data_args(write(t, "rows.csv", b"q,a\nhello,world\ncaf\xe9,x\n"))], 2,
                                 ["rows.csv line 3", "not UTF-8", "iconv"]),
    "every row over cutoff_len": (lambda t: ["train", *data_args(write(t, "long.jsonl", jsonl([{"q": "word " * 60, "a": "x"}] * 12)),
                                                                 "data.cutoff_len=16")], 2,
                                  ["every one of the 12 rows", "data.cutoff_len=16", "raise data.cutoff_len"]),
    "plain directory": (lambda t: ["train", *data_args(write(t, "folder/rows.jsonl", jsonl(ROWS)).parent)], 2,
                        ["is a plain directory", "rows.jsonl"]),
    "corrupt parquet": (lambda t: ["train", *data_args(corrupt_parquet(t))], 2,
                        ["not a readable parquet file", "jsonl"]),
    "val_set_size larger than the data": (lambda t: ["train", *data_args(write(t, "rows.jsonl", jsonl(ROWS)), "data.val_set_size=40")],
                                          2, ["eval split (40 rows)", "12 rows", "data.val_set_size=1"]),
    # --- run directories
    "run_dir is a file": (lambda t: ["train", f"run_dir={write(t, 'notes.txt', 'keep me')}", *FAST], 2,
                          ["cannot be used", "it is a file", "choose a writable directory"]),
    "run_dir under a file": (lambda t: ["train", f"run_dir={write(t, 'notes.txt', 'keep me')}/run", *FAST], 2,
                             ["notes.txt is a file", "choose a writable directory"]),
}


def run_case(name: str, tmp: Path):
    """Build the case's input in ``tmp`` and run the CLI; the run directory is tmp/out unless given."""
    build, _, _ = FAULTS[name]
    argv = build(tmp)
    if argv[0] in ("train", "run") and not any(a.startswith("run_dir=") for a in argv):
        argv += [f"run_dir={tmp / 'out'}", *FAST]
    return run_cli(*argv, cwd=tmp)


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault(name, tmp_path):
    _, code, needles = FAULTS[name]
    result = run_case(name, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == code, f"{name}: exit {result.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in output, f"{name}: {needle!r} not in\n{output[-3000:]}"
    assert not (tmp_path / "out" / "checkpoints").exists(), "a refused input must not start training"


# --- run directories: reused with other settings or inputs, damaged checkpoints

CHECKPOINTED = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=100", "train.logging_steps=1", "quiet=true"]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a run directory but .hydra/ (Hydra's record of the latest command, refused or not)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run with checkpoints at steps 2 and 4 on a local data file, and the arguments that made it."""
    tmp = tmp_path_factory.mktemp("trained")
    args = [*data_args(write(tmp, "rows.jsonl", jsonl(ROWS * 2))), *CHECKPOINTED]
    result = run_cli("train", *args, f"run_dir={tmp / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", args


def copy_run(trained, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(trained[0], tmp / "run", symlinks=True))


@pytest.mark.integration
def test_changed_settings_are_refused_naming_every_key(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = files_of(run)
    result = run_cli("train", *trained[1], "lora.r=16", "train.learning_rate=1e-3", f"run_dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "2 setting(s) changed" in output and "lora.r: 8 -> 16" in output and "train.learning_rate: " in output
    assert "use a new run_dir" in output
    assert files_of(run) == before, "a refused resume must leave the run directory as it was"


@pytest.mark.integration
def test_changed_data_content_is_refused(tmp_path):
    data = write(tmp_path, "rows.jsonl", jsonl(ROWS))
    args = [*data_args(data), *FAST]
    assert run_cli("train", *args, f"run_dir={tmp_path / 'run'}").returncode == 0
    before = files_of(tmp_path / "run")
    data.write_text(jsonl(ROWS[::-1]))   # same settings, other rows: resuming would mix them into one adapter
    result = run_cli("train", *args, "train.max_steps=4", f"run_dir={tmp_path / 'run'}")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "the content of data.path" in output and "Restore the original files" in output
    assert files_of(tmp_path / "run") == before


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["flipped byte", "deleted file"])
def test_damaged_latest_checkpoint_resumes_from_the_previous(trained, tmp_path, damage):
    run = copy_run(trained, tmp_path)
    latest = run / "checkpoints" / "step-000004"
    weights = latest / "adapter_model.safetensors"
    if damage == "flipped byte":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        weights.write_bytes(bytes(raw))
    else:
        weights.unlink()
    result = run_cli("train", *trained[1], "train.max_steps=6", f"run_dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    log = (run / "train.log").read_text()
    why = "does not match its checksum" if damage == "flipped byte" else "is missing"
    assert f"checkpoint step-000004 is damaged (adapter_model.safetensors {why})" in log
    assert "resumed from" in log and "step-000002 (step 2 of 6)" in log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "steps after the intact checkpoint are redone once"
    from qlorax.engine.checkpoint import check

    assert check(latest) == "", "the damaged checkpoint is written again when training passes its step"


# --- unexpected exceptions: one console line naming the log, the traceback only in the log

# Ranks see a half-installed peft only through this start-up hook (the CLI's own checks read peft's
# target mapping, so a plain broken package would fail in the parent before any rank starts).
RANKS_ONLY_BROKEN_PEFT = """
import os, sys
if "LOCAL_RANK" in os.environ:
    class _Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "peft":
                raise RuntimeError("peft is half-installed")
    sys.meta_path.insert(0, _Broken())
"""


@pytest.mark.integration
@pytest.mark.parametrize("launcher", [[], ["parallel=ccl", "workers=2", "train.micro_batch_size=2"]], ids=["local", "ccl"])
def test_internal_error_is_one_line_and_the_traceback_goes_to_the_log(tmp_path, launcher):
    if launcher:
        broken = write(tmp_path, "site/sitecustomize.py", RANKS_ONLY_BROKEN_PEFT).parent
    else:
        broken = write(tmp_path, "site/peft/__init__.py", 'raise RuntimeError("peft is half-installed")\n').parent.parent
    package = "peft"
    run = tmp_path / "run"
    result = run_cli("train", *launcher, *FAST, f"run_dir={run}", env={"PYTHONPATH": str(broken)})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    logs = [run / "train.log"] if not launcher else sorted((run / "logs").glob("rank-*.log"))
    assert logs, output[-3000:]
    assert f"RuntimeError: {package} is half-installed; the full traceback is in {logs[0]}" in output
    assert "not your input" in output
    for log in logs:
        text = log.read_text()
        assert "Traceback (most recent call last)" in text and f"RuntimeError: {package} is half-installed" in text, log
    if launcher:
        assert "failed with an internal error" in output and "torchrun exit code 1" in output
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
