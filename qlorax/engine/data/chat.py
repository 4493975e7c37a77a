"""Conversations: OpenAI or ShareGPT message lists -> chat-template text -> ids with assistant-only labels.

The text comes from a Jinja chat template (the tokenizer's own, or one shipped in
``qlorax/assets/chat_templates``), rendered by ``tokenizer.apply_chat_template``. Which tokens are
the assistant's is found by rendering each prefix of the conversation: the text an assistant turn
adds after the generation prompt of the turns before it is that turn's content plus its
end-of-turn marker (trailing whitespace such as ChatML's newline excluded). This needs no
``{% generation %}`` markers, so it works with any template that renders earlier turns the same
whatever follows them; a template that does not is refused by name.

A malformed row (no message list, a message without role or content, an unknown role, an empty
conversation, one that does not end on an assistant turn) stops the run naming the row, the file
and the fix, or is skipped and counted with ``data.skip_bad_rows=true``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

from qlorax.engine.data.examples import IGNORE_INDEX, Example
from qlorax.errors import QloraxError
from qlorax.schema import DataConfig

log = logging.getLogger("qlorax")

# Row role name -> chat-template role, per row format.
ROLES = {"openai": {"system": "system", "user": "user", "assistant": "assistant"},
         "sharegpt": {"system": "system", "human": "user", "gpt": "assistant"}}
DEFAULT_FIELDS = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
SHIPPED = ("chatml", "llama3", "llama2")
# A shipped template is picked by `auto` when the vocabulary has its marker as one token.
MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}
# End-of-turn tokens of common chat formats: generation stops at them as at eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
FIX = "fix or remove the row, or set data.skip_bad_rows=true to skip such rows"


class BadRow(ValueError):
    """A conversation qlorax cannot train on; the message says what is wrong with it."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str     # tokenizer, chatml, llama3, llama2
    text: str     # the Jinja source
    origin: str   # where it came from, for the log


def fields(cfg: DataConfig) -> tuple[str, str, str]:
    """(messages, role, content) field names of the configured row format."""
    messages, role, content = DEFAULT_FIELDS[cfg.chat_format]
    return cfg.messages_field or messages, cfg.role_field or role, cfg.content_field or content


def conversation(row: dict, cfg: DataConfig) -> list[dict]:
    """The row's messages as [{role: system|user|assistant, content}]; raises BadRow."""
    messages_key, role_key, content_key = fields(cfg)
    roles = ROLES[cfg.chat_format]
    messages = row.get(messages_key)
    if not isinstance(messages, list):
        found = "no" if messages is None else f"a {type(messages).__name__} in"
        raise BadRow(f"{found} field {messages_key!r} holding a list of messages (its fields: "
                     f"{', '.join(sorted(row)) or 'none'}); name the field with data.messages_field=..., or pick the "
                     "row format with data.chat_format=openai|sharegpt")
    if not messages:
        raise BadRow("the conversation is empty")
    out = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or role_key not in message:
            raise BadRow(f"message {number} has no {role_key!r} field (set data.role_field=... if it is named "
                         "otherwise)")
        if content_key not in message or not isinstance(message[content_key], str):
            raise BadRow(f"message {number} has no text in {content_key!r} (set data.content_field=... if it is "
                         "named otherwise)")
        role = roles.get(message[role_key])
        if role is None:
            raise BadRow(f"message {number} has the unknown role {message[role_key]!r} (data.chat_format="
                         f"{cfg.chat_format} takes {', '.join(roles)})")
        if role == "system" and number > 1:
            raise BadRow(f"message {number} is a system message; only the first message may be one")
        out.append({"role": role, "content": message[content_key]})
    if out[-1]["role"] != "assistant":
        raise BadRow(f"the conversation ends on a {out[-1]['role']} turn; its last message must be the "
                     "assistant's answer")
    return out


def check_conversations(rows: list[dict], cfg: DataConfig, source: str) -> tuple[list[dict], int]:
    """The trainable rows and how many were skipped; a bad row stops the run unless data.skip_bad_rows."""
    kept, skipped, first = [], 0, ""
    for number, row in enumerate(rows, start=1):
        try:
            conversation(row, cfg)
        except BadRow as exc:
            if not cfg.skip_bad_rows:
                raise QloraxError(f"data: row {number} of {source}: {exc}; {FIX}") from None
            skipped += 1
            first = first or f"row {number}: {exc}"
            continue
        kept.append(row)
    if skipped:
        log.warning("data: skipped %d of %d conversation(s) that cannot be trained on (data.skip_bad_rows=true); "
                    "first: %s", skipped, len(rows), first)
    if not kept:
        raise QloraxError(f"data: none of the {len(rows)} rows of {source} is a trainable conversation ({first}); "
                          "check data.chat_format and the field names (data.messages_field, data.role_field, "
                          "data.content_field)")
    return kept, skipped


