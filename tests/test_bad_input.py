"""The bad-input catalogue: every case exits with its code, prints no traceback, and names what to fix.

Each case runs the real CLI. `setup` builds whatever broken file the case needs in tmp_path and
returns extra arguments; the needles must all appear in the output.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from conftest import ASSETS, run_cli

FAST = ["train.max_steps=2", "train.logging_steps=1", "quiet=true"]


def rows_file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def local_data(path: Path, prompt: str = "{q} ->: ", response: str = "{a}", *extra: str) -> list[str]:
    return ["data=local", f"data.path={path}", f'data.prompt="{prompt}"', f'data.response="{response}"', *extra]


def model_dir(tmp: Path, files: dict[str, str]) -> Path:
    d = tmp / "model"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def finished_tiny_run(tmp: Path, *extra: str) -> Path:
    run = tmp / "run"
    result = run_cli("train", *FAST, f"run_dir={run}", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


GOOD_ROWS = [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)]

CASES = {
    # --- configuration
    "unknown key, with suggestion": (lambda t: ["train", "lora.rr=8"], 2, ["lora.rr", "did you mean 'lora.r'", "fix: lora.r=8"]),
    "unknown nested key": (lambda t: ["train", "train.max_step=5"], 2, ["train.max_steps", "fix: train.max_steps=200"]),
    "unknown section": (lambda t: ["train", "foo.bar=1"], 2, ["foo.bar: unknown key", "qlorax train --help"]),
    "wrong type": (lambda t: ["train", "train.learning_rate=fast"], 2, ["train.learning_rate", "not a valid number"]),
    "wrong type boolean": (lambda t: ["train", "quiet=maybe"], 2, ["quiet", "boolean"]),
    "out of range": (lambda t: ["train", "lora.r=-1"], 2, ["lora.r: -1 is out of range: must be >= 1", "fix: lora.r=8"]),
    "several problems at once": (lambda t: ["train", "lora.r=-1", "data.cutoff_len=0", "lora.dropout=2"], 2,
                                 ["3 problems", "lora.r", "data.cutoff_len", "lora.dropout"]),
    "bad choice": (lambda t: ["train", "train.lr_scheduler=cosin"], 2, ["fix: train.lr_scheduler=cosine"]),
    "unknown group option": (lambda t: ["train", "model=llama2"], 2, ["unknown option 'llama2'", "fix: model=llama2_7b"]),
    "batch not divisible": (lambda t: ["train", "train.batch_size=6"], 2, ["train.batch_size", "multiple of"]),
    "workers without a multi-process launcher": (lambda t: ["train", "workers=2", "train.micro_batch_size=2"], 2,
                                                 ["workers", "fix: parallel=ccl workers=2"]),
    "bigdl nf4 is rejected, not remapped": (lambda t: ["train", "quant=bigdl", "quant.type=nf4"], 2,
                                            ["quant.type", "only sym_int4 trains correctly on CPU"]),
    "bigdl double quant": (lambda t: ["train", "quant=bigdl", "quant.double_quant=true"], 2, ["quant.double_quant"]),
    "bnb has no int4 type": (lambda t: ["train", "quant.type=sym_int4"], 2, ["bitsandbytes has no 'sym_int4'", "quant.type=nf4"]),
    "k8s quantity": (lambda t: ["train", "parallel=k8s", "k8s.cpu=abc"], 2, ["k8s.cpu", "Kubernetes quantity", "k8s.cpu=8"]),
    "nfs without server": (lambda t: ["train", "parallel=k8s", "k8s.volume=nfs"], 2, ["k8s.nfs_server"]),
    "unknown stage": (lambda t: ["run", "stages=[train,deploy]"], 2, ["stages", "deploy"]),
    "unquoted template braces": (lambda t: ["train", "data.prompt={q} ->: "], 2, ["data.prompt", "quote the value"]),
    "cutoff beyond the model's context": (lambda t: ["train", "model.max_seq_len=128", "data.cutoff_len=512"], 2,
                                          ["data.cutoff_len", "model.max_seq_len=128", "fix: data.cutoff_len=128"]),
    "template with no field": (lambda t: ["train", 'data.prompt="hello"', 'data.response="world"'], 2,
                               ["data.prompt", "reference no {field}"]),
    "local data without a path": (lambda t: ["train", "data=local"], 2, ["data.path", "required"]),
    "too many workers for the cores": (lambda t: ["train", "parallel=ccl", f"workers={len(os.sched_getaffinity(0)) + 2}",
                                                  "train.micro_batch_size=1", f"train.batch_size={len(os.sched_getaffinity(0)) + 2}"],
                                       2, ["workers", "CPUs", f"fix: workers={len(os.sched_getaffinity(0))}"]),
    "unknown command": (lambda t: ["trian"], 2, ["unknown command 'trian'", "did you mean 'train'"]),
    # --- model
    "model path missing": (lambda t: ["train", f"model.path={t / 'nope'}"], 2, ["model.path", "does not exist"]),
    "not a model directory": (lambda t: ["train", f"model.path={model_dir(t, {'notes.txt': 'x'})}"], 2,
                              ["no config.json", "model.path"]),
    "model without weights": (lambda t: ["train", f"model.path={model_dir(t, {'config.json': '{}'})}"], 2,
                              ["holds no weights"]),
    "pickle weights refused": (lambda t: ["train", f"model.path={model_dir(t, {'config.json': '{}', 'pytorch_model.bin': 'x'})}"],
                               2, ["pickle", "model.allow_pickle=true"]),
    # --- data
    "data file missing": (lambda t: ["train", *local_data(t / "missing.jsonl")], 2, ["missing.jsonl does not exist", "data.path"]),
    "data file empty": (lambda t: ["train", *local_data(rows_file(t, "empty.jsonl", ""))], 2, ["empty.jsonl holds no rows"]),
    "invalid JSON on line N": (lambda t: ["train", *local_data(rows_file(t, "bad.jsonl", jsonl(GOOD_ROWS[:2]) + '{"q": oops}\n'))],
                               2, ["bad.jsonl line 3: invalid JSON", "fix that line"]),
    "invalid JSON document": (lambda t: ["train", *local_data(rows_file(t, "bad.json", '[{"q": "a", "a": "b"},\n  {"q": ]'))],
                              2, ["bad.json line 2: invalid JSON"]),
    "JSON that is not rows": (lambda t: ["train", *local_data(rows_file(t, "scalar.json", "42"))], 2,
                              ["must hold a list of JSON objects"]),
    "row missing a template field": (lambda t: ["train", *local_data(rows_file(t, "rows.jsonl", jsonl(GOOD_ROWS[:3] + [{"q": "x"}])))],
                                     2, ["field 'a' is not in row 4", "rows.jsonl"]),
    "non-UTF-8 bytes": (lambda t: ["train", *local_data(rows_file(t, "latin1.jsonl", jsonl(GOOD_ROWS[:2]).encode() + b'{"q": "caf\xe9", "a": "x"}\n'))],
                        2, ["latin1.jsonl line 3", "not UTF-8", "iconv"]),
    "unknown file type": (lambda t: ["train", *local_data(rows_file(t, "rows.txt", "hello"))], 2,
                          ["cannot tell the format", "data.format="]),
    "eval split larger than the data": (lambda t: ["train", *local_data(rows_file(t, "small.jsonl", jsonl(GOOD_ROWS[:10])),
                                                                       "{q} ->: ", "{a}", "data.val_set_size=50")],
                                        2, ["eval split (50 rows) is not smaller than the data (10 rows", "data.val_set_size="]),
    # --- runs and stages
    "run directory of a different spec": (lambda t: ["train", *FAST, f"run_dir={finished_tiny_run(t)}", "lora.r=16"], 2,
                                          ["belongs to a different run", "lora.r", "8 -> 16"]),
    "resume=never on a run with checkpoints": (lambda t: ["train", *FAST, f"run_dir={finished_tiny_run(t)}", "resume=never"], 2,
                                               ["already has checkpoints", "resume=auto"]),
    "merge without an adapter": (lambda t: ["merge", f"run_dir={_spec_only(t)}"],
                                 2, ["no trained adapter", "qlorax train run_dir="]),
    "merge on a directory that is not a run": (lambda t: ["merge", f"run_dir={t}"], 2, ["not a run directory", "qlorax train run_dir="]),
    "merge without run_dir": (lambda t: ["merge"], 2, ["give run_dir=<dir>"]),
    "training override on merge": (lambda t: ["merge", f"run_dir={_spec_only(t)}", "lora.r=4"], 2,
                                   ["only takes merge.* / verify.*", "lora.r=4"]),
    "port already in use": (lambda t: ["train", "parallel=ccl", "workers=2", "train.micro_batch_size=2",
                                       f"parallel.master_port={_busy_port()}"], 2, ["is already in use", "parallel.master_port=0"]),
}

_SOCKETS: list[socket.socket] = []


def _busy_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    _SOCKETS.append(s)
    return s.getsockname()[1]


def _spec_only(tmp: Path) -> Path:
    from qlorax.spec import compose
    from qlorax.specfile import save_spec

    run = tmp / "fresh"
    save_spec(compose([f"run_dir={run}"]), run / "spec.yaml")
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    setup, code, needles = CASES[name]
    argv = setup(tmp_path)
    if argv[0] in ("train", "run") and not any(a.startswith("run_dir=") for a in argv):
        argv.append(f"run_dir={tmp_path / 'out'}")
    result = run_cli(*argv, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == code, f"{name}: exit {result.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for needle in needles:
        assert needle in output, f"{name}: {needle!r} not in\n{output[-3000:]}"


def test_catalogue_size():
    assert len(CASES) >= 30


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    model = ASSETS / "models/stories260K-hf"
    if not model.exists():
        pytest.skip(f"{model} absent: set QLORAX_ASSETS")
    result = run_cli("train", "model=stories260k", f"model.path={model}", *FAST, f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no pad token: padding with '<unk>'" in result.stderr


def test_rows_longer_than_cutoff_are_counted(tmp_path):
    rows = rows_file(tmp_path, "long.jsonl", jsonl([{"q": "x" * (400 if i % 3 == 0 else 5), "a": "y"} for i in range(30)]))
    result = run_cli("train", *local_data(rows, "{q} ->: ", "{a}", "data.cutoff_len=64"), *FAST, f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 of 30 rows are longer than data.cutoff_len=64 tokens" in result.stderr


def test_no_secret_reaches_spec_logs_or_metrics(tmp_path):
    secret = "hf_SUPERSECRET_value_123"
    run = tmp_path / "r"
    result = run_cli("run", *FAST, f"run_dir={run}", "verify.n_predict=2", env={"HF_TOKEN": secret})
    assert result.returncode == 0, result.stderr[-2000:]
    assert secret not in result.stdout + result.stderr
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_trust_remote_code_is_off_by_default():
    from qlorax.engine.quant.common import hub_kwargs
    from qlorax.spec import compose

    assert hub_kwargs(compose([]))["trust_remote_code"] is False
    assert hub_kwargs(compose(["model.trust_remote_code=true"]))["trust_remote_code"] is True
