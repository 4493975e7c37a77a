"""Load tokenizer and base model (4-bit or not), attach LoRA.

Quantization backends are small loader functions chosen by ``quant.backend``; each imports
its library lazily, and a missing library is reported with the command that installs it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import types
from pathlib import Path
from typing import Any

from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


# ---------------------------------------------------------------- locating the model
def resolve_model_path(spec: RunSpec) -> str:
    """A local directory (checked) or a hub id, as from_pretrained takes it."""
    if spec.model.path == "builtin:tiny":
        from qlorax.engine.tiny import tiny_model_dir

        return str(tiny_model_dir())
    return check_model_path(spec)


def check_model_path(spec: RunSpec) -> str:
    """Check a local model directory without loading anything (hub ids pass through)."""
    path = spec.model.path
    if path == "builtin:tiny":
        return path
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists() or path.count("/") != 1
    if not looks_local:
        return path  # hub id: from_pretrained resolves it (needs network unless cached)
    if not local.is_dir():
        raise QloraxError(f"model.path: {path} does not exist; give a local model directory "
                          "(with config.json and *.safetensors) or a hub id like meta-llama/Llama-2-7b-hf")
    if not (local / "config.json").is_file():
        raise QloraxError(f"model.path: {local} is not a Hugging Face model directory (no config.json); "
                          "point model.path at the folder that holds config.json and the weights")
    has_safetensors = any(local.glob("*.safetensors"))
    has_pickle = any(local.glob("*.bin")) or any(local.glob("*.pt"))
    if not has_safetensors and not has_pickle:
        raise QloraxError(f"model.path: {local} holds no weights (*.safetensors); download or convert the model first")
    if not has_safetensors and has_pickle and not spec.model.allow_pickle:
        raise QloraxError(f"model.path: {local} only has pickle weights (*.bin), which can run arbitrary code when "
                          "loaded; convert them to safetensors, or allow them with model.allow_pickle=true "
                          "if you trust the source")
    return str(local.resolve())


def _hub_kwargs(spec: RunSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if spec.model.revision:
        kwargs["revision"] = spec.model.revision
    token = os.environ.get(spec.model.hub_token_env)
    if token:
        kwargs["token"] = token
    return kwargs


def load_tokenizer(spec: RunSpec, path: str):
    """Tokenizer with a pad token (unk, else eos, when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(spec))
        except (OSError, ValueError):
            raise
        except Exception as exc:   # the tokenizers library's parse error: tokenizer.json is newer than it
            import tokenizers

            log.warning("tokenizers %s cannot read %s/tokenizer.json (%s): using the slow (sentencepiece) tokenizer",
                        tokenizers.__version__, path, str(exc).splitlines()[0])
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, **_hub_kwargs(spec))
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        substitute = tokenizer.unk_token or tokenizer.eos_token
        if substitute is None:
            raise QloraxError(f"model.path: the tokenizer of {path} has neither pad, unk nor eos token; add one")
        tokenizer.pad_token = substitute
        log.info("tokenizer has no pad token: padding with %r (padded positions are masked from the loss)", substitute)
    tokenizer.padding_side = "right"
    return tokenizer


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def dtype_kwarg(dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before
    (the bigdl backend needs transformers 4.3x)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# ---------------------------------------------------------------- backends
def load_base_model(spec: RunSpec, path: str, compute_dtype: str, quantize: bool = True):
    """The frozen base model, quantized per ``quant.backend`` unless ``quantize`` is false."""
    backend = spec.quant.backend if quantize else "none"
    loaders = {"bnb": _load_bnb, "none": _load_plain, "bigdl": _load_bigdl}
    try:
        model = loaders[backend](spec, path, compute_dtype)
    except QloraxError:
        raise
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot load a causal LM from {path}: {str(exc).splitlines()[0]}") from None
    model.requires_grad_(False)
    model.config.use_cache = False
    if backend != "none":
        _detach_from_checkpoint_file(model)
        _return_freed_memory()
        left = unquantized_linear_layers(model, spec)
        if left:
            shown = ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
            why = {"bigdl": "ipex-llm quantizes only layers whose input size is a multiple of 64"}.get(backend, "")
            log.warning("quant: %s/%s left %d linear layer(s) unquantized in %s%s: %s", backend, spec.quant.type,
                        len(left), compute_dtype, f" ({why})" if why else "", shown)
    return model


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _return_freed_memory() -> None:
    """Give the bf16 temporaries freed while quantizing back to the OS (glibc keeps them otherwise)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def _quantizing_allocator():
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


def _load_plain(spec: RunSpec, path: str, compute_dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(torch_dtype(compute_dtype)), device_map="cpu",
                                                use_safetensors=None if spec.model.allow_pickle else True,
                                                low_cpu_mem_usage=True, **_hub_kwargs(spec))


def _load_bnb(spec: RunSpec, path: str, compute_dtype: str):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QloraxError("quant.backend=bnb needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                          "(or train without quantization: quant=none)") from None
    from qlorax.engine import stream4bit

    q = spec.quant
    dtype = torch_dtype(compute_dtype)
    settings = dict(quant_type=q.type, double_quant=q.double_quant, compute_dtype=dtype, skip_modules=list(q.skip_modules))
    prequantized = Path(q.prequantized_dir) if q.prequantized_dir else None
    with _quantizing_allocator():
        model = _quantized_model(spec, path, dtype, settings, prequantized)
    prepare_bnb_cpu(model)
    if prequantized and not stream4bit.is_prequantized(prequantized):
        from transformers import AutoTokenizer

        stream4bit.save_quantized(model, prequantized, AutoTokenizer.from_pretrained(path), **settings)
        log.info("saved the quantized checkpoint to %s: later runs with quant.prequantized_dir=%s skip quantizing",
                 prequantized, prequantized)
    return model


def _quantized_model(spec: RunSpec, path: str, dtype, settings: dict, prequantized: Path | None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlorax.engine import stream4bit

    q = spec.quant
    model = None
    if prequantized and stream4bit.is_prequantized(prequantized):
        log.info("loading the already-quantized checkpoint %s", prequantized)
        model = AutoModelForCausalLM.from_pretrained(prequantized, **dtype_kwarg(dtype), device_map="cpu",
                                                     use_safetensors=True, low_cpu_mem_usage=True)
    elif stream4bit.can_stream(path):
        model = stream4bit.load_or_fail(path, trust_remote_code=spec.model.trust_remote_code, **settings)
    if model is None:   # hub ids and checkpoints with renamed keys: transformers quantizes them
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                                    bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(q.skip_modules))
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype), device_map="cpu", quantization_config=config,
                                                     use_safetensors=None if spec.model.allow_pickle else True,
                                                     low_cpu_mem_usage=True, **_hub_kwargs(spec))
    return model


def prepare_bnb_cpu(model) -> None:
    """Make bitsandbytes' 4-bit layers train correctly and fast on the CPU.

    Pitfall: a Linear4bit run in eval mode without gradients on an AVX512-BF16 CPU repacks
    its weight in place for an inference kernel; later training steps then use the repacked
    bytes as if they were the original layout and get wrong adapter gradients (only a
    UserWarning). The same kernel also rejects layers whose output size is not a multiple of
    its block. Dequantization, done twice per weight per micro-batch, is spread over threads and
    writes into a reused scratch buffer (bnb_cpu.linear4bit_forward).
    """
    import bitsandbytes as bnb

    from qlorax.engine import bnb_cpu

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.forward = types.MethodType(bnb_cpu.linear4bit_forward, module)
    bnb_cpu.install()


def _load_bigdl(spec: RunSpec, path: str, compute_dtype: str):
    """The reference's backend: ipex-llm (or bigdl-llm) sym_int4, imported lazily."""
    import importlib

    for name in ("ipex_llm.transformers", "bigdl.llm.transformers"):
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise QloraxError("quant.backend=bigdl needs ipex-llm or bigdl-llm, which pin old transformers/peft: "
                          "build its separate environment with `make install-bigdl` and run qlorax from it "
                          "(.venv-bigdl/bin/qlorax), or use quant=nf4")
    # ipex-llm reads ``torch_dtype`` itself (it never supports the transformers that renamed it);
    # fp32 compute (train.precision=fp32) needs an fp32 load. Only sym_int4 trains on CPU (spec.py).
    return module.AutoModelForCausalLM.from_pretrained(
        path, load_in_low_bit=spec.quant.type, optimize_model=False, torch_dtype=torch_dtype(compute_dtype),
        modules_to_not_convert=list(spec.quant.skip_modules),
        use_safetensors=None if spec.model.allow_pickle else True, **_hub_kwargs(spec))


def unquantized_linear_layers(model, spec: RunSpec) -> list[str]:
    """Linear layers the 4-bit backend left in bf16/fp32, besides ``quant.skip_modules``.

    bitsandbytes quantizes every one; ipex-llm silently keeps a plain nn.Linear (instead of
    its LowBitLinear, whose weight is packed uint8) where the input size is not a multiple
    of its 64-value block, e.g. stories260K's MLP down_proj (172 inputs).
    """
    import torch

    if spec.quant.backend == "none":
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype.is_floating_point and "lora_" not in name
            and not any(skip in name for skip in spec.quant.skip_modules)]


