"""The built-in demo model: a small Llama with a byte-level tokenizer, pre-trained here.

No download: the model is initialised from a fixed seed and pre-trained for a few hundred steps
on counting text (``qlorax.engine.numbers``: numbers in digits and in words, never paired), so it
is a "pretrained base" that writes number words but does not know the task the demo fine-tunes.
Built once into the qlorax cache directory (``QLORAX_CACHE``, default ``~/.cache/qlorax``) under
a name holding a hash of ``RECIPE``: changing the recipe builds a new base, the old one is unused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("qlorax")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Everything the built model depends on; its hash names the cache directory. Bump "version" when
# the code that builds it changes, so caches holding the old base are not reused.
RECIPE = {
    "version": 2,
    "model": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256},
    "corpus": {"lines": 4000, "run_length": 4, "limit": 1000, "seed": 1},
    "pretrain": {"steps": 400, "batch": 32, "block": 64, "learning_rate": 3e-3, "warmup": 30, "seed": 0},
}


def cache_root() -> Path:
    return Path(os.environ.get("QLORAX_CACHE", Path.home() / ".cache" / "qlorax"))


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_dir() -> Path:
    """Directory of the built-in model, building it on first use (once, even with several ranks)."""
    target = cache_root() / f"tiny-llama-{recipe_hash()}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _complete(target):   # another process built it while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
        try:
            build_tiny(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An flock: ranks starting together wait for the one that builds instead of each pre-training."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def build_tiny(out_dir: Path) -> None:
    """Initialise the model from a fixed seed, pre-train it on the counting corpus, save it."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False, **RECIPE["model"])
    torch.manual_seed(RECIPE["pretrain"]["seed"])
    model = LlamaForCausalLM(config).to(torch.float32)
    pretrain(model, token_stream(tokenizer))
    # Not model.save_pretrained: transformers >= 5 skips its writes on ranks != 0 once a process
    # group exists, and any rank may be the one that builds this cache.
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False).save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(RECIPE, indent=2) + "\n")


def token_stream(tokenizer):
    """The corpus as one long tensor of token ids, each line between BOS and EOS."""
    import torch

    from qlorax.engine.numbers import counting_corpus

    ids: list[int] = []
    for line in counting_corpus(**RECIPE["corpus"]):
        ids += tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model, stream) -> None:
    """Full-parameter AdamW on random windows of the stream (fixed seed: the same weights every build)."""
    import torch

    p = RECIPE["pretrain"]
    generator = torch.Generator().manual_seed(p["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / p["warmup"]) * max(0.0, 1 - step / p["steps"]))
    log.info("built-in tiny model: pre-training on counting text (%d steps, once; cached in %s)",
             p["steps"], cache_root())
    model.train()
    started = time.monotonic()
    with _single_thread():
        for step in range(p["steps"]):
            starts = torch.randint(0, len(stream) - p["block"], (p["batch"],), generator=generator)
            batch = torch.stack([stream[s:s + p["block"]] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % 50 == 0:
                log.info("  pre-training step %d/%d  loss %.3f  (%.0f s)", step + 1, p["steps"], loss.item(),
                         time.monotonic() - started)
    model.eval()


@contextlib.contextmanager
def _single_thread():
    """Pre-train on one thread: these matmuls are too small to split (two threads are many times
    slower on a busy machine), and one thread gives the same weights on every machine with the same ISA."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
