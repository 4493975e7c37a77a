"""Quantize while loading, for every backend: build the model on the meta device, then read the safetensors
checkpoint one tensor at a time (plain reads, no mmap) and quantize each linear weight as it arrives.

Why: transformers' loader maps the whole bf16 checkpoint and touches every page before the
4-bit weights exist, so the process peaks at bf16 size plus 4-bit size (1.1B shape: 4.1 GiB
against 2.2 GiB of bf16 weights). Streaming keeps the peak at the 4-bit model plus the largest
single tensor, so a 7B model never needs its bf16 size in RAM.

The backend supplies how a linear layer is replaced and how its weight is stored (``load_streaming``).
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

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
    for file in files:
        with file.open("rb") as f:
            base, header = _header(f)
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                yield name, _read(f, base, meta)


def tensor_reader(path: str) -> Callable[[str], "torch.Tensor | None"] | None:
    """``read(name)``: one tensor of a local safetensors checkpoint by name (plain reads), None where it has no such
    tensor; None instead of a reader where ``path`` is not a local safetensors checkpoint."""
    local = Path(path)
    files = checkpoint_files(local) if local.is_dir() else []
    if not files:
        return None
    where = {}
    for file in files:
        with file.open("rb") as f:
            base, header = _header(f)
        where.update({name: (file, base, meta) for name, meta in header.items()})

    def read(name: str):
        if name not in where:
            return None
        file, base, meta = where[name]
        with file.open("rb") as f:
            return _read(f, base, meta)

    return read


def _header(f) -> tuple[int, dict]:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    return 8 + header_len, {k: v for k, v in header.items() if k != "__metadata__"}


def _read(f, base: int, meta: dict) -> "torch.Tensor":
    import torch

    start, end = meta["data_offsets"]
    buffer = bytearray(end - start)
    f.seek(base + start)
    f.readinto(buffer)
    dtype = getattr(torch, DTYPES[meta["dtype"]])
    tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
    return tensor.reshape(meta["shape"])


def can_stream(path: str) -> bool:
    local = Path(path)
    return local.is_dir() and bool(checkpoint_files(local)) and not is_prequantized(local)


def is_prequantized(local: Path) -> bool:
    """A checkpoint saved already quantized (its config.json carries a quantization_config)."""
    try:
        return "quantization_config" in json.loads((local / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_streaming(path: str, compute_dtype, skip_modules: list[str], make_linear: Callable, set_weight: Callable,
                   trust_remote_code: bool = False):
    """The causal LM at ``path``, each decoder linear layer replaced and its weight set while reading.

    ``make_linear(linear)`` builds the replacement of a meta-device ``nn.Linear`` (a 4-bit or int8 layer),
    ``set_weight(layer, tensor)`` stores its weight from the checkpoint's tensor. Every other tensor is
    kept in ``compute_dtype``. Raises ``_Unsupported`` when the checkpoint does not fit the model class.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlorax.engine.quant.common import dtype_kwarg

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **dtype_kwarg(compute_dtype))
    replaced: set[str] = set()
    transposed: set[str] = set()   # GPT-2's Conv1D stores its weight as (in, out): quantized as a Linear's (out, in)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if any(full == s or full.endswith("." + s) for s in skip_modules):
                continue
            if type(child).__name__ == "Conv1D" and child.weight.dim() == 2:
                child = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None,
                                        device="meta")
                transposed.add(full)
            if type(child) is torch.nn.Linear:
                setattr(parent, child_name, make_linear(child))
                replaced.add(full)
    expected = set(model.state_dict().keys())
    for name, tensor in read_tensors(checkpoint_files(Path(path))):
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue   # old checkpoints carry this buffer; the model recomputes it
            raise _Unsupported(f"checkpoint tensor {name} has no place in {type(model).__name__}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if module_name in replaced and attr == "weight":
            set_weight(module, tensor.t().contiguous() if module_name in transposed else tensor)
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


def load_or_none(path: str, **kwargs):
    """``load_streaming``, or None when the checkpoint needs transformers' loader instead."""
    try:
        return load_streaming(path, **kwargs)
    except _Unsupported as exc:
        log.info("streaming 4-bit loader not applicable (%s); using transformers' loader", exc)
        return None
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot read the checkpoint in {path}: {str(exc).splitlines()[0]}") from None
