"""Every model family qlorax supports trains, merges and verifies through the real CLI.

Each family is a tiny random model built from its transformers config (2 layers, hidden 64) with
the built-in byte-level tokenizer, saved to a temporary directory and run with `qlorax run`
(train -> merge -> verify) under the default `lora=default` (targets [auto]) and 4-bit NF4 base.
The module ends by printing the family table (family, train, merge parity, verify).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli

FAST = ("data.max_rows=40", "data.val_set_size=8", "data.cutoff_len=48", "train.max_steps=5", "train.warmup_steps=0",
        "train.learning_rate=3e-3", "train.logging_steps=1", "train.eval_steps=5", "train.eval_max_batches=1",
        "train.save_steps=5", "merge.parity_samples=2", "verify.num_prompts=1", "verify.n_predict=4",
        "verify.eval_batches=1", "quiet=true")
SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, positions=128)

# family -> (transformers config class, its keyword arguments, the modules lora=default must adapt)
FAMILIES = {
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False), {"q_proj", "k_proj", "v_proj"}),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), {"q_proj", "k_proj", "v_proj"}),
    "mistral": ("MistralConfig", dict(sliding_window=None), {"q_proj", "k_proj", "v_proj"}),
    "qwen2": ("Qwen2Config", dict(), {"q_proj", "k_proj", "v_proj"}),
    "qwen3": ("Qwen3Config", dict(head_dim=16), {"q_proj", "k_proj", "v_proj"}),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32),
               {"q_proj", "k_proj", "v_proj"}),
    "phi3": ("Phi3Config", dict(pad_token_id=3), {"qkv_proj"}),
    "gpt_neox": ("GPTNeoXConfig", dict(), {"query_key_value"}),
    "falcon": ("FalconConfig", dict(), {"query_key_value"}),
    "opt": ("OPTConfig", dict(), {"q_proj", "k_proj", "v_proj"}),
    "gpt2": ("GPT2Config", dict(), {"c_attn"}),
}
TABLE: dict[str, dict] = {}


def family_config(class_name: str, extra: dict, vocab_size: int):
    """A tiny config of the family, each size under the name that family's config uses."""
    import transformers

    s = SIZES
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    if class_name == "GPT2Config":
        named = dict(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"],
                     n_positions=s["positions"])
    elif class_name == "OPTConfig":
        named = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                     ffn_dim=s["intermediate"], word_embed_proj_dim=s["hidden"], max_position_embeddings=s["positions"])
    elif class_name == "FalconConfig":
        named = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                     max_position_embeddings=s["positions"])
    elif class_name == "GPTNeoXConfig":
        named = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                     intermediate_size=s["intermediate"], max_position_embeddings=s["positions"])
    else:
        named = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                     num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                     max_position_embeddings=s["positions"])
    return getattr(transformers, class_name)(**common, **named, **extra)


