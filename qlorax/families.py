"""What qlorax knows about each model family, in one place: default LoRA targets and config names.

Both the memory planner (``qlorax.memory``, before anything is loaded) and LoRA attachment
(``qlorax.engine.model``) read this table, so they agree on which modules get adapters and on
what a config.json calls its sizes (GPT-2 says ``n_embd``/``n_layer``, Falcon ``ffn_hidden_size``).

Default targets (``lora.target_modules=[auto]``) follow the reference recipe: the attention's
query, key and value projections, i.e. q_proj/k_proj/v_proj where the model has separate ones and
the fused projection where it has that (Phi-3 ``qkv_proj``, GPT-NeoX and Falcon ``query_key_value``,
GPT-2 ``c_attn``). A model type not listed here falls back to peft's per-architecture mapping
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``).

A foundation module: no torch, no transformers at import time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

AUTO = "auto"
ALL_LINEAR = "all-linear"
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """One architecture: how its config names sizes, its linear modules (by role), its default targets."""

    name: str
    model_types: tuple[str, ...]
    targets: tuple[str, ...]                       # the reference's q/k/v, as this family names them
    modules: Mapping[str, tuple[str, ...]]         # linear module name -> the roles (q, k, v, o, gate, up, down) it holds
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # canonical size -> config keys, first present wins
    tied_default: bool = False                     # tie_word_embeddings when the config does not say


LLAMA_MODULES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
                 "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",)}
QKV = ("q_proj", "k_proj", "v_proj")

FAMILIES = (
    Family("Llama", ("llama",), QKV, LLAMA_MODULES),
    Family("Mistral", ("mistral", "mixtral"), QKV, LLAMA_MODULES),
    Family("Qwen2", ("qwen2",), QKV, LLAMA_MODULES),
    Family("Qwen3", ("qwen3",), QKV, LLAMA_MODULES),
    Family("Gemma", ("gemma", "gemma2", "gemma3_text"), QKV, LLAMA_MODULES, tied_default=True),
    Family("Phi-3", ("phi3",), ("qkv_proj",),
           {"qkv_proj": ("q", "k", "v"), "o_proj": ("o",), "gate_up_proj": ("gate", "up"), "down_proj": ("down",)}),
    Family("GPT-NeoX", ("gpt_neox",), ("query_key_value",),
           {"query_key_value": ("q", "k", "v"), "dense": ("o",), "dense_h_to_4h": ("up",), "dense_4h_to_h": ("down",)}),
    Family("Falcon", ("falcon",), ("query_key_value",),
           {"query_key_value": ("q", "k", "v"), "dense": ("o",), "dense_h_to_4h": ("up",), "dense_4h_to_h": ("down",)},
           keys={"intermediate": ("ffn_hidden_size",), "kv_heads": ("num_kv_heads",)}, tied_default=True),
    Family("OPT", ("opt",), QKV,
           {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "out_proj": ("o",), "fc1": ("up",), "fc2": ("down",)},
           keys={"intermediate": ("ffn_dim",)}, tied_default=True),
    Family("GPT-2", ("gpt2",), ("c_attn",),
           {"c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "c_fc": ("up",), "mlp.c_proj": ("down",)},
           keys={"hidden": ("n_embd",), "layers": ("n_layer",), "heads": ("n_head",), "intermediate": ("n_inner",)},
           tied_default=True),
)

# Canonical size -> the config.json keys most families use (a family's own keys are tried first).
COMMON_KEYS = {"hidden": ("hidden_size", "d_model", "n_embd"), "layers": ("num_hidden_layers", "n_layer", "num_layers"),
               "heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
               "intermediate": ("intermediate_size",), "vocab": ("vocab_size",), "head_dim": ("head_dim",)}


def family_of(model_type: str | None) -> Family | None:
    """The family of a config's ``model_type``, or None when qlorax has no entry for it."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


