"""Quantize while loading: build the model on the meta device, then read the safetensors checkpoint
one tensor at a time (plain reads, no mmap) and quantize each linear weight as it arrives.

Why: transformers' loader maps the whole bf16 checkpoint and touches every page before the
4-bit weights exist, so the process peaks at bf16 size plus 4-bit size (1.1B shape: 4.1 GiB
against 2.2 GiB of bf16 weights). Streaming keeps the peak at the 4-bit model plus the largest
single tensor, so a 7B model never needs its bf16 size in RAM.

Also saves and loads an already-quantized checkpoint (bitsandbytes' serialization, which plain
transformers loads too), like the reference's ``save_low_bit`` / ``load_low_bit``.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from qlorax.errors import QloraxError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qlorax")
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def read_tensors(files: list[Path]) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor) for every tensor of the safetensors files, read with plain file reads."""
    import torch

    for file in files:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            base = 8 + header_len
            for name, meta in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                     key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = meta["data_offsets"]
                buffer = bytearray(end - start)
                f.seek(base + start)
                f.readinto(buffer)
                dtype = getattr(torch, DTYPES[meta["dtype"]])
                tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(meta["shape"])


def can_stream(path: str) -> bool:
    local = Path(path)
    return local.is_dir() and bool(checkpoint_files(local)) and not is_prequantized(local)


def is_prequantized(local: Path) -> bool:
    """A checkpoint saved already quantized (its config.json carries a quantization_config)."""
    try:
        return "quantization_config" in json.loads((local / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_quantized(path: str, quant_type: str, double_quant: bool, compute_dtype, skip_modules: list[str],
                   trust_remote_code: bool = False):
    """The causal LM at ``path`` with every decoder linear layer in bitsandbytes 4-bit, quantized while reading."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlorax.engine.model import dtype_kwarg

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **dtype_kwarg(compute_dtype))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is torch.nn.Linear and not any(full == s or full.endswith("." + s) for s in skip_modules):
                setattr(parent, child_name, bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                    compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8, device="meta"))
    expected = set(model.state_dict().keys())
    for name, tensor in read_tensors(checkpoint_files(Path(path))):
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue   # old checkpoints carry this buffer; the model recomputes it
            raise _Unsupported(f"checkpoint tensor {name} has no place in {type(model).__name__}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
            weight = bnb.nn.Params4bit(tensor.to(compute_dtype), requires_grad=False, blocksize=64,
                                       compress_statistics=double_quant, quant_type=quant_type,
                                       quant_storage=torch.uint8, module=module)
            module.weight = weight._quantize("cpu")
        elif attr in module._parameters:
            value = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor.clone()
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor.clone()
        del tensor
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialize_computed_buffers(model, config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise _Unsupported(f"{len(left)} tensor(s) missing from the checkpoint, e.g. {left[0]}")
    # peft decides on its 4-bit LoRA layers from this flag (transformers sets it when it quantizes).
    model.is_loaded_in_4bit = True
    return model


def _materialize_computed_buffers(model, config) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild their modules."""
    import torch

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            meta_buffers = [b for b in child.buffers(recurse=False) if b.device.type == "meta"]
            if not meta_buffers:
                continue
            try:
                rebuilt = type(child)(config=config)
            except TypeError as exc:
                raise _Unsupported(f"cannot rebuild {type(child).__name__} buffers") from exc
            setattr(parent, child_name, rebuilt.to(torch.device("cpu")))


class _Unsupported(Exception):
    """This checkpoint needs transformers' own loader (renamed keys, custom layouts)."""


def save_quantized(model, out_dir: Path, tokenizer, quant_type: str, double_quant: bool, compute_dtype,
                   skip_modules: list[str]) -> None:
    """Write the 4-bit model in bitsandbytes' serialization, loadable by transformers (and by qlorax)."""
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


def load_or_fail(path: str, **kwargs):
    """``load_quantized``, or None when the checkpoint needs transformers' loader instead."""
    try:
        return load_quantized(path, **kwargs)
    except _Unsupported as exc:
        log.info("streaming 4-bit loader not applicable (%s); using transformers' loader", exc)
        return None
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot read the checkpoint in {path}: {str(exc).splitlines()[0]}") from None
