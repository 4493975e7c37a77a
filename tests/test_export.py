"""GGUF export against the real tools: gguf-py's GGUFReader reads the file back, and llama.cpp
(llama-cpp-python, when installed) runs the exported stories260K greedy from BOS like transformers does."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli, run_quotes_recipe

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'qlorax[gguf]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short stories260K run through train -> merge -> export (f16), then `qlorax export gguf_type=q8_0`."""
    run_dir, model, _ = run_quotes_recipe(tmp_path_factory, "gguf", "train.max_steps=2", "data.max_rows=40",
                                          "stages=[train,merge,export]", "quiet=true")
    result = run_cli("export", f"run_dir={run_dir}", "format=gguf", "gguf_type=q8_0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, model


def _reader(path):
    return gguf.GGUFReader(path)


def _merged_tensors(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "merged" / "model.safetensors"))


@pytest.mark.integration
def test_gguf_holds_the_merged_weights_metadata_and_vocabulary(exported):
    run_dir, model = exported
    config = json.loads((run_dir / "merged" / "config.json").read_text())
    reader = _reader(run_dir / "export" / "model-f16.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "llama"
    assert field["llama.block_count"] == config["num_hidden_layers"]
    assert field["llama.embedding_length"] == config["hidden_size"]
    assert field["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert field["llama.feed_forward_length"] == config["intermediate_size"]
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert field["qlorax.merged_from"].startswith(
        json.loads((run_dir / "merged" / "merge_info.json").read_text())["adapter_sha256"])

    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    tokens = field["tokenizer.ggml.tokens"]
    assert field["tokenizer.ggml.model"] == "llama" and len(tokens) == config["vocab_size"]
    assert tokens[:sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert field["tokenizer.ggml.bos_token_id"] == sp.bos_id() and field["tokenizer.ggml.eos_token_id"] == sp.eos_id()

    merged = _merged_tensors(run_dir)
    tensors = {t.name: t for t in reader.tensors}
    # every merged weight is there once (the tied head is token_embd), under llama.cpp's names
    assert len(tensors) == len(merged) and "output.weight" not in tensors
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(np.asarray(embd.data), merged["model.embed_tokens.weight"].astype(np.float16))
    # q rows are permuted to llama.cpp's rope layout: the same rows, pairs interleaved per head
    q_hf = merged["model.layers.1.self_attn.q_proj.weight"].astype(np.float16)
    q_gguf = np.asarray(tensors["blk.1.attn_q.weight"].data)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert not np.array_equal(q_gguf, q_hf)
    np.testing.assert_array_equal(q_gguf[0:head_dim:2], q_hf[0:head_dim // 2])
    np.testing.assert_array_equal(q_gguf[1:head_dim:2], q_hf[head_dim // 2:head_dim])


@pytest.mark.integration
def test_q8_0_quantizes_what_splits_into_blocks_and_keeps_the_rest_f16(exported):
    run_dir, _ = exported
    reader = _reader(run_dir / "export" / "model-q8_0.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16   # 172 inputs: no blocks of 32
    v = tensors["blk.0.attn_v.weight"]
    restored = gguf.quants.dequantize(np.asarray(v.data), v.tensor_type)
    original = _merged_tensors(run_dir)["model.layers.0.self_attn.v_proj.weight"]
    assert np.abs(restored - original).max() <= np.abs(original).max() / 127   # within one q8_0 step


@pytest.mark.integration
def test_rerunning_export_is_a_noop_and_the_tiny_tokenizer_is_refused(exported, tmp_path):
    run_dir, _ = exported
    target = run_dir / "export" / "model-f16.gguf"
    before = target.stat().st_mtime_ns
    result = run_cli("export", f"run_dir={run_dir}")
    assert result.returncode == 0 and "nothing to do" in result.stderr, result.stderr[-2000:]
    assert target.stat().st_mtime_ns == before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]   # no temporary left behind

    refused = run_cli("run", f"run_dir={tmp_path / 'tiny'}", "stages=[train,merge,export]", "train.max_steps=1")
    assert_user_error(refused, "GGUF export needs a SentencePiece tokenizer (tokenizer.model)", "model=stories260k")
    assert not (tmp_path / "tiny" / "checkpoints").exists()   # refused before training


def test_an_unmapped_architecture_is_refused_naming_the_supported_ones(tmp_path):
    from qlorax.engine.export.gguf import check_architecture
    from qlorax.errors import QloraxError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(QloraxError, match="maps the LlamaForCausalLM, MistralForCausalLM architectures, not Qwen2"):
        check_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(QloraxError, match="rope scaling 'llama3'"):
        check_architecture(tmp_path)


@pytest.mark.integration
def test_llama_cpp_generates_what_transformers_generates(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip builds it from "
                                    "source with cmake, several minutes): pip install llama-cpp-python")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    with torch.no_grad():
        expected = model.generate(torch.tensor([[tokenizer.bos_token_id]]), do_sample=False, max_new_tokens=24,
                                  min_new_tokens=24)[0, 1:].tolist()
    llm = llama_cpp.Llama(model_path=str(run_dir / "export" / "model-f16.gguf"), n_ctx=64, n_threads=2,
                          verbose=False, seed=0)
    got = []
    for token in llm.generate([llm.token_bos()], top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected):
            break
    words = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).split()
    assert len(words(expected)) >= 8, tokenizer.decode(expected)
    assert words(got)[:8] == words(expected)[:8], (tokenizer.decode(got), tokenizer.decode(expected))