@dataclass(frozen=True)
class Shape:
    """A model's sizes under one set of names, whatever its config.json calls them."""

    model_type: str | None
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vocab_declared: int | None       # vocab_size as the config states it (None when absent)
    tied: bool
    gated: bool                      # MLP has a gate projection (Llama-style) besides up/down


def _read(config: Mapping[str, Any], family: Family | None, name: str) -> Any:
    for key in (family.keys.get(name, ()) if family else ()) + COMMON_KEYS[name]:
        if config.get(key) is not None:
            return config[key]
    return None


def shape_of(config: Mapping[str, Any]) -> Shape:
    """The sizes of a model from its config.json contents (``text_config`` of multimodal ones).

    Raises KeyError naming the missing size when the config has no hidden size or layer count.
    """
    config = config.get("text_config", config)
    model_type = config.get("model_type")
    family = family_of(model_type)
    hidden, layers = _read(config, family, "hidden"), _read(config, family, "layers")
    if hidden is None or layers is None:
        raise KeyError(f"config of model type {model_type!r} names no {'hidden size' if hidden is None else 'layer count'}")
    heads = _read(config, family, "heads") or max(hidden // 128, 1)
    kv_heads = _read(config, family, "kv_heads") or heads
    if config.get("multi_query") and not config.get("new_decoder_architecture"):
        kv_heads = 1   # Falcon's original layout: one key/value head, whatever num_kv_heads says
    modules = family.modules if family else LLAMA_MODULES
    tied = config.get("tie_word_embeddings")
    return Shape(model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                 head_dim=_read(config, family, "head_dim") or hidden // heads,
                 intermediate=_read(config, family, "intermediate") or 4 * hidden,
                 vocab=_read(config, family, "vocab") or 32000, vocab_declared=_read(config, family, "vocab"),
                 tied=bool(family.tied_default if (tied is None and family) else tied),
                 gated=any("gate" in roles for roles in modules.values()))


def role_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each role's projection in one decoder layer."""
    h, q_out, kv_out, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    dims = {"q": (h, q_out), "k": (h, kv_out), "v": (h, kv_out), "o": (q_out, h), "up": (h, inter), "down": (inter, h)}
    if shape.gated:
        dims["gate"] = (h, inter)
    return dims


def module_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of one decoder layer, under the family's own module names."""
    family = family_of(shape.model_type)
    roles = role_dims(shape)
    dims = {}
    for name, held in (family.modules if family else LLAMA_MODULES).items():
        held = [r for r in held if r in roles]
        if held:
            dims[name] = (roles[held[0]][0], sum(roles[r][1] for r in held))
    return dims


def default_targets(model_type: str | None) -> list[str]:
    """The modules ``lora.target_modules=[auto]`` puts adapters on for this model type.

    Raises KeyError when neither qlorax nor peft knows the model type.
    """
    family = family_of(model_type)
    if family:
        return list(family.targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    targets = PEFT_DEFAULTS.get(model_type or "")
    if not isinstance(targets, list):
        raise KeyError(f"no default LoRA targets for model type {model_type!r}")
    return list(targets)


def resolve_targets(target_modules, model_type: str | None) -> list[str]:
    """``lora.target_modules`` with ``[auto]`` replaced by the family's defaults."""
    targets = list(target_modules)
    return default_targets(model_type) if targets == [AUTO] else targets


def lora_dims(shape: Shape, target_modules) -> list[tuple[int, int]]:
    """(in, out) of each adapted module in one layer, for the memory estimate (unknown names are skipped)."""
    dims = module_dims(shape)
    targets = list(target_modules)
    if targets == [ALL_LINEAR]:
        return list(dims.values())
    if targets == [AUTO]:
        try:
            targets = default_targets(shape.model_type)
        except (KeyError, ImportError):
            targets = list(QKV)
    chosen = [name for name in dims if any(name == t or name.endswith("." + t) or t.endswith("." + name)
                                           or name.rsplit(".", 1)[-1] == t for t in targets)]
    return [dims[name] for name in chosen]
