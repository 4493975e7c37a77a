"""The built-in demo model: a 2-layer Llama with a byte-level tokenizer, built locally.

Deterministic (fixed seed), about 0.2 M parameters, no download. Built once into the
qlorax cache directory (``QLORAX_CACHE``, default ``~/.cache/qlorax``) and reused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "tiny-llama-v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def cache_root() -> Path:
    return Path(os.environ.get("QLORAX_CACHE", Path.home() / ".cache" / "qlorax"))


def tiny_model_dir() -> Path:
    """Directory of the built-in model, building it on first use (atomically, safe across ranks)."""
    target = cache_root() / TINY_VERSION
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny(staging)
        try:
            os.rename(staging, target)
        except OSError:   # another rank won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tokenizer():
    """Byte-level tokenizer: 4 specials + 256 byte tokens, lossless for any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=256)


def build_tiny(out_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Not model.save_pretrained: transformers >= 5 skips its writes on ranks != 0 once a process
    # group exists, and any rank may be the one that builds this cache.
    from safetensors.torch import save_file

    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False).save_pretrained(out_dir)
