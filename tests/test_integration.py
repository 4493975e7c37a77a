"""End to end through the real CLI: the reference recipe on stories260K + english_quotes.

One `qlorax run` (train -> merge -> verify) is shared by the tests of this module.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import run_cli, run_quotes_recipe

pytestmark = pytest.mark.integration
STEPS = 200


@pytest.fixture(scope="module")
def quotes_run(tmp_path_factory):
    run_dir, model, result = run_quotes_recipe(tmp_path_factory, "quotes", f"train.max_steps={STEPS}",
                                               "train.logging_steps=1", "train.eval_steps=50", "verify.num_prompts=2",
                                               "verify.n_predict=16")
    return run_dir, result, model


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_over_the_reference_recipe(quotes_run):
    run_dir, _, _ = quotes_run
    losses = [m["loss"] for m in _metrics(run_dir)]
    assert len(losses) == STEPS
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.3, (first, last)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.2, summary
    from qlorax.engine.quant import amx_4bit   # NF4 bf16-compute: decoded inside AMX tiles where the CPU has them

    # stories260K's 4-bit layers: q/k/v/o (64 and 32 wide) fit the tiles; gate/up/down (172 wide) do not
    tiled = 20 if amx_4bit.library() is not None else 0
    assert summary["compute"] == {"compute": "bf16", "matmul": "mixed" if tiled else "torch", "tile_layers": tiled,
                                  "layers": 35}


def test_memory_stays_flat_while_training(quotes_run):
    """Variable-length batches must not grow RSS step after step (oneDNN kernel caches are capped)."""
    run_dir, _, _ = quotes_run
    rss = [m["rss_mib"] for m in _metrics(run_dir)]
    early, late = max(rss[20:40]), max(rss[-20:])
    assert late < early * 1.15, (early, late)


def test_metrics_have_the_reference_fields(quotes_run):
    run_dir, _, _ = quotes_run
    record = _metrics(run_dir)[-1]
    for key in ("step", "loss", "learning_rate", "epoch", "tokens_per_s", "rss_mib"):
        assert key in record
    assert record["step"] == STEPS and record["learning_rate"] == 0.0   # linear decay ends at zero
    assert any("eval_loss" in m for m in _metrics(run_dir))


def test_non_tty_log_has_reference_lines_and_no_control_characters(quotes_run):
    _, result, _ = quotes_run
    output = result.stdout + result.stderr
    assert re.search(r"\{'loss': [0-9.]+, 'learning_rate': [0-9.e-]+, 'epoch': [0-9.]+\}", output)
    assert "\x1b" not in output and "\r" not in output
    assert "hardware:" in output and "precision:" in output
    # the CLI re-executes itself under tcmalloc where the library is installed; the log says which allocator ran
    from qlorax.hardware import find_tcmalloc

    assert f"allocator {'tcmalloc' if find_tcmalloc() else 'system'}" in output


def test_checkpoint_is_peft_format_with_manifest(quotes_run):
    run_dir, _, _ = quotes_run
    final = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "manifest.json"):
        assert (final / name).is_file(), name
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]


def test_adapter_loads_in_plain_peft_and_matches_qlorax(quotes_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlorax.engine.checkpoint import load_adapter_weights
    from qlorax.engine.model import attach_lora
    from qlorax.engine.quant import load_base_model
    from qlorax.specfile import load_spec

    run_dir, _, model_dir = quotes_run
    adapter = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    spec = load_spec(run_dir / "spec.yaml")
    ids = torch.tensor([[1, 378, 365, 260, 453, 396, 410, 285, 365, 276]])

    ours = attach_lora(load_base_model(spec, str(model_dir), "bf16"), spec)
    load_adapter_weights(ours, adapter)
    ours.eval()
    plain_4bit = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    for m in plain_4bit.modules():   # same kernel path as ours (see test_bnb)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    theirs = PeftModel.from_pretrained(plain_4bit, str(adapter)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()), rtol=0), float((a - b).abs().max())

    plain_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                                           str(adapter)).eval()
    ours_bf16 = attach_lora(load_base_model(spec, str(model_dir), "bf16", quantize=False), spec)
    load_adapter_weights(ours_bf16, adapter)
    with torch.no_grad():
        c, d = ours_bf16.eval()(input_ids=ids).logits.float(), plain_bf16(input_ids=ids).logits.float()
    assert torch.allclose(c, d, atol=0.05 * float(c.abs().max()), rtol=0), float((c - d).abs().max())


MERGED_CHECK = r"""
import importlib.abc, sys, json, torch
class NoQlorax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "qlorax" or name.startswith("qlorax."):
            raise ImportError("qlorax must not be needed")
sys.meta_path.insert(0, NoQlorax())
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
merged_dir, base_dir, adapter_dir = sys.argv[1:4]
ids = AutoTokenizer.from_pretrained(merged_dir)("Be yourself ->: ", return_tensors="pt")["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
with torch.no_grad():
    diff = (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
print(json.dumps({"max_diff": diff}))
"""


def test_merged_model_loads_without_qlorax_and_matches_adapter(quotes_run):
    run_dir, _, model_dir = quotes_run
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert info["max_logit_diff"] <= info["tolerance"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (run_dir / "merged" / name).is_file(), name
    out = subprocess.run([sys.executable, "-c", MERGED_CHECK, str(run_dir / "merged"), str(model_dir), info["adapter"]],
                         capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout.strip().splitlines()[-1])["max_diff"] < 1e-3


def test_rerunning_merge_is_a_noop(quotes_run):
    run_dir, _, _ = quotes_run
    weights = run_dir / "merged" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = run_cli("merge", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "already merged" in result.stderr and "nothing to do" in result.stderr
    assert weights.stat().st_mtime_ns == before


def test_verify_shows_base_and_tuned_and_perplexity_falls(quotes_run):
    run_dir, result, _ = quotes_run
    report = json.loads((run_dir / "verify.json").read_text())
    assert len(report["generations"]) == 2
    for g in report["generations"]:
        assert g["prompt"].endswith(" ->: ") and g["prompt"].startswith("\u201c")   # "<quote>" ->:
        assert g["base"]["new_tokens"] > 0 and g["tuned"]["tokens_per_s"] > 0
    assert report["tuned_perplexity"] < report["base_perplexity"]
    assert "held-out loss: base" in result.stderr


def test_report_uses_real_numbers(quotes_run):
    run_dir, _, _ = quotes_run
    report = (run_dir / "report.md").read_text()
    last = _metrics(run_dir)[-1]
    assert f"{last['loss']:.4f}" in report
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert f"{info['max_logit_diff']:.3g}" in report
    assert (run_dir / "loss.png").stat().st_size > 1000 and "loss.png" in report


def test_runs_lists_the_finished_run(quotes_run):
    run_dir, _, _ = quotes_run
    result = run_cli("runs", str(run_dir.parent))
    assert result.returncode == 0, result.stderr
    assert "finished" in result.stdout and str(STEPS) in result.stdout


def test_demo_defaults_run_end_to_end(tmp_path):
    result = run_cli("run", f"run_dir={tmp_path / 'demo'}", "train.max_steps=12", "train.eval_steps=6", "quiet=true")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("spec.yaml", "metrics.jsonl", "merged/config.json", "verify.json", "report.md"):
        assert (tmp_path / "demo" / name).exists(), name
