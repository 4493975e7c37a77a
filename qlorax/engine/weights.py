"""Integrity of a model's safetensors files, checked before anything trains on them.

A cut or damaged weight file can load without an error (the streaming reader reads what is
there; transformers fills missing tensors with random values), and then trains quietly at
chance level. So every file is checked against its own header (the header parses, each
tensor's byte range fits its dtype and shape and lies inside the file), the index against the
files (every shard present, every tensor it maps found in its shard), and the tensor names
against what the model's architecture needs.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from qlorax.errors import QloraxError

INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
FIX = "re-download or re-convert the model (the file is damaged or was cut short)"


def read_header(file: Path) -> dict:
    """The tensor table of one safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QloraxError(f"model.path: {file} is not a safetensors file ({size} bytes); {FIX}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise QloraxError(f"model.path: {file} is not a valid safetensors file (its header length {header_len} "
                              f"does not fit the file's {size} bytes); {FIX}")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise QloraxError(f"model.path: {file} has a damaged header (not JSON); {FIX}") from None
    if not isinstance(header, dict):
        raise QloraxError(f"model.path: {file} has a damaged header; {FIX}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_bytes = size - 8 - header_len
    needed = 0
    for name, meta in tensors.items():
        try:
            start, end = meta["data_offsets"]
            count = math.prod(meta["shape"])
            width = DTYPE_BYTES.get(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise QloraxError(f"model.path: {file}: the header entry of tensor {name} is damaged; {FIX}") from None
        if width is not None and end - start != count * width:
            raise QloraxError(f"model.path: {file}: tensor {name} spans {end - start} bytes but its shape "
                              f"{meta['shape']} of {meta['dtype']} needs {count * width}; {FIX}")
        needed = max(needed, end)
    if needed > data_bytes:
        raise QloraxError(f"model.path: {file} is truncated: its header describes {needed + 8 + header_len} bytes, "
                          f"the file has {size} ({needed - data_bytes} missing); {FIX}")
    return tensors


def check_weight_files(model_dir: Path) -> dict[str, Path]:
    """Check every safetensors file of a model directory; returns {tensor name: file holding it}."""
    index_path = model_dir / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise QloraxError(f"model.path: {index_path} is damaged (no weight_map); {FIX}") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (model_dir / s).is_file()]
        if absent:
            raise QloraxError(f"model.path: {len(absent)} of the {len(shards)} weight shards listed in {INDEX} are "
                              f"missing from {model_dir}: {', '.join(absent[:4])}; download every shard")
        headers = {s: read_header(model_dir / s) for s in shards}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise QloraxError(f"model.path: tensor {name} is listed in {INDEX} but not in {shard}; {FIX}")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    numbered = [m for m in (SHARD_NAME.search(f.name) for f in files) if m]
    if numbered:
        expected = int(numbered[0].group(2))
        if len(numbered) < expected:
            raise QloraxError(f"model.path: {model_dir} holds {len(numbered)} of {expected} weight shards and no "
                              f"{INDEX}; download the missing shards and the index")
    found: dict[str, Path] = {}
    for file in files:
        found.update(dict.fromkeys(read_header(file), file))
    return found


def check_tensors_present(model_dir: Path, found: dict[str, Path], trust_remote_code: bool = False) -> None:
    """Every tensor the architecture needs is in the files (tied weights count once); builds the model on the
    meta device only. Checkpoints that name tensors differently from the model class (converted on load) pass."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:   # an architecture the loader will report on; nothing to compare here
        return
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    names = {name: aliases.get(id(t), [name]) for name, t in model.state_dict(keep_vars=True).items()}
    unknown = [n for n in found if n not in names and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        return   # a renamed layout (transformers maps it while loading): cannot compare names
    missing = sorted(n for n, same in names.items() if not any(a in found for a in same))
    if missing:
        raise QloraxError(f"model.path: {len(missing)} tensor(s) that {type(model).__name__} needs are in none of "
                          f"the weight files of {model_dir}, e.g. {missing[0]}; the files are incomplete or belong "
                          f"to another model: {FIX}")