def build_family_model(out_dir: Path, class_name: str, extra: dict, vocab_size: int | None = None) -> Path:
    """Save a tiny random model of the family with the built-in byte-level tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlorax.engine.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = family_config(class_name, extra, vocab_size or len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def family_table():
    yield TABLE


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """One `qlorax run -m model.path=...` sweep over every family's tiny model (one process: a few seconds
    of work per family instead of a Python start-up each); run directories <root>/0, /1, ... in order."""
    root = tmp_path_factory.mktemp("families")
    dirs = [build_family_model(root / "models" / name, *FAMILIES[name][:2]) for name in FAMILIES]
    result = run_cli("run", "-m", "model.path=" + ",".join(str(d) for d in dirs), *FAST, f"run_dir={root / 'runs'}",
                     timeout=1200)
    return {name: root / "runs" / str(i) for i, name in enumerate(FAMILIES)}, result


@pytest.mark.integration
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_merges_and_verifies(family, family_runs, family_table):
    run_dirs, result = family_runs
    run_dir, expected_targets = run_dirs[family], FAMILIES[family][2]
    row = family_table.setdefault(family, {"train": "FAIL", "merge parity": "FAIL", "verify": "FAIL"})
    assert (run_dir / "train_summary.json").is_file(), (result.stdout + result.stderr)[-4000:]

    adapter = json.loads((run_dir / "checkpoints" / "step-000005" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == expected_targets
    logged = next(line for line in (run_dir / "train.log").read_text().splitlines() if "lora: adapters on " in line)
    assert set(logged.split("lora: adapters on ")[1].split()[0].split(",")) == expected_targets, logged
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(loss == loss for loss in losses), losses   # no NaN
    row["train"] = f"ok ({losses[0]:.2f} -> {losses[-1]:.2f}, {','.join(sorted(expected_targets))})"

    merge = json.loads((run_dir / "merged" / "merge_info.json").read_text())
    assert merge["max_logit_diff"] <= merge["tolerance"]
    row["merge parity"] = f"ok ({merge['max_logit_diff']:.1e})"

    verify = json.loads((run_dir / "verify.json").read_text())
    assert verify["generations"] and verify["tuned_eval_loss"] < verify["base_eval_loss"], verify
    row["verify"] = f"ok (held-out loss {verify['base_eval_loss']:.3f} -> {verify['tuned_eval_loss']:.3f})"
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.integration
def test_family_table(family_table, capsys):
    """Print the family table collected by the runs above (run them first: same module)."""
    if not family_table:
        pytest.skip("no family run in this session")
    lines = ["| family | train (loss first -> last step, targets) | merge parity (max logit diff) | verify |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {row['train']} | {row['merge parity']} | {row['verify']} |" for name, row in family_table.items()]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(v.startswith("ok") for row in family_table.values() for v in row.values()), lines


# ------------------------------------------------------------------ LoRA variants
# The built-in base is pre-trained (the demo's): a gentler rate than FAST's keeps 5 steps an improvement.
VARIANT_FAST = tuple("train.learning_rate=1e-3" if o.startswith("train.learning_rate=") else o for o in FAST)
VARIANT_SWEEPS = {   # one `qlorax run -m` per quantization: the swept keys' product, each merged and verified
    "nf4": ("lora.use_rslora=true", "lora.use_dora=false,true", "lora.init=gaussian"),
    "none": ("quant=none", "lora.use_dora=true", "lora.init=default"),
}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    runs = []
    for name, overrides in VARIANT_SWEEPS.items():
        result = run_cli("run", "-m", *overrides, *VARIANT_FAST, "train.eval_max_batches=2", "verify.eval_batches=2",
                         f"run_dir={root / name}", timeout=900)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        runs += sorted((root / name).glob("[0-9]*"), key=lambda p: int(p.name))
    return runs


@pytest.mark.integration
def test_lora_variants_merge_with_parity_and_keep_the_trained_loss(variant_runs):
    """DoRA, rsLoRA and gaussian on the 4-bit base, DoRA on bf16: the merged model matches base+adapter, and
    its held-out loss is the one training ended with (parity alone would pass a merge whose reference is
    wrong too: that is how OLoRA's residual base was caught)."""
    import yaml

    from qlorax.engine.model import INIT_LORA_WEIGHTS

    seen = set()
    for run_dir in variant_runs:
        lora = yaml.safe_load((run_dir / "spec.yaml").read_text())["lora"]
        adapter = json.loads((run_dir / "checkpoints" / "step-000005" / "adapter_config.json").read_text())
        assert (adapter["use_dora"], adapter["use_rslora"]) == (lora["use_dora"], lora["use_rslora"])
        assert adapter["init_lora_weights"] == INIT_LORA_WEIGHTS[lora["init"]]
        merge = json.loads((run_dir / "merged" / "merge_info.json").read_text())
        assert merge["max_logit_diff"] <= merge["tolerance"], (lora, merge)
        trained = json.loads((run_dir / "train_summary.json").read_text())["final_eval_loss"]
        verify = json.loads((run_dir / "verify.json").read_text())
        assert abs(verify["tuned_eval_loss"] - trained) < 0.02, (lora, trained, verify["tuned_eval_loss"])
        assert verify["tuned_eval_loss"] < verify["base_eval_loss"], (lora, verify)
        seen.add((lora["use_dora"], lora["init"]))
    assert seen == {(False, "gaussian"), (True, "gaussian"), (True, "default")}


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_residual_base_inits_are_refused_with_the_reason(init):
    """OLoRA and PiSSA train against the base minus the initial adapter; the merge applies the adapter to the
    original weights (merged held-out loss 2.15 against 1.48 at the end of training on the demo base), so
    they are refused until merge converts the adapter."""
    result = run_cli("train", f"lora.init={init}", "quant=none")
    assert_user_error(result, "lora.init", "residual base", "lora.init=gaussian")


# ------------------------------------------------------------------ one table for planner and attachment
@pytest.mark.parametrize("family", list(FAMILIES))
def test_planner_reads_every_family_config(family):
    """The memory planner's view of each family (from config.json names alone) counts exactly the linear
    weights the real model has, and exactly the LoRA parameters peft creates for lora.target_modules=[auto]."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlorax import families
    from qlorax.engine.tiny import build_tokenizer

    class_name, extra, expected_targets = FAMILIES[family]
    config = family_config(class_name, extra, len(build_tokenizer()))
    shape = families.shape_of(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head)
    assert linear == shape.layers * sum(i * o for i, o in families.module_dims(shape).values())
    assert shape.tied == bool(model.config.tie_word_embeddings) and shape.vocab == len(build_tokenizer())

    targets = families.resolve_targets(["auto"], config.model_type)
    assert set(targets) == expected_targets
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == shape.layers * sum(4 * (i + o) for i, o in families.lora_dims(shape, ["auto"]))


def test_unknown_family_falls_back_to_peft_mapping_or_asks_for_targets():
    from qlorax import families

    assert families.default_targets("bloom") == ["query_key_value"]   # peft's mapping
    with pytest.raises(KeyError):
        families.default_targets("no_such_model_type")


@pytest.mark.integration
def test_tokenizer_larger_than_the_embedding_is_refused_before_training(tmp_path):
    """260 byte-level tokens against a 200-row embedding: ids 200..259 would raise IndexError mid-forward."""
    model_dir = build_family_model(tmp_path / "model", "LlamaConfig", {}, vocab_size=200)
    result = run_cli("train", f"model.path={model_dir}", *FAST, f"run_dir={tmp_path / 'run'}")
    assert_user_error(result, "260 tokens", "only 200 rows", "model.path")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ shipped model options
def _hub_model_options() -> list[str]:
    from qlorax.spec import group_options

    return [o for o in group_options("model") if o not in ("tiny", "stories260k")]


@pytest.mark.parametrize("option", _hub_model_options())
def test_shipped_model_option_plans_offline_from_its_size_hints(option):
    """Each hub model option composes and its size hints alone give the memory planner the model's size:
    bf16 weights within 3% of 2 bytes x the parameter count, NF4 less (embeddings stay bf16)."""
    from qlorax.memory import estimate
    from qlorax.spec import compose

    bf16 = estimate(compose([f"model={option}", "quant=none", "train.precision=bf16"]))
    nf4 = estimate(compose([f"model={option}", "train.precision=bf16"]))
    spec = compose([f"model={option}"])
    assert "/" in spec.model.path and bf16.shape_source == "size hints in the model config"
    assert bf16.weights == pytest.approx(spec.model.params_b * 1e9 * 2, rel=0.03)
    assert nf4.weights < 0.75 * bf16.weights and nf4.lora > 0 and nf4.total > nf4.weights


def test_plan_of_an_instruct_model_works_offline(tmp_path):
    result = run_cli("plan", "model=phi3_mini_instruct", "data=alpaca", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "microsoft/Phi-3-mini-4k-instruct" in result.stdout and "size hints in the model config" in result.stdout


def test_gpt2_conv1d_layers_are_quantized_while_streaming(tmp_path):
    """GPT-2 keeps its projections in Conv1D (weight stored in x out): they become 4-bit layers too,
    holding the transposed weight, instead of staying bf16 unnoticed."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from qlorax.engine.quant import bnb as bnb_backend
    from qlorax.engine.quant import load_base_model
    from qlorax.spec import compose

    model_dir = build_family_model(tmp_path / "gpt2", "GPT2Config", {})
    original = load_file(str(model_dir / "model.safetensors"))
    model = load_base_model(compose([f"model.path={model_dir}"]), str(model_dir), "fp32")
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        layer = model.get_submodule(f"transformer.h.0.{name}")
        assert isinstance(layer, bnb.nn.Linear4bit), (name, type(layer))
        stored = original[f"transformer.h.0.{name}.weight"]          # (in, out)
        dense = bnb_backend.dequantize_layer(layer).float()          # (out, in)
        assert dense.shape == stored.t().shape
        relative_error = float((dense - stored.t()).norm() / stored.norm())   # NF4: ~0.1; a wrong layout: ~1.4
        assert relative_error < 0.2, (name, relative_error)


def test_dora_needs_bitsandbytes_weights_not_ipex_llm_ones():
    from qlorax.errors import ConfigError
    from qlorax.spec import compose

    for override, key in (("lora.use_dora=true", "lora.use_dora"),):
        with pytest.raises(ConfigError) as caught:
            compose(["quant=bigdl", override])
        assert key in str(caught.value) and "bitsandbytes" in str(caught.value)


def test_vocab_check_counts_the_loaded_tokenizer_and_allows_padded_embeddings(tmp_path):
    """A model may have more embedding rows than tokens (vocabularies padded to a multiple of 64); never fewer."""
    from qlorax.engine.model import check_vocab_fits
    from qlorax.errors import QloraxError

    padded = build_family_model(tmp_path / "padded", "LlamaConfig", {}, vocab_size=320)
    check_vocab_fits(str(padded))                      # 260 tokens (tokenizer.json) into 320 rows
    with pytest.raises(QloraxError, match="has 400 tokens but the model's embedding has only 320 rows"):
        check_vocab_fits(str(padded), tokenizer_size=400)   # the size of a loaded (e.g. sentencepiece) tokenizer


@pytest.mark.integration
def test_dora_gaussian_run_resumes_bit_identically(tmp_path):
    """OLoRA rewrites the 4-bit base weights at attach time and DoRA adds magnitude vectors: a resumed run
    must rebuild the same base and restore both, ending with the adapter the uninterrupted run wrote."""
    from safetensors.torch import load_file

    args = ("train", *FAST, "train.max_steps=4", "train.save_steps=2", "lora.use_dora=true", "lora.init=gaussian",
            f"run_dir={tmp_path / 'run'}")
    assert run_cli(*args).returncode == 0
    final = tmp_path / "run" / "checkpoints" / "step-000004"
    uninterrupted = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in uninterrupted)
    for path in sorted(final.iterdir()):
        path.unlink()
    final.rmdir()                                   # as if killed between the step-2 and step-4 checkpoints
    resumed_run = run_cli(*args)
    assert resumed_run.returncode == 0 and "resumed from" in resumed_run.stdout + resumed_run.stderr
    resumed = load_file(str(final / "adapter_model.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    assert all((uninterrupted[k] == resumed[k]).all() for k in uninterrupted)