def _detach_from_checkpoint_file(model) -> None:
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
    _retie_embeddings(model)
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


def _retie_embeddings(model) -> None:
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


# ---------------------------------------------------------------- LoRA
def attach_lora(model, spec: RunSpec):
    from peft import LoraConfig, get_peft_model

    targets: Any = list(spec.lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        bias=spec.lora.bias, target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")})
        raise QloraxError(f"lora.target_modules: {str(exc).splitlines()[0]}; this model's linear layers are "
                          f"{names} (or use lora=all_linear)") from None
    return peft_model


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def linear_weight_bytes(model) -> dict[str, int]:
    """Bytes held by the base linear weights of the decoder (quantized or not) and by the rest."""
    import torch

    linear, other = 0, 0
    seen = set()
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen or "lora_" in name:
                continue
            seen.add(id(param))
            nbytes = param.numel() * param.element_size()
            quant_state = getattr(param, "quant_state", None)
            if quant_state is not None:
                nbytes += sum(t.numel() * t.element_size() for t in _quant_state_tensors(quant_state))
            is_linear = isinstance(module, torch.nn.Linear) and "lm_head" not in name and pname == "weight"
            if is_linear:
                linear += nbytes
            else:
                other += nbytes
    return {"linear": linear, "other": other}


def _quant_state_tensors(state) -> list:
    import torch

    out = [getattr(state, "absmax", None), getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return [t for t in out if isinstance(t, torch.Tensor)]
