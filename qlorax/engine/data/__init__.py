"""Training data: rows -> prompt/response text -> token ids and labels, split, cached, and batched.

    readers     json / jsonl / csv / parquet / datasets directories / hub ids -> rows
    templates   {field} templates -> prompt and response text
    chat        conversations (OpenAI / ShareGPT rows) -> chat-template text, assistant-only labels
    examples    token ids and labels of one example; the train / eval split
    packing     several examples per row, each attending only to itself
    prepare     the whole pipeline, cached in the run directory
    batching    which examples each rank runs per step; padded tensors

Reading errors name the file and line; a template field missing from a row names the field,
the file and the row.
"""
from __future__ import annotations

from qlorax.engine.data.batching import collate, global_target_tokens, rank_micro_batches, stream_index
from qlorax.engine.data.chat import prompts as chat_prompts, stop_ids as chat_stop_ids
from qlorax.engine.data.examples import IGNORE_INDEX, Example, PreparedData, split_sizes, tokenize
from qlorax.engine.data.packing import model_inputs, pack
from qlorax.engine.data.prepare import check_rows, prepare
from qlorax.engine.data.readers import data_source, read_rows
from qlorax.engine.data.templates import check_fields, render, template_fields

__all__ = ["IGNORE_INDEX", "Example", "PreparedData", "chat_prompts", "chat_stop_ids", "check_fields", "check_rows", "collate",
           "data_source", "global_target_tokens", "model_inputs", "pack", "prepare", "rank_micro_batches", "read_rows",
           "render", "split_sizes", "stream_index", "template_fields", "tokenize"]
