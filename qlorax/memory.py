"""Peak-memory estimate of one training rank, computed before any model is loaded.

The model's shape comes from its local config.json or from the size hints in the model
config (so ``qlorax plan model=llama2_7b`` works offline). The estimate is deliberately
simple and a little pessimistic: weights (4-bit with block constants, or 16/32-bit), LoRA
parameters with their gradients and AdamW state, activations for the configured micro-batch
and sequence length (with or without gradient checkpointing), the logits, and the runtime.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlorax import families, hardware
from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

RUNTIME_BYTES = 600 * 2**20          # torch + transformers + peft imported, thread pools
TINY_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 260,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora: int
    activations: int
    logits: int
    runtime: int
    available: int
    ranks_here: int
    shape_source: str

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.runtime

    @property
    def fits(self) -> bool:
        return self.available <= 0 or self.total * self.ranks_here <= self.available


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ('32Gi', '500M', '1e9') in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * units[suffix])
    return int(float(quantity))


def model_shape(spec: RunSpec) -> tuple[dict, str]:
    """Shape fields of the model (config.json keys) and where they came from."""
    m = spec.model
    if m.path == "builtin:tiny":
        return dict(TINY_SHAPE), "built-in tiny model"
    config = Path(m.path).expanduser() / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            data = data.get("text_config", data)
            return data, str(config)
        except ValueError:
            pass
    if m.hidden_size and m.num_layers:
        h, vocab = m.hidden_size, m.vocab_size or 32000
        # The layers hold what the embedding and head (counted as untied, as the estimate does) leave.
        per_layer = max(m.params_b * 1e9 - 2 * vocab * h, 0) / m.num_layers if m.params_b else 12 * h * h
        inter = max(int((per_layer - 4 * h * h) / (3 * h)), h)
        return {"hidden_size": h, "num_hidden_layers": m.num_layers, "intermediate_size": inter,
                "vocab_size": vocab, "num_attention_heads": max(h // 128, 1),
                "num_key_value_heads": max(h // 128, 1)}, "size hints in the model config"
    return {}, "unknown (no local config.json and no size hints)"


def estimate(spec: RunSpec) -> Estimate:
    shape, source = model_shape(spec)
    topo = hardware.detect(spec.hardware.sysfs_root)
    if spec.hardware.memory_limit_gb:
        available = int(spec.hardware.memory_limit_gb * 2**30)
    elif spec.parallel.launcher == "k8s":
        available = quantity_bytes(spec.k8s.memory)   # each pod's limit, not this machine's memory
    else:
        available = topo.memory_available
    ranks_here = spec.workers if spec.parallel.launcher == "ccl" else 1
    if not shape:
        return Estimate(0, 0, 0, 0, RUNTIME_BYTES, available, ranks_here, source)
    try:
        sizes = families.shape_of(shape)
    except KeyError as exc:
        raise QloraxError(f"model.path: cannot estimate memory: the {exc.args[0]} ({source}); give the size hints "
                          "model.hidden_size=... model.num_layers=..., or hardware.check_memory=false") from None
    h, layers, inter, vocab, heads = sizes.hidden, sizes.layers, sizes.intermediate, sizes.vocab, sizes.heads
    kv, head_dim = sizes.kv_heads, sizes.head_dim
    dims = families.module_dims(sizes)
    linear_params = layers * sum(i * o for i, o in dims.values())
    quantized = spec.quant.backend != "none"
    half = spec.train.precision != "fp32"
    bytes_per_linear = (0.5 + 4 / 64 * (0.25 if spec.quant.double_quant else 1)) if quantized else (2 if half else 4)
    if spec.quant.compute == "int8":   # the weights int8 compute keeps (engine/quant/int8.py)
        bytes_per_linear = 1.0 if spec.quant.int8_weight == "int8" else 0.5 + 1 / 64
    embed = vocab * h * (1 if sizes.tied else 2) * (2 if half else 4)
    weights = int(linear_params * bytes_per_linear + embed)
    lora_params = layers * sum(spec.lora.r * (i + o) for i, o in families.lora_dims(sizes, spec.lora.target_modules))
    lora = lora_params * 16                  # fp32 weight + grad + two AdamW moments
    tokens = spec.train.micro_batch_size * spec.data.cutoff_len
    act = 2 if half else 4
    if spec.train.lean_kernels:   # measured: 9 h + 2 inter per token per layer (engine/lean.py)
        per_layer_token = act * (9 * h + 2 * kv * head_dim) + 2 * inter * (1 if spec.quant.keeps_mlp_int8 else act)
    else:                          # saved inputs of linears, fp32 norm inputs, the MLP's three products
        per_layer_token = act * (10 * h + 4 * inter + 2 * kv * head_dim)
    attention = act * spec.train.micro_batch_size * heads * spec.data.cutoff_len ** 2 if not half else 0
    # data.packing: one block-diagonal bool mask per micro-batch, shared by every layer (SDPA's flash
    # kernel takes it as it is, so nothing of that size per head)
    packing_mask = spec.train.micro_batch_size * spec.data.cutoff_len ** 2 if spec.data.packing else 0
    if spec.train.gradient_checkpointing:
        activations = layers * tokens * h * act + tokens * per_layer_token + attention + packing_mask
    else:
        activations = layers * (tokens * per_layer_token + attention) + packing_mask
    if spec.train.lean_kernels:   # chunks of at most 2^21 fp32 logits and their softmax; the head's input gradient
        logits = min(tokens * vocab, 2**21) * (4 + 4) + tokens * h * act
    else:                          # logits, fp32 copy, its gradient
        logits = tokens * vocab * (act + 4 + 4)
    return Estimate(weights, lora, activations, logits, RUNTIME_BYTES, available, ranks_here, source)


def format_estimate(e: Estimate) -> str:
    gib = 2**30
    rows = [("weights", e.weights), ("LoRA + grads + AdamW", e.lora), ("activations", e.activations),
            ("logits", e.logits), ("runtime", e.runtime)]
    lines = [f"  {name:<22}{value / gib:8.2f} GiB" for name, value in rows]
    lines.append(f"  {'total per rank':<22}{e.total / gib:8.2f} GiB  x {e.ranks_here} rank(s) on this node "
                 f"(model shape from {e.shape_source})")
    lines.append(f"  {'available':<22}{e.available / gib:8.2f} GiB -> {'fits' if e.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)


def check_fits(spec: RunSpec) -> Estimate:
    """Refuse, with settings that would fit, a run whose estimated peak exceeds available memory."""
    e = estimate(spec)
    if not spec.hardware.check_memory or e.fits:
        return e
    gib = 2**30
    budget = e.available / max(e.ranks_here, 1)
    suggestions = []
    from dataclasses import replace

    def fits_with(**changes) -> bool:
        train = replace(spec.train, **{k: v for k, v in changes.items() if k in spec.train.__dataclass_fields__})
        trial = replace(spec, train=train)
        return estimate(trial).total <= budget

    for micro in (spec.train.micro_batch_size // 2, spec.train.micro_batch_size // 4, 1):
        if 1 <= micro < spec.train.micro_batch_size and fits_with(micro_batch_size=micro):
            suggestions.append(f"train.micro_batch_size={micro}")
            break
    if not spec.train.gradient_checkpointing and fits_with(gradient_checkpointing=True):
        suggestions.append("train.gradient_checkpointing=true")
    if spec.quant.backend == "none":
        suggestions.append("quant=nf4 (4-bit base weights)")
    if e.ranks_here > 1:
        suggestions.append(f"fewer ranks on this node (workers={max(1, int(e.available // e.total))}) or parallel=k8s "
                           "to spread ranks over nodes")
    if not suggestions:
        suggestions.append(f"a shorter data.cutoff_len, or a machine with more than {e.total / gib:.1f} GiB per rank")
    raise QloraxError(f"estimated peak memory {e.total * e.ranks_here / gib:.1f} GiB "
                      f"({e.ranks_here} rank(s) x {e.total / gib:.1f} GiB) exceeds the {e.available / gib:.1f} GiB "
                      f"available; this run would be OOM-killed. Try: {'; '.join(suggestions)}. "
                      "(hardware.check_memory=false skips this check)")
