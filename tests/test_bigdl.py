"""The bigdl backend: ipex-llm (or bigdl-llm) sym_int4, in its own environment.

ipex-llm needs transformers 4.3x and peft 0.10-0.13, so it lives in .venv-bigdl:

    make install-bigdl test-bigdl

The end-to-end run (train -> merge -> verify on stories260K + english_quotes) is skipped
where neither library is importable; the validation and helper tests run everywhere.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import run_cli, run_quotes_recipe

STEPS = 40
DOWN_PROJ = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]   # stories260K: 172 inputs, not a multiple of 64


def _bigdl_importable() -> bool:
    for name in ("ipex_llm", "bigdl.llm"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:   # "bigdl" itself absent
            continue
    return False


needs_bigdl = pytest.mark.skipif(not _bigdl_importable(), reason="neither ipex_llm nor bigdl.llm is importable: the "
                                 "bigdl backend runs in its own environment (`make install-bigdl test-bigdl`)")


# ---------------------------------------------------------------- validation (no ipex-llm needed)
@pytest.mark.parametrize("overrides, key, needle", [
    (["quant.type=nf4"], "quant.type", "only sym_int4"),
    (["quant.type=fp4"], "quant.type", "only sym_int4"),
    (["quant.type=asym_int4"], "quant.type", "NaN"),
    (["quant.type=sym_int8"], "quant.type", "NaN"),
    (["quant.double_quant=true"], "quant.double_quant", "no double quantization"),
])
def test_bigdl_rejects_what_does_not_train_on_cpu(overrides, key, needle):
    from qlorax.errors import ConfigError
    from qlorax.spec import compose

    with pytest.raises(ConfigError) as info:
        compose(["quant=bigdl", *overrides])
    problems = {p.key: p for p in info.value.problems}
    assert needle in problems[key].message and "=" in problems[key].fix, problems


def test_bigdl_sym_int4_validates():
    from qlorax.spec import compose

    spec = compose(["quant=bigdl"])
    assert (spec.quant.backend, spec.quant.type, spec.quant.double_quant) == ("bigdl", "sym_int4", False)


def test_unquantized_layers_are_the_float_linear_ones_outside_skip_modules():
    torch = pytest.importorskip("torch")
    from qlorax.engine.quant import unquantized_linear_layers
    from qlorax.spec import compose

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 64)
            self.down_proj = torch.nn.Linear(172, 64)
            self.lm_head = torch.nn.Linear(64, 512)

    block = Block()
    block.q_proj.weight = torch.nn.Parameter(torch.zeros(64 * 32, dtype=torch.uint8), requires_grad=False)  # packed 4-bit
    assert unquantized_linear_layers(block, compose(["quant=bigdl"])) == ["down_proj"]
    assert unquantized_linear_layers(block, compose(["quant=none"])) == []


def test_tokenizer_falls_back_to_sentencepiece_when_tokenizers_cannot_parse(stories260k, monkeypatch):
    """tokenizers 0.15 (the bigdl pins) cannot read a tokenizer.json written by newer versions."""
    from transformers import AutoTokenizer

    from qlorax.engine.model import load_tokenizer
    from qlorax.spec import compose

    real = AutoTokenizer.from_pretrained

    def old_tokenizers(path, *args, **kwargs):
        if kwargs.get("use_fast", True):
            raise Exception("data did not match any variant of untagged enum PyPreTokenizerTypeWrapper")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", old_tokenizers)
    tokenizer = load_tokenizer(compose([f"model.path={stories260k}"]), str(stories260k))
    # the ids the fast tokenizer gives (transformers 5, tokenizers 0.2x)
    assert tokenizer("Be yourself ->: love")["input_ids"] == [1, 368, 411, 364, 420, 372, 421, 431, 410, 464, 505, 467,
                                                              401, 360]
    assert tokenizer.pad_token == "<unk>"


# ---------------------------------------------------------------- end to end (ipex-llm / bigdl-llm)
@pytest.fixture(scope="module")
def bigdl_run(tmp_path_factory):
    run_dir, _, result = run_quotes_recipe(tmp_path_factory, "bigdl", "quant=bigdl", f"train.max_steps={STEPS}",
                                           "train.logging_steps=1", f"train.eval_steps={STEPS}", "data.cutoff_len=64",
                                           "verify.num_prompts=1", "verify.n_predict=8", "quiet=true")
    return run_dir, result


@pytest.mark.integration
@needs_bigdl
def test_bigdl_reference_recipe_loss_falls(bigdl_run):
    run_dir, _ = bigdl_run
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["quant"] == "bigdl/sym_int4"
    assert summary["final_eval_loss"] < summary["initial_eval_loss"], summary


@pytest.mark.integration
@needs_bigdl
def test_bigdl_unquantized_layers_are_reported(bigdl_run):
    run_dir, result = bigdl_run
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["unquantized_linear_layers"] == DOWN_PROJ
    output = result.stdout + result.stderr
    assert "left 5 linear layer(s) unquantized" in output and ", ".join(DOWN_PROJ) in output
    assert "(sym_int4, 5 left unquantized)" in output


@pytest.mark.integration
@needs_bigdl
def test_bigdl_adapter_merges_with_parity_and_verifies(bigdl_run):
    run_dir, _ = bigdl_run
    config = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert info["base"] == "original" and info["max_logit_diff"] <= info["tolerance"], info
    merged_config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert not any(key.startswith("bigdl_") for key in merged_config), merged_config   # loads as a plain model
    report = json.loads((run_dir / "verify.json").read_text())
    assert report["generations"][0]["tuned"]["new_tokens"] > 0
    assert report["tuned_eval_loss"] < report["base_eval_loss"], report


@pytest.mark.integration
@needs_bigdl
def test_bigdl_merge_into_dequantized_4bit_weights(bigdl_run):
    run_dir, _ = bigdl_run
    result = run_cli("merge", f"run_dir={run_dir}", "merge.base=dequantized", "quiet=true")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert info["base"] == "dequantized" and info["max_logit_diff"] <= info["tolerance"], info
    merged_config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert not any(key.startswith("bigdl_") for key in merged_config), merged_config
