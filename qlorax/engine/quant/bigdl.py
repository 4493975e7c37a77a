"""The reference's backend: ipex-llm (or bigdl-llm) ``sym_int4``, imported lazily.

It needs old transformers/peft pins, so it lives in its own environment (``make install-bigdl``).
Only sym_int4 trains correctly on the CPU (spec.py refuses the rest, with the reason).
"""
from __future__ import annotations

import importlib

from qlorax.engine.quant.common import hub_kwargs, torch_dtype
from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

MODULES = ("ipex_llm.transformers", "bigdl.llm.transformers")
INSTALL = ("`make install-bigdl` builds its separate environment (ipex-llm pins old transformers/peft); "
           "run qlorax from it: .venv-bigdl/bin/qlorax")
# ipex-llm keeps a plain nn.Linear where the input size is not a multiple of its 64-value block.
UNQUANTIZED_REASON = "ipex-llm quantizes only layers whose input size is a multiple of 64"


def available() -> bool:
    import importlib.util

    for name in MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:
            continue
    return False


def load(spec: RunSpec, path: str, compute_dtype: str):
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise QloraxError(f"quant.backend=bigdl needs ipex-llm or bigdl-llm: {INSTALL}; or use quant=nf4")
    # ipex-llm reads ``torch_dtype`` itself (it never supports the transformers that renamed it);
    # fp32 compute (train.precision=fp32) needs an fp32 load.
    return module.AutoModelForCausalLM.from_pretrained(
        path, load_in_low_bit=spec.quant.type, optimize_model=False, torch_dtype=torch_dtype(compute_dtype),
        modules_to_not_convert=list(spec.quant.skip_modules),
        use_safetensors=None if spec.model.allow_pickle else True, **hub_kwargs(spec))


def dequantize_layer(layer):
    """The fp32 weight of an ipex-llm / bigdl-llm LowBitLinear, or None for any other layer."""
    if type(layer).__name__ != "LowBitLinear" or getattr(layer, "qtype", None) is None:
        return None
    weight = layer.weight
    to_fp32 = importlib.import_module(type(layer).__module__).ggml_int4_convert_fp32
    return to_fp32(weight.data, weight._shape, weight._shape[0] * weight._shape[1]).reshape(weight._shape)

