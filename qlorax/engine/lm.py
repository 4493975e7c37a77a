"""Small language-model helpers shared by the stages: loss, held-out loss, greedy generation."""
from __future__ import annotations

import contextlib
import math
import time

from qlorax.engine import lean
from qlorax.engine.data import IGNORE_INDEX, Example, collate, model_inputs


def autocast(precision: str):
    """bf16 autocast on the CPU, or nothing for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_sum(model, ids, mask, labels):
    """Summed next-token cross-entropy (computed in fp32) and the number of target tokens.

    ``mask`` is collate's: 0/1, or document numbers in packed rows (block-diagonal attention)."""
    import torch

    inputs = model_inputs(ids, mask)
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    chunked = lean.chunked_head(model)
    if chunked is not None:   # the same loss without materializing the batch's logits (train.lean_kernels)
        decoder, head = chunked
        hidden = decoder(**inputs).last_hidden_state[:, :-1, :]
        loss = lean.head_loss_sum(hidden.reshape(-1, hidden.size(-1)), head.weight, shift_labels.reshape(-1),
                                  IGNORE_INDEX)
        return loss, count
    logits = model(**inputs).logits
    shift_logits = logits[:, :-1, :].float()
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count


def held_out_loss(model, examples: list[Example], micro_batch: int, pad_id: int, precision: str,
                  max_batches: int | None = None) -> tuple[float, int]:
    """(summed loss, target tokens) over ``examples``, in eval mode without gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    if max_batches is not None:
        examples = examples[: max_batches * micro_batch]
    with torch.no_grad(), autocast(precision):
        for i in range(0, len(examples), micro_batch):
            s, n = loss_sum(model, *collate(examples[i:i + micro_batch], pad_id))
            total, count = total + float(s), count + n
    model.train(was_training)
    return total, count


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def generate(model, tokenizer, prompt: str, n_predict: int, precision: str, add_special_tokens: bool = True,
             stop_ids: list[int] | None = None) -> dict:
    """Greedy continuation of ``prompt``: text, new tokens, seconds, tokens/s.

    ``add_special_tokens=False`` for text that already holds them (a rendered chat template);
    ``stop_ids`` end generation besides eos (a chat format's end-of-turn token)."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    started = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        out = model.generate(**inputs, max_new_tokens=n_predict, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids or tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    new = out[0, inputs["input_ids"].shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "seconds": round(seconds, 4), "tokens_per_s": round(new.numel() / max(seconds, 1e-9), 2)}
