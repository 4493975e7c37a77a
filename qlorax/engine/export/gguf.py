"""GGUF export of a merged Llama-architecture model, the way llama.cpp's ``convert_hf_to_gguf.py`` does it.

    merged/ (safetensors, config.json, tokenizer.model)  ->  run_dir/export/model-<type>.gguf

- Tensors are renamed with gguf-py's own Llama name map (``blk.N.attn_q.weight``, ...); q and k
  projections are permuted from Hugging Face's rotate-half rope layout back to the interleaved layout
  llama.cpp's rope expects; a tied head is left out (llama.cpp reuses ``token_embd``).
- 2-D weights are stored as ``export.gguf_type`` (f16, bf16, q8_0); q8_0 needs rows in blocks of 32,
  so a weight whose rows do not split (e.g. an FFN of 172) stays f16, as llama.cpp does. 1-D tensors
  (norms) stay f32.
- The vocabulary is SentencePiece's (``tokenizer.model``: pieces, scores, token types), special token
  ids and add-bos/eos flags come from the tokenizer files next to it (gguf-py's ``SpecialVocab``).
- Tensors are read, converted and written one at a time, so a 7B model never sits in memory whole.
  The file is written under a temporary name and renamed; a file already exported from the same merged
  model (adapter, merge base, dtype) with the same type is kept (rerunning is a no-op).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

from qlorax.errors import QloraxError, StageInputMissing
from qlorax.paths import RunPaths, read_json
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")

# Hugging Face architecture -> GGUF architecture; both share Llama's tensors and rope.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}   # configs saved without `architectures`
SOURCE_KEY = "qlorax.merged_from"      # adapter hash, merge base and dtype of merged/ (idempotent reruns)
SKIPPED = ("rotary_emb.inv_freq",)     # buffers some checkpoints carry; llama.cpp computes them


def check_model(model_dir: str | Path) -> None:
    """Refuse early a base model whose architecture or tokenizer the exporter cannot map."""
    if check_architecture(model_dir):
        _find_tokenizer_model(Path(model_dir))


def check_architecture(model_dir: str | Path) -> dict[str, Any]:
    """config.json of ``model_dir`` if its architecture is mapped; a QloraxError naming the supported ones otherwise."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return {}   # a hub id: checked when the merged model exists
    config = json.loads(config_path.read_text())
    if _architecture(config) not in ARCHITECTURES:
        raise QloraxError(f"GGUF export maps the {', '.join(ARCHITECTURES)} architectures, not {_architecture(config)} "
                          f"({config_path}); convert merged/ with llama.cpp's convert_hf_to_gguf.py instead")
    scaling = _rope_scaling(config)
    if scaling.get("rope_type", "default") not in ("default", "linear"):
        raise QloraxError(f"GGUF export: rope scaling '{scaling['rope_type']}' ({config_path}) is not mapped "
                          "(default and linear are); convert merged/ with llama.cpp's convert_hf_to_gguf.py instead")
    return config


