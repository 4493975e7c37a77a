"""Options that change how a stage runs: gradient checkpointing, bf16 LoRA, merge base, 4-bit verify."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration
FAST = ["train.max_steps=6", "train.logging_steps=1", "train.save_steps=3", "quiet=true", "verify.n_predict=4",
        "verify.num_prompts=1"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    for run_dir, extra in ((plain, []), (checkpointed, ["train.gradient_checkpointing=true"])):
        result = run_cli("train", *FAST, "lora.dropout=0", f"run_dir={run_dir}", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    a, b = _losses(plain), _losses(checkpointed)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2, (a, b)


def test_bf16_lora_without_quantization(tmp_path):
    run_dir = tmp_path / "bf16"
    result = run_cli("run", "quant=none", *FAST, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["quant"] == "none/none"
    assert "quant: none/none" in result.stderr


def test_merge_into_dequantized_weights_and_verify_in_4bit(tmp_path):
    run_dir = tmp_path / "deq"
    result = run_cli("run", *FAST, f"run_dir={run_dir}", "merge.base=dequantized", "verify.load_in_4bit=true",
                     "quant.bf16_matmul=torch")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert info["base"] == "dequantized" and info["max_logit_diff"] <= info["tolerance"]
    assert "dequantized 4-bit" in result.stderr
    report = json.loads((run_dir / "verify.json").read_text())
    assert "(loaded 4-bit, bf16 matmul: torch)" in report["tuned_model"]   # verify honours quant.bf16_matmul
    # Switching the merge base re-merges (a different result), switching back is a new merge too.
    again = run_cli("merge", f"run_dir={run_dir}", "merge.base=original")
    assert again.returncode == 0 and "already merged" not in again.stderr
    assert json.loads((run_dir / "merged" / "merge_info.json").read_text())["base"] == "original"


def test_merge_fails_when_parity_exceeds_the_tolerance(tmp_path):
    run_dir = tmp_path / "tight"
    trained = run_cli("train", *FAST, f"run_dir={run_dir}")
    assert trained.returncode == 0
    result = run_cli("merge", f"run_dir={run_dir}", "merge.dtype=bf16", "merge.tolerance=1e-9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "merged logits differ from base+adapter" in result.stderr and "merge.tolerance=1e-09" in result.stderr
    assert not (run_dir / "merged").exists(), "a failed merge must not leave a merged model behind"


def test_memory_check_refuses_a_run_that_cannot_fit(tmp_path):
    result = run_cli("train", "train.micro_batch_size=4", "hardware.memory_limit_gb=0.5", f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "would be OOM-killed" in result.stderr and "exceeds the 0.5 GiB available" in result.stderr
    plan = run_cli("plan", "model=llama2_7b", "hardware.memory_limit_gb=4")
    assert plan.returncode == 0 and "DOES NOT FIT" in plan.stdout
