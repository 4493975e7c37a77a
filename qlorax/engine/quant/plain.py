"""No quantization: the base in bf16 (or fp32), i.e. plain LoRA — the baseline, and the merge base."""
from __future__ import annotations

from qlorax.engine.quant.common import pretrained_kwargs, torch_dtype
from qlorax.schema import RunSpec

INSTALL = ""


def available() -> bool:
    return True


def load(spec: RunSpec, path: str, compute_dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **pretrained_kwargs(spec, torch_dtype(compute_dtype)))


def dequantize_layer(layer):
    return None

