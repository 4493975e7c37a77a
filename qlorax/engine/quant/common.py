"""What every quantization backend's loader shares: dtypes, hub arguments, and keeping load memory low."""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

from qlorax.schema import RunSpec


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def dtype_kwarg(dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before
    (the bigdl backend needs transformers 4.3x)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def hub_kwargs(spec: RunSpec) -> dict[str, Any]:
    """trust_remote_code, revision and the hub token (read from the environment, never stored)."""
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if spec.model.revision:
        kwargs["revision"] = spec.model.revision
    token = os.environ.get(spec.model.hub_token_env)
    if token:
        kwargs["token"] = token
    return kwargs


def pretrained_kwargs(spec: RunSpec, dtype) -> dict[str, Any]:
    """The arguments every backend passes to ``from_pretrained`` for a CPU load."""
    return {**dtype_kwarg(dtype), "device_map": "cpu", "low_cpu_mem_usage": True,
            "use_safetensors": None if spec.model.allow_pickle else True, **hub_kwargs(spec)}


def no_hub_kernels(model) -> None:
    """Switch off transformers' Hub kernels for this model (on by default where the ``kernels`` package is installed,
    which transformers 5 requires): they are code fetched from the Hub, and every ``model.train()`` re-kernelizes,
    which put transformers' own forward back over the lean kernels' RMSNorm patch (seen on plain bf16 loads: the
    patch was silently undone, its speed and memory lost)."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False   # resets any kernelized forward; train() then leaves the modules alone


# ---------------------------------------------------------------- allocator
def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _tcmalloc_release():
    """tcmalloc's MallocExtension_ReleaseFreeMemory where tcmalloc is the process's allocator, else None."""
    import ctypes

    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the temporaries freed while quantizing back to the OS (glibc and tcmalloc keep them otherwise).

    tcmalloc (qlorax's allocator while training, see hardware.allocator_env) keeps freed pages for reuse; when
    the int8 copy of each layer is made from its dequantized fp32 weight, the freed temporaries it cannot reuse
    (the int8 weights sit between them) stayed resident: +385 MiB on the 1.1B shape.
    """
    release = _tcmalloc_release()
    if release is not None:
        release()
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def quantizing_allocator():
    """While quantizing, blocks over 1 MiB are mmapped, so each freed bf16 temporary goes back to the OS.

    glibc raises its mmap threshold as big blocks are freed and then recycles them in the heap,
    which fragments it: loading the 1.1B shape peaked anywhere from 1.4 to 2.0 GiB from run to run;
    with this, 1.33 GiB every time, about 2 s slower. Afterwards the threshold is fixed at 32 MiB,
    where glibc's own adjustment ends up, with a 64 MiB trim threshold.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


# ---------------------------------------------------------------- checkpoint mapping
def detach_from_checkpoint_file(model) -> None:
    """Copy tensors that still view the memory-mapped checkpoint, so the mapping is released.

    After 4-bit quantization only the small unquantized tensors (embeddings, norms, head)
    can still point into the safetensors mmap; while one does, the whole mapping and the
    file pages it touched stay with the process. Linux only (reads /proc/self/maps).
    """
    import torch

    ranges = _checkpoint_mappings()
    if not ranges:
        return
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or tensor.numel() == 0:
                continue
            start = tensor.untyped_storage().data_ptr()
            if not any(lo <= start < hi for lo, hi in ranges):
                continue
            copy = tensor.detach().clone()
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = copy
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    gc.collect()


def _checkpoint_mappings() -> list[tuple[int, int]]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    ranges = []
    for line in maps.splitlines():
        if line.endswith(".safetensors"):
            lo, hi = line.split(None, 1)[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges
