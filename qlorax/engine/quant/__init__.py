"""Quantization backends for the frozen base model: one small dispatch, one file per backend.

    bnb     bitsandbytes NF4 / FP4 (+ double quantization)      quant=nf4 | fp4 | nf4_dq   (default)
    bigdl   ipex-llm / bigdl-llm sym_int4 (its own environment) quant=bigdl
    none    no quantization: bf16 / fp32 LoRA                   quant=none

Each backend module is imported only when chosen; its library only when used. It offers ``available()``,
``load(spec, path, compute_dtype)`` and ``dequantize_layer(layer)`` (None for layers not its own), plus
``INSTALL`` (how to get its library).
``stream`` is the shared quantize-while-loading reader, ``common`` the shared load helpers.

How the base computes is a second, independent choice (``quant.compute``, ``use_compute``):

    bf16    the stored weight dequantized, bf16 matmuls (the backends' own layers)    default
    int8    int8 x int8 matmuls from a kept int8 copy, SmoothQuant-smoothed,          ``int8`` + ``int8_guard``
            behind a held-out loss guard
"""
from __future__ import annotations

import importlib
import logging

from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")
BACKENDS = {"bnb": "qlorax.engine.quant.bnb", "bigdl": "qlorax.engine.quant.bigdl", "none": "qlorax.engine.quant.plain"}


def backend(name: str):
    """The module of backend ``name``; the error lists what is supported and how to install it."""
    if name not in BACKENDS:
        raise QloraxError(f"quant.backend: unknown backend {name!r}; supported: {supported()}")
    return importlib.import_module(BACKENDS[name])


def supported() -> str:
    """One line per backend: its name, whether it is installed here, and how to install it."""
    lines = []
    for name in BACKENDS:
        module = importlib.import_module(BACKENDS[name])
        state = "installed" if module.available() else f"not installed: {module.INSTALL}"
        lines.append(f"{name} ({state})")
    return "; ".join(lines)


def load_base_model(spec: RunSpec, path: str, compute_dtype: str, quantize: bool = True):
    """The frozen base model, quantized per ``quant.backend`` unless ``quantize`` is false."""
    from qlorax.engine.quant.common import detach_from_checkpoint_file, no_hub_kernels, return_freed_memory

    name = spec.quant.backend if quantize else "none"
    try:
        model = backend(name).load(spec, path, compute_dtype)
    except QloraxError:
        raise
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot load a causal LM from {path}: {str(exc).splitlines()[0]}") from None
    model.requires_grad_(False)
    model.config.use_cache = False
    no_hub_kernels(model)
    if name != "none":
        detach_from_checkpoint_file(model)
        return_freed_memory()
        left = unquantized_linear_layers(model, spec)
        if left:
            shown = ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
            why = getattr(backend(name), "UNQUANTIZED_REASON", "")
            log.warning("quant: %s/%s left %d linear layer(s) unquantized in %s%s: %s", name, spec.quant.type,
                        len(left), compute_dtype, f" ({why})" if why else "", shown)
    return model


def use_compute(model, spec: RunSpec, calibration_batches: list, held_out_batches: list, precision: str,
                model_dir: str | None = None) -> dict:
    """Switch the LoRA model's base to ``quant.compute`` (after its accuracy check); returns what to report.

    Batches are (ids, mask, labels) micro-batches: training ones calibrate, held-out ones measure the loss gap.
    ``model_dir``: the local checkpoint the model was loaded from, where int4 storage reads the original weights.
    """
    if spec.quant.compute == "bf16":
        if spec.quant.backend != "bnb":
            return {"compute": "bf16"}
        from qlorax.engine.quant import bnb_cpu

        tiles = bnb_cpu.use_tile_kernels(model, spec.quant.bf16_matmul)
        log.info("quant.compute=bf16: %d of %d 4-bit layers decoded inside AMX-BF16 tile matmuls, the rest "
                 "dequantized whole for each matmul", tiles["tile_layers"], tiles["layers"])
        return {"compute": "bf16", **tiles}
    from qlorax.engine.quant import int8_guard

    dense_weight = _float_weight
    if spec.quant.int8_weight == "int4" and spec.quant.backend != "none" and model_dir is not None:
        dense_weight = _original_weights(model_dir) or _float_weight
    report = int8_guard.enable(model, spec, calibration_batches, held_out_batches, precision, dense_weight)
    if dense_weight is not _float_weight:
        report["weight_source"] = dict(dense_weight.counts)
        log.info("quant.int8_weight=int4: %d weight(s) made from the checkpoint's originals, %d from the loaded "
                 "4-bit ones", dense_weight.counts["checkpoint"], dense_weight.counts["loaded"])
    return report


