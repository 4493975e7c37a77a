"""Locate the model, load its tokenizer, attach LoRA.

The base model itself is loaded by the quantization backend ``quant.backend`` chooses
(``qlorax.engine.quant``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qlorax import families
from qlorax.engine import weights
from qlorax.engine.quant.common import hub_kwargs
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
    if local.is_file():
        raise QloraxError(f"model.path: {path} is a file, not a model directory; point model.path at the folder "
                          f"that holds config.json, the weights and the tokenizer (perhaps {local.parent})")
    if not local.is_dir():
        raise QloraxError(f"model.path: {path} does not exist; give a local model directory "
                          "(with config.json and *.safetensors) or a hub id like meta-llama/Llama-2-7b-hf")
    if not (local / "config.json").is_file():
        raise QloraxError(f"model.path: {local} is not a Hugging Face model directory (no config.json); "
                          "point model.path at the folder that holds config.json and the weights")
    has_safetensors = any(local.glob("*.safetensors"))
    has_pickle = any(local.glob("*.bin")) or any(local.glob("*.pt"))
    if has_safetensors or (local / weights.INDEX).is_file():   # sizes, headers, index, shards, tensor names
        weights.check_tensors_present(local, weights.check_weight_files(local), spec.model.trust_remote_code)
    if not has_safetensors and not has_pickle:
        raise QloraxError(f"model.path: {local} holds no weights (*.safetensors); download or convert the model first")
    if not has_safetensors and has_pickle and not spec.model.allow_pickle:
        raise QloraxError(f"model.path: {local} only has pickle weights (*.bin), which can run arbitrary code when "
                          "loaded; convert them to safetensors, or allow them with model.allow_pickle=true "
                          "if you trust the source")
    if not any(f for pattern in TOKENIZER_FILES for f in local.glob(pattern)):
        raise QloraxError(f"model.path: {local} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
                          "tokenizer files from the model's original repository into that folder")
    check_architecture(local, spec)
    return str(local.resolve())


# Any one of these makes a tokenizer AutoTokenizer can load (sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def check_architecture(local: Path, spec: RunSpec) -> None:
    """Refuse, before loading anything, a config.json transformers does not know or that is no causal LM."""
    import json

    try:
        config = json.loads((local / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise QloraxError(f"model.path: {local}/config.json is not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict):
        raise QloraxError(f"model.path: {local}/config.json holds a {type(config).__name__}, not a model "
                          "configuration object; download it again")
    if spec.model.trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return   # the model's own code decides
    model_type = config.get("model_type")
    if not model_type:
        raise QloraxError(f"model.path: {local}/config.json has no model_type, so its architecture is unknown; "
                          "download the model's config.json again (it names one, e.g. \"model_type\": \"llama\")")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
    import transformers

    causal = "qlorax fine-tunes causal (decoder-only) language models such as llama, mistral, qwen2, gemma, phi, gpt2"
    if model_type not in CONFIG_MAPPING_NAMES:
        remote = (" or, since it ships its own code, model.trust_remote_code=true if you trust it"
                  if "auto_map" in config else "")
        raise QloraxError(f"model.path: {local}/config.json has model_type {model_type!r}, which transformers "
                          f"{transformers.__version__} does not know; upgrade transformers (pip install -U transformers)"
                          f"{remote}")
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        kind = "an encoder (masked-LM) architecture" if encoder else "not a causal language model"
        raise QloraxError(f"model.path: {local} holds a {model_type!r} model, {kind}; {causal}: "
                          "point model.path at one of those")


def load_tokenizer(spec: RunSpec, path: str):
    """Tokenizer with a pad token (unk, else eos, when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(spec))
        except (OSError, ValueError):
            raise
        except Exception as exc:   # the tokenizers library's parse error: tokenizer.json is newer than it
            import tokenizers

            log.warning("tokenizers %s cannot read %s/tokenizer.json (%s): using the slow (sentencepiece) tokenizer",
                        tokenizers.__version__, path, str(exc).splitlines()[0])
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, **hub_kwargs(spec))
    except (OSError, ValueError) as exc:
        raise QloraxError(f"model.path: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        substitute = tokenizer.unk_token or tokenizer.eos_token
        if substitute is None:
            raise QloraxError(f"model.path: the tokenizer of {path} has neither pad, unk nor eos token; add one")
        tokenizer.pad_token = substitute
        log.info("tokenizer has no pad token: padding with %r (padded positions are masked from the loss)", substitute)
    tokenizer.padding_side = "right"
    check_vocab_fits(path, len(tokenizer))
    return tokenizer


def check_vocab_fits(path: str, tokenizer_size: int | None = None) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding matrix (an IndexError mid-forward otherwise).

    ``tokenizer_size`` defaults to what ``tokenizer.json`` holds, read without loading anything; a model
    whose sizes cannot be read here (hub ids, no tokenizer.json) is checked once its tokenizer is loaded.
    """
    local = Path(path).expanduser()
    try:
        vocab = families.shape_of(json.loads((local / "config.json").read_text())).vocab_declared
    except (OSError, ValueError, KeyError):
        return
    if tokenizer_size is None:
        tokenizer_size = _tokenizer_json_size(local / "tokenizer.json")
    if vocab is None or tokenizer_size is None or tokenizer_size <= vocab:
        return
    raise QloraxError(f"model.path: the tokenizer in {local} has {tokenizer_size} tokens but the model's embedding "
                      f"has only {vocab} rows (config.json vocab_size): ids {vocab}..{tokenizer_size - 1} have no "
                      "embedding; use the tokenizer that belongs to this model, or resize the model's embeddings "
                      "to the tokenizer (model.resize_token_embeddings) and save it")


def _tokenizer_json_size(file: Path) -> int | None:
    """1 + the largest token id of a tokenizers-library file (vocabulary and added tokens), None when absent."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
    return max(ids) + 1 if ids else None


# ---------------------------------------------------------------- LoRA
def attach_lora(model, spec: RunSpec):
    """The peft model with LoRA adapters on ``lora.target_modules`` ([auto]: the family's, named in the log)."""
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    targets: Any = lora_targets(model, spec)
    log.info("lora: adapters on %s of %s (%s)%s", ",".join(targets) if isinstance(targets, list) else targets,
             model.config.model_type, "the family's default, lora.target_modules=[auto]"
             if list(lora.target_modules) == [families.AUTO] else "lora.target_modules",
             "".join(f"; {flag}" for flag, on in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora),
                                                  (f"init={lora.init}", lora.init != "default")) if on))
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                        target_modules=targets, task_type="CAUSAL_LM", use_dora=lora.use_dora,
                        use_rslora=lora.use_rslora, init_lora_weights=INIT_LORA_WEIGHTS[lora.init])
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if type(m).__name__.startswith("Linear") or type(m).__name__ == "Conv1D"})
        raise QloraxError(f"lora.target_modules: {str(exc).splitlines()[0]}; this model's linear layers are "
                          f"{names} (or lora.target_modules=[auto] for this family's attention q/k/v, or lora=all_linear)") from None
    _warn_rank_above_width(peft_model, spec.lora.r)
    return peft_model


INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "olora": "olora", "pissa": "pissa"}


def lora_targets(model, spec: RunSpec) -> Any:
    """peft's target_modules for ``lora.target_modules`` on this model."""
    model_type = getattr(model.config, "model_type", None)
    try:
        targets = families.resolve_targets(spec.lora.target_modules, model_type)
    except KeyError:
        raise QloraxError(f"lora.target_modules=[auto]: qlorax has no default targets for model type {model_type!r}; "
                          "name them (lora.target_modules=[...]) or use lora=all_linear") from None
    return families.ALL_LINEAR if targets == [families.ALL_LINEAR] else targets


def _warn_rank_above_width(model, r: int) -> None:
    """An adapter's rank cannot exceed its layer's narrower side: a larger lora.r only costs memory and time."""
    widths = [(name, m.in_features, m.out_features) for name, m in model.named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "in_features")]
    if not widths:
        return
    name, n_in, n_out = min(widths, key=lambda w: min(w[1], w[2]))
    if r > min(n_in, n_out):
        log.warning("lora.r=%d is larger than the layers it adapts: %s is %d -> %d wide, so its adapter has rank "
                    "at most %d and the rest only costs memory and time; use lora.r=%d or less", r,
                    name.removeprefix("base_model.model."), n_in, n_out, min(n_in, n_out), min(n_in, n_out))


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