def export(spec: RunSpec) -> dict[str, Any]:
    """Write run_dir/export/model-<export.gguf_type>.gguf from merged/ (a no-op when already exported)."""
    import gguf

    paths = RunPaths(spec.run_dir)
    merge_info = read_json(paths.merge_info)
    if not merge_info:
        raise StageInputMissing(f"no merged model in {paths.merged}: run `qlorax merge run_dir={paths.root}` first")
    config = check_architecture(paths.merged)
    tokenizer_model = _find_tokenizer_model(paths.merged, *[Path(p) for p in [merge_info.get("base_path")] if p])
    kind = spec.export.gguf_type
    target = paths.gguf(kind)
    source = f"{merge_info['adapter_sha256']}:{merge_info.get('base')}:{merge_info.get('dtype')}"
    if _exported_from(target) == source:
        log.info("export: %s already holds adapter step %s as %s: nothing to do", target, merge_info["adapter_step"], kind)
        return {"path": str(target), "gguf_type": kind, "skipped": True}

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    paths.export.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(staging, ARCHITECTURES[_architecture(config)])
    try:
        _write_parameters(writer, config, kind, paths.root.name)
        writer.add_string(SOURCE_KEY, source)
        _write_vocab(writer, tokenizer_model, paths.merged, config["vocab_size"])
        plan = list(_plan_tensors(paths.merged, config, qtype))
        for name, shape, stored, _ in plan:
            packed = gguf.quant_shape_to_byte_shape(shape, stored)   # what quantize() returns for this type
            dtype = _numpy_dtype(stored)
            writer.add_tensor_info(name, packed if dtype == "uint8" else shape, dtype,
                                   int(math.prod(packed)), raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        counts: dict[str, int] = {}
        for _, _, stored, load in plan:
            writer.write_tensor_data(gguf.quants.quantize(load(), stored))
            counts[stored.name] = counts.get(stored.name, 0) + 1
        writer.close()
        os.replace(staging, target)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    size = target.stat().st_size
    log.info("export: wrote %s (%.1f MiB; tensors: %s) from adapter step %s", target, size / 2**20,
             ", ".join(f"{n} {t}" for t, n in sorted(counts.items())), merge_info["adapter_step"])
    return {"path": str(target), "gguf_type": kind, "bytes": size, "tensor_types": counts}


def _write_parameters(writer, config: dict, kind: str, name: str) -> None:
    """The llama.* hyper-parameters llama.cpp reads, from the Hugging Face config."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = _rope_scaling(config)
    writer.add_rope_freq_base(float(scaling.get("rope_theta") or config.get("rope_theta") or 10000.0))
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _architecture(config: dict) -> str:
    """The Hugging Face architecture class named by a config (its ``architectures``, else its ``model_type``)."""
    names = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), config.get("model_type", "unknown"))]
    return names[0]


def _rope_scaling(config: dict) -> dict:
    """Rope settings: transformers >= 5 writes ``rope_parameters``, older versions ``rope_scaling``."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _find_tokenizer_model(*folders: Path) -> Path:
    """tokenizer.model (SentencePiece) of the first folder that has one (merged/, then the base model)."""
    for folder in folders:
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    raise QloraxError(f"GGUF export needs a SentencePiece tokenizer (tokenizer.model) in {' or '.join(map(str, folders))}; "
                      "other tokenizers (e.g. the built-in tiny model's byte-level one) are not mapped: export a Llama "
                      "model with a SentencePiece tokenizer (model=stories260k, llama2_7b, tinyllama_1_1b)")


def _write_vocab(writer, tokenizer_model: Path, merged: Path, vocab_size: int) -> None:
    """SentencePiece pieces, scores and token types; special ids and add-bos/eos from the tokenizer files."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]   # rows of the embedding past the tokenizer's
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(merged, n_vocab=vocab_size).add_to_gguf(writer)


def _plan_tensors(merged: Path, config: dict, qtype) -> Iterator[tuple]:
    """(GGUF name, shape, stored type, loader) per tensor, reading only shapes here."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
        for key in keys:
            if key.endswith(SKIPPED):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise QloraxError(f"GGUF export: tensor {key} of {file} has no llama.cpp name; this checkpoint is "
                                  "not a plain Llama model")
            shape = shapes[key]
            stored = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
            if stored == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[stored][0]:
                stored = gguf.GGMLQuantizationType.F16   # rows do not split into q8_0 blocks of 32
            n_heads = heads if key.endswith("q_proj.weight") else kv_heads if key.endswith("k_proj.weight") else 0
            yield name, shape, stored, _loader(file, key, n_heads)


def _loader(file: Path, key: str, rope_heads: int):
    """Reads one tensor as float32 numpy, permuting q/k rows for llama.cpp's rope when ``rope_heads``."""
    def load():
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            data = f.get_tensor(key).float().numpy()
        return _unrotate_half(data, rope_heads) if rope_heads else data
    return load


def _unrotate_half(weight, n_heads: int):
    """Hugging Face stores each head's q/k rows as [first halves | second halves] (rotate_half rope);
    llama.cpp's rope pairs neighbouring rows: interleave the two halves back, head by head."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _numpy_dtype(qtype):
    """The array dtype GGUFWriter expects for a stored type: f32/f16 as such, packed types as bytes."""
    import gguf
    import numpy as np

    return {gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
            gguf.GGMLQuantizationType.F16: np.dtype(np.float16)}.get(qtype, np.dtype(np.uint8))


def _exported_from(target: Path) -> str | None:
    """The adapter hash recorded in an existing export, or None (absent or unreadable)."""
    if not target.is_file():
        return None
    try:
        import gguf

        field = gguf.GGUFReader(target).get_field(SOURCE_KEY)
        return field.contents() if field is not None else None
    except Exception:   # cut short or foreign: rewrite it
        return None
