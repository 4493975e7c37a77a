"""The merge stage: adapter + base -> a plain Hugging Face model in ``merged/``, checked for parity.

The merged directory loads with ``AutoModelForCausalLM.from_pretrained`` and nothing from
qlorax installed. Its logits are compared with base+adapter (unmerged) on held-out
examples; above ``merge.tolerance`` the stage fails. Rerunning for the same adapter is a no-op.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlorax.engine import checkpoint
from qlorax.engine.data import collate, prepare
from qlorax.engine.model import dtype_kwarg, load_base_model, load_tokenizer, resolve_model_path
from qlorax.errors import QloraxError
from qlorax.paths import RunPaths, read_json
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def merge(spec: RunSpec) -> dict[str, Any]:
    """Merge the latest valid adapter of the run into the base and save it under merged/."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    paths = RunPaths(spec.run_dir)
    step, adapter_dir = checkpoint.require_adapter(paths)
    adapter_sha = json.loads((adapter_dir / checkpoint.MANIFEST).read_text())["files"]["adapter_model.safetensors"]
    done = read_json(paths.merge_info)
    if done.get("adapter_sha256") == adapter_sha and done.get("base") == spec.merge.base and paths.merged.is_dir():
        log.info("merge: already merged adapter step %d into %s (%s base, max |logit diff| %.3g): nothing to do",
                 step, paths.merged, done["base"], done["max_logit_diff"])
        return {**done, "skipped": True}

    model_path = resolve_model_path(spec)
    tokenizer = load_tokenizer(spec, model_path)
    base = _load_merge_base(spec, model_path)
    save_dtype = _save_dtype(spec, model_path)
    log.info("merge: adapter %s into the %s base weights (%s), saving %s", adapter_dir.name,
             "original" if spec.merge.base == "original" else "dequantized 4-bit", model_path, save_dtype)

    data = prepare(spec, tokenizer, paths)
    samples = (data.eval or data.train)[: spec.merge.parity_samples]
    ids, mask, _ = collate(samples, tokenizer.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(input_ids=ids, attention_mask=mask).logits.float()
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True   # training switched the KV cache off; generation wants it back

    paths.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merged-", dir=paths.root))
    try:
        merged.to(save_dtype).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        generation = getattr(merged, "generation_config", None) or GenerationConfig.from_model_config(merged.config)
        generation.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, **dtype_kwarg(torch.float32), device_map="cpu")
        reloaded.eval()
        with torch.no_grad():
            logits = reloaded(input_ids=ids, attention_mask=mask).logits.float()
        valid = mask.bool()
        diff = float((logits - reference).abs()[valid].max())
        info = {"adapter": str(adapter_dir), "adapter_step": step, "adapter_sha256": adapter_sha,
                "base": spec.merge.base, "base_path": model_path, "dtype": str(save_dtype).replace("torch.", ""),
                "max_logit_diff": diff, "tolerance": spec.merge.tolerance, "parity_samples": len(samples)}
        if diff > spec.merge.tolerance:
            raise QloraxError(f"merge: merged logits differ from base+adapter by {diff:.4g} > merge.tolerance="
                              f"{spec.merge.tolerance:g}; the merged model does not reproduce the adapter "
                              "(try merge.dtype=fp32, or merge.base=dequantized to match the 4-bit training weights)")
        (staging / "merge_info.json").write_text(json.dumps(info, indent=1))
        if paths.merged.exists():
            shutil.rmtree(paths.merged)
        os.rename(staging, paths.merged)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("merge: saved %s; max |logit diff| vs base+adapter on %d held-out examples: %.3g (tolerance %g)",
             paths.merged, len(samples), diff, spec.merge.tolerance)
    return info


def _save_dtype(spec: RunSpec, model_path: str):
    import torch

    if spec.merge.dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.merge.dtype]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=spec.model.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def _load_merge_base(spec: RunSpec, model_path: str):
    """fp32 base to merge into: the original weights, or the dequantized 4-bit ones that were trained."""
    if spec.merge.base == "original" or spec.quant.backend == "none":
        return load_base_model(spec, model_path, "fp32", quantize=False)
    model = load_base_model(spec, model_path, "fp32", quantize=True)
    return dequantize(model)


def dequantize(model):
    """Replace every 4-bit linear layer by a plain fp32 nn.Linear with its dequantized weight."""
    import torch

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if weight is None or not (hasattr(weight, "quant_state") or weight.dtype in (torch.uint8, torch.int8)):
                continue
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            dense.weight.data = _dequantize_weight(child).float()
            if child.bias is not None:
                dense.bias.data = child.bias.data.float()
            dense.requires_grad_(False)
            setattr(module, child_name, dense)
            replaced += 1
    if replaced == 0:
        raise QloraxError("merge.base=dequantized: the model has no 4-bit layers to dequantize; use merge.base=original")
    # The model is a plain one now: drop transformers' bnb markers (they forbid dtype casts).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for marker in ("bigdl_transformers_low_bit", "bigdl_disk_embedding"):   # ipex-llm's: "load me as 4-bit"
        if hasattr(model.config, marker):
            delattr(model.config, marker)
    for attr, plain in (("quantization_method", None), ("hf_quantizer", None), ("is_loaded_in_4bit", False)):
        if attr in model.__dict__:
            setattr(model, attr, plain)
    for param in model.parameters():
        param.data = param.data.float()
    return model


def _dequantize_weight(layer):
    weight = layer.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, weight.quant_state)
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    if type(layer).__name__ == "LowBitLinear" and getattr(layer, "qtype", None) is not None:   # ipex-llm / bigdl-llm
        import importlib

        to_fp32 = importlib.import_module(type(layer).__module__).ggml_int4_convert_fp32
        return to_fp32(weight.data, weight._shape, weight._shape[0] * weight._shape[1]).reshape(weight._shape)
    raise QloraxError(f"merge.base=dequantized: cannot dequantize a {type(layer).__name__} layer; use merge.base=original")