def _float_weight(layer, name: str = ""):
    """A base layer's weight as float: dequantized when stored quantized, else the weight itself."""
    dense = _dequantized_weight(layer)
    return layer.weight.data if dense is None else dense


def _original_weights(model_dir: str):
    """``weight(layer, name)``: the layer's weight as the checkpoint holds it, read from disk one at a time, for int4
    storage; the loaded (4-bit) weight where the checkpoint has no tensor of that name and shape. None without a
    local safetensors checkpoint.

    Made from NF4, int4 storage rounds every weight to 4 bits twice (NF4's 16 levels, then int4's 15 steps): on
    stories260K the guard measured +2.37% held-out loss and refused; made from the original weights, +0.48%.
    """
    from qlorax.engine.quant.stream import tensor_reader

    read = tensor_reader(model_dir)
    if read is None:
        return None
    counts = {"checkpoint": 0, "loaded": 0}

    def weight(layer, name: str):
        loaded = _float_weight(layer).float()
        tensor = read(_checkpoint_name(name))
        if tensor is not None and tuple(tensor.shape) == tuple(loaded.shape):
            tensor = tensor.float()
            # the same weight, 4-bit rounding apart (NF4: ~10% relative), not another layout of it: GPT-2's Conv1D
            # stores [in, out], which a square layer's shape check alone would take as [out, in]
            if float((tensor - loaded).norm()) <= 0.5 * float(loaded.norm()):
                counts["checkpoint"] += 1
                return tensor
        counts["loaded"] += 1
        return loaded

    weight.counts = counts
    return weight


def _checkpoint_name(module_name: str) -> str:
    """peft's ``base_model.model.model.layers.0.self_attn.q_proj.base_layer`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    name = module_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return f"{name}.weight"


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


def dequantize(model):
    """Replace every quantized linear layer by a plain fp32 nn.Linear holding its dequantized weight."""
    import torch

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            weight = _dequantized_weight(child)
            if weight is None:
                continue
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            dense.weight.data = weight.float()
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


def _dequantized_weight(layer):
    """The dense weight of a quantized layer, or None for a layer that is not quantized."""
    import torch

    weight = getattr(layer, "weight", None)
    if weight is None or not (hasattr(weight, "quant_state") or weight.dtype in (torch.uint8, torch.int8)):
        return None
    for name in BACKENDS:
        dense = backend(name).dequantize_layer(layer)
        if dense is not None:
            return dense
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    raise QloraxError(f"merge.base=dequantized: cannot dequantize a {type(layer).__name__} layer; use merge.base=original")


def linear_weight_bytes(model) -> dict[str, int]:
    """Bytes held by the base linear weights of the decoder (quantized or not) and by the rest."""
    import torch

    from qlorax.engine.quant import bnb

    linear, other = 0, 0
    seen = set()
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen or "lora_" in name:
                continue
            seen.add(id(param))
            nbytes = bnb.weight_bytes(param) if hasattr(param, "quant_state") else param.numel() * param.element_size()
            is_linear = ((isinstance(module, torch.nn.Linear) or type(module).__name__ == "Int8Linear")
                         and "lm_head" not in name and pname == "weight")
            if is_linear:
                linear += nbytes
            else:
                other += nbytes
    return {"linear": linear, "other": other}