def resolve_template(cfg: DataConfig, tokenizer) -> ChatTemplate:
    """The template data.chat_template selects; logs which one is used and why."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):   # several named templates: the default one
        own = own.get("default")
    choice = cfg.chat_template
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if choice == "tokenizer" or (choice == "auto" and own):
        if not own:
            raise QloraxError(f"data.chat_template=tokenizer: the tokenizer of {source} has no chat template; "
                              f"pick a shipped one: data.chat_template={'|'.join(SHIPPED)}")
        template = ChatTemplate("tokenizer", own, f"the tokenizer's own ({source})")
    else:
        name, why = choice, "data.chat_template"
        if choice == "auto":
            vocab = tokenizer.get_vocab()
            name = next((n for n, marker in MARKERS.items() if marker in vocab), "llama2")
            why = (f"the tokenizer has none; its vocabulary has {MARKERS[name]}" if name in MARKERS
                   else "the tokenizer has none and no ChatML / Llama 3 markers; Llama 2 chat needs only bos/eos")
        if name in MARKERS and MARKERS[name] not in tokenizer.get_vocab():
            log.warning("data.chat_template=%s: the vocabulary has no %s token, so the model learns the markers as "
                        "plain text and generation stops only at eos", name, MARKERS[name])
        path = resources.files("qlorax.assets") / "chat_templates" / f"{name}.jinja"
        template = ChatTemplate(name, path.read_text(encoding="utf-8"), f"shipped {name} ({why})")
    log.info("chat template: %s", template.origin)
    return template


def render(messages: list[dict], template: ChatTemplate, tokenizer, generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the template writes it (special tokens included)."""
    return tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(messages: list[dict], template: ChatTemplate, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of every assistant turn's content and end-of-turn marker)."""
    text = render(messages, template, tokenizer)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:turn], template, tokenizer, generation_prompt=True) if turn else ""
        through = render(messages[:turn + 1], template, tokenizer)
        if not through.startswith(before) or not text.startswith(through):
            raise QloraxError(f"data.chat_template: the {template.origin} template renders earlier turns "
                              "differently depending on what follows them, so the assistant turns cannot be "
                              f"located; pick a shipped template: data.chat_template={'|'.join(SHIPPED)}")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_conversation(messages: list[dict], template: ChatTemplate, tokenizer,
                          cfg: DataConfig) -> tuple[Example, bool]:
    """Token ids and labels (only assistant turns unless train_on_inputs); returns (example, truncated)."""
    text, spans = assistant_spans(messages, template, tokenizer)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)   # the template wrote them
    except NotImplementedError:
        raise QloraxError(f"data=chat needs a fast tokenizer (character offsets locate the assistant turns); "
                          f"{type(tokenizer).__name__} has none: convert the model's tokenizer to tokenizer.json"
                          ) from None
    ids = encoded["input_ids"]
    if cfg.train_on_inputs:
        labels = list(ids)
    else:
        labels = [t if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
                  for t, (start, _) in zip(ids, encoded["offset_mapping"])]
    truncated = len(ids) > cfg.cutoff_len
    return Example(ids[: cfg.cutoff_len], labels[: cfg.cutoff_len]), truncated


def encoder(cfg: DataConfig, tokenizer, rows: list[dict], source: str):
    """(template, row -> (example, truncated)) for rows that passed check_conversations."""
    from jinja2 import TemplateError   # what apply_chat_template raises

    template = resolve_template(cfg, tokenizer)

    def encode(row: dict) -> tuple[Example, bool]:
        try:
            return tokenize_conversation(conversation(row, cfg), template, tokenizer, cfg)
        except TemplateError as exc:   # the template's raise_exception, e.g. Llama 2's user/assistant alternation
            number = next(i for i, r in enumerate(rows, start=1) if r is row)
            raise QloraxError(f"data: row {number} of {source}: the {template.origin} chat template refuses it "
                              f"({exc}); {FIX}, or pick another template with data.chat_template="
                              f"{'|'.join(SHIPPED)}") from None

    return template, encode


def prompts(rows: list[dict], given: list[str], cfg: DataConfig, tokenizer) -> list[str]:
    """Generation prompts through the chat template: each held-out conversation without its last
    assistant turn, or each given prompt as one user message; both end with the generation prompt."""
    template = resolve_template(cfg, tokenizer)
    turns = [[{"role": "user", "content": p}] for p in given] or [conversation(r, cfg)[:-1] for r in rows]
    return [render(t, template, tokenizer, generation_prompt=True) for t in turns]


def stop_ids(tokenizer) -> list[int]:
    """eos and every end-of-turn token the vocabulary has: where a chat answer ends."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
