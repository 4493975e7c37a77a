"""bitsandbytes NF4 / FP4 (optionally double-quantized): the default 4-bit backend.

Local safetensors checkpoints are quantized while they are read (``stream.load_streaming``); hub ids
and unusual checkpoints go through transformers' own bitsandbytes loader. ``prepare_cpu`` then makes the
4-bit layers train correctly and fast on the CPU (``bnb_cpu``).
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

from qlorax.engine.quant import stream
from qlorax.engine.quant.common import pretrained_kwargs, quantizing_allocator, torch_dtype
from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")
INSTALL = "pip install 'bitsandbytes>=0.45'"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def load(spec: RunSpec, path: str, compute_dtype: str):
    """The base model with every decoder linear layer in bitsandbytes 4-bit."""
    if not available():
        raise QloraxError(f"quant.backend=bnb needs bitsandbytes: {INSTALL} (or train without quantization: quant=none)")
    q = spec.quant
    dtype = torch_dtype(compute_dtype)
    settings = dict(quant_type=q.type, double_quant=q.double_quant, compute_dtype=dtype, skip_modules=list(q.skip_modules))
    prequantized = Path(q.prequantized_dir) if q.prequantized_dir else None
    with quantizing_allocator():
        model = _quantized_model(spec, path, dtype, settings, prequantized)
    prepare_cpu(model, q.bf16_matmul)
    if prequantized and not stream.is_prequantized(prequantized):
        from transformers import AutoTokenizer

        save_quantized(model, prequantized, AutoTokenizer.from_pretrained(path), **settings)
        log.info("saved the quantized checkpoint to %s: later runs with quant.prequantized_dir=%s skip quantizing",
                 prequantized, prequantized)
    return model


def _quantized_model(spec: RunSpec, path: str, dtype, settings: dict, prequantized: Path | None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = spec.quant
    model = None
    if prequantized and stream.is_prequantized(prequantized):
        log.info("loading the already-quantized checkpoint %s", prequantized)
        kwargs = pretrained_kwargs(spec, dtype)
        kwargs["use_safetensors"] = True
        model = AutoModelForCausalLM.from_pretrained(prequantized, **kwargs)
    elif stream.can_stream(path):
        model = stream.load_or_none(path, compute_dtype=dtype, skip_modules=settings["skip_modules"],
                                    make_linear=_linear4bit_maker(q.type, q.double_quant, dtype),
                                    set_weight=_weight_setter(q.type, q.double_quant, dtype),
                                    trust_remote_code=spec.model.trust_remote_code)
        if model is not None:
            model.is_loaded_in_4bit = True   # peft picks its 4-bit LoRA layers from this flag
    if model is None:   # hub ids and checkpoints with renamed keys: transformers quantizes them
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                                    bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(q.skip_modules))
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, **pretrained_kwargs(spec, dtype))
    return model


def _linear4bit_maker(quant_type: str, double_quant: bool, compute_dtype):
    def make(linear):
        import bitsandbytes as bnb
        import torch

        return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                                 quant_storage=torch.uint8, device="meta")
    return make


def _weight_setter(quant_type: str, double_quant: bool, compute_dtype):
    def set_weight(module, tensor) -> None:
        import bitsandbytes as bnb
        import torch

        weight = bnb.nn.Params4bit(tensor.to(compute_dtype), requires_grad=False, blocksize=64,
                                   compress_statistics=double_quant, quant_type=quant_type,
                                   quant_storage=torch.uint8, module=module)
        module.weight = weight._quantize("cpu")
    return set_weight


def prepare_cpu(model, bf16_matmul: str = "auto") -> dict:
    """Make bitsandbytes' 4-bit layers train correctly and fast on the CPU.

    Pitfall: a Linear4bit run in eval mode without gradients on an AVX512-BF16 CPU repacks
    its weight in place for an inference kernel; later training steps then use the repacked
    bytes as if they were the original layout and get wrong adapter gradients (only a
    UserWarning). The same kernel also rejects layers whose output size is not a multiple of
    its block. The two matmuls per weight per micro-batch run in AMX tile kernels that decode the 4-bit weight
    (``quant.bf16_matmul``, ``bnb_cpu.use_tile_kernels``); elsewhere its dequantization is spread over threads and
    writes into a reused scratch buffer (bnb_cpu.linear4bit_forward). Returns ``use_tile_kernels``' report.
    """
    import bitsandbytes as bnb

    from qlorax.engine.quant import bnb_cpu

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.forward = types.MethodType(bnb_cpu.linear4bit_forward, module)
    bnb_cpu.install()
    return bnb_cpu.use_tile_kernels(model, bf16_matmul)


def save_quantized(model, out_dir: Path, tokenizer, quant_type: str, double_quant: bool, compute_dtype,
                   skip_modules: list[str]) -> None:
    """Write the 4-bit model in bitsandbytes' serialization, loadable by transformers (and by qlorax)."""
    import json

    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue   # tied head/embeddings: saved once
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                      llm_int8_skip_modules=list(skip_modules))
    config = model.config.to_dict()
    config["quantization_config"] = quantization.to_dict()
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))
    tokenizer.save_pretrained(out_dir)


def dequantize_layer(layer):
    """The bf16/fp32 weight of a bitsandbytes 4-bit layer, or None for any other layer."""
    weight = getattr(layer, "weight", None)
    if weight is None or not hasattr(weight, "quant_state"):
        return None
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, weight.quant_state)


def weight_bytes(param) -> int:
    """Bytes of a 4-bit weight including its block constants (nested ones for double quantization)."""
    state = getattr(param, "quant_state", None)
    total = param.numel() * param.element_size()
    while state is not None:
        total += sum(t.numel() * t.element_size() for t in (getattr(state, "absmax", None), getattr(state, "code", None))
                     if t is not None and hasattr(t, "numel"))
        state = getattr(state, "state2", None)
    return total
