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
from qlorax.engine.model import load_tokenizer, resolve_model_path
from qlorax.engine.quant import dequantize, load_base_model
from qlorax.engine.quant.common import dtype_kwarg
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
    for stale in paths.merge_staging_dirs():   # the caller holds the run lock: these belong to a killed merge
        log.info("merge: removing %s, left by a merge that was stopped before it finished", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
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
    staging = Path(tempfile.mkdtemp(prefix=paths.MERGE_STAGING_PREFIX, dir=paths.root))
    try:
        merged.to(save_dtype).save_pretrained(staging, safe_serialization=True)
        if os.environ.get("QLORAX_TEST_KILL_IN_MERGE"):   # crash-safety tests only
            os.kill(os.getpid(), 9)
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
