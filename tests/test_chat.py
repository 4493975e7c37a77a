"""Conversations: row formats, chat templates, assistant-only masking, bad rows, verify prompts."""
from __future__ import annotations

import json

import pytest

from qlorax.engine import data as D
from qlorax.engine.tiny import build_tokenizer
from qlorax.errors import QloraxError
from qlorax.spec import compose

CONVERSATION = [{"role": "system", "content": "You spell numbers."},
                {"role": "user", "content": "What is 12 in words?"},
                {"role": "assistant", "content": "twelve"},
                {"role": "user", "content": "And 40?"},
                {"role": "assistant", "content": "forty, written f-o-r-t-y"}]
MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"],
           "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def _tokenizer(template: str):
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS[template]})
    return tokenizer


def _write(tmp_path, rows, name="chats.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _runs(example):
    """Token runs whose labels are not masked, as (ids) lists."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == D.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def _example(tokenizer, cfg, messages=CONVERSATION):
    from qlorax.engine.data.chat import resolve_template, tokenize_conversation

    return tokenize_conversation(messages, resolve_template(cfg, tokenizer), tokenizer, cfg)[0]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_only_assistant_turns_and_their_end_of_turn_token_are_trained(template, caplog):
    tokenizer = _tokenizer(template)
    cfg = compose(["data=chat"]).data
    with caplog.at_level("INFO", logger="qlorax"):
        example = _example(tokenizer, cfg)
    assert f"chat template: shipped {template}" in caplog.text   # auto: the markers are in the vocabulary
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    runs = _runs(example)
    assert [tokenizer.decode(run) for run in runs] == [m["content"] + END_OF_TURN[template]
                                                       for m in CONVERSATION if m["role"] == "assistant"]
    assert all(run[-1] == eot for run in runs)   # the end of turn is one special token, and it is trained
    everything = _example(tokenizer, compose(["data=chat", "data.train_on_inputs=true"]).data)
    assert everything.labels == everything.input_ids == example.input_ids


def test_llama2_format_on_the_real_stories260k_tokenizer(stories260k):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    assert not tokenizer.chat_template
    example = _example(tokenizer, compose(["data=chat"]).data)
    runs = _runs(example)
    assert [tokenizer.decode(run).strip() for run in runs] == [m["content"] + " </s>" for m in CONVERSATION
                                                               if m["role"] == "assistant"]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    assert example.input_ids.count(tokenizer.bos_token_id) == 2   # one per [INST], none added twice


def test_the_tokenizers_own_template_is_used_and_named(caplog):
    tokenizer = _tokenizer("chatml")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':' + m['content'] + '<|im_end|>' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:' }}{% endif %}")
    with caplog.at_level("INFO", logger="qlorax"):
        example = _example(tokenizer, compose(["data=chat"]).data)
    assert "chat template: the tokenizer's own" in caplog.text
    assert [tokenizer.decode(r) for r in _runs(example)] == ["twelve<|im_end|>", "forty, written f-o-r-t-y<|im_end|>"]
    with pytest.raises(QloraxError, match="has no chat template"):
        _example(build_tokenizer(), compose(["data=chat", "data.chat_template=tokenizer"]).data)


def test_a_named_template_whose_markers_the_vocabulary_lacks_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="qlorax"):
        example = _example(build_tokenizer(), compose(["data=chat", "data.chat_template=chatml"]).data)
    assert "the vocabulary has no <|im_start|> token" in caplog.text
    assert [build_tokenizer().decode(r) for r in _runs(example)][0] == "twelve<|im_end|>"   # still masked exactly


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(QloraxError, match="renders earlier turns differently"):
        _example(tokenizer, compose(["data=chat"]).data)


def test_sharegpt_rows_with_configured_field_names(tmp_path):
    rows = [{"dialog": [{"speaker": "system", "text": "Be brief."}, {"speaker": "human", "text": f"say {i}"},
                        {"speaker": "gpt", "text": f"{i}"}]} for i in range(20)]
    path = _write(tmp_path, rows)
    spec = compose(["data=chat", f"data.path={path}", "data.chat_format=sharegpt", "data.messages_field=dialog",
                    "data.role_field=speaker", "data.content_field=text", "data.chat_template=chatml",
                    "data.val_set_size=2"])
    tokenizer = _tokenizer("chatml")
    prepared = D.prepare(spec, tokenizer)
    assert (len(prepared.train), len(prepared.eval), prepared.stats["chat_template"]) == (18, 2, "chatml")
    for example in prepared.train:
        text = tokenizer.decode(example.input_ids)
        answer = text.split("<|im_start|>assistant\n")[1]
        assert [tokenizer.decode(r) for r in _runs(example)] == [answer.rstrip("\n")]


def test_verify_prompts_end_before_the_last_answer_with_the_generation_prompt():
    tokenizer = _tokenizer("chatml")
    cfg = compose(["data=chat"]).data
    (prompt,) = D.chat_prompts([{"messages": CONVERSATION}], [], cfg, tokenizer)
    assert prompt.endswith("And 40?<|im_end|>\n<|im_start|>assistant\n") and "twelve<|im_end|>" in prompt
    (given,) = D.chat_prompts([], ["Spell 7."], cfg, tokenizer)
    assert given == "<|im_start|>user\nSpell 7.<|im_end|>\n<|im_start|>assistant\n"
    assert D.chat_stop_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


BAD_ROWS = [
    ({"text": "no messages"}, "no field 'messages'"),
    ({"messages": []}, "the conversation is empty"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 1 has no 'role' field"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "message 1 has no text in 'content'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                   {"role": "user", "content": "and?"}]}, "ends on a user turn"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS, ids=["no-list", "empty", "no-role", "no-content", "unknown-role",
                                                      "ends-on-user"])
def test_a_bad_row_names_the_row_the_file_and_the_fix(tmp_path, bad, reason):
    good = {"messages": CONVERSATION}
    path = _write(tmp_path, [good, good, bad, good])
    with pytest.raises(QloraxError) as info:
        D.prepare(compose(["data=chat", f"data.path={path}", "data.val_set_size=0"]), build_tokenizer())
    message = str(info.value)
    assert f"row 3 of {path}" in message and reason in message and "data.skip_bad_rows=true" in message


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path, caplog):
    good = {"messages": CONVERSATION}
    path = _write(tmp_path, [good, *[bad for bad, _ in BAD_ROWS], good])
    spec = compose(["data=chat", f"data.path={path}", "data.val_set_size=0", "data.skip_bad_rows=true"])
    with caplog.at_level("WARNING", logger="qlorax"):
        prepared = D.prepare(spec, build_tokenizer())
    assert len(prepared.train) == 2 and prepared.stats["skipped_rows"] == len(BAD_ROWS)
    assert f"skipped {len(BAD_ROWS)} of {len(BAD_ROWS) + 2} conversation(s)" in caplog.text


def test_llama2_alternation_error_names_the_row(tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "assistant", "content": "hello"}]}]
    path = _write(tmp_path, rows)
    with pytest.raises(QloraxError) as info:
        D.prepare(compose(["data=chat", f"data.path={path}", "data.val_set_size=0"]), build_tokenizer())
    assert f"row 2 of {path}" in str(info.value) and "alternate" in str(info.value)


def test_chat_options_without_chat_rows_are_refused():
    from qlorax.errors import ConfigError

    with pytest.raises(ConfigError, match="data.chat_format"):
        compose(["data.chat_template=chatml"])


def test_cli_refuses_a_bad_conversation_before_training(tmp_path):
    from conftest import assert_user_error, run_cli

    path = _write(tmp_path, [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    result = run_cli("train", "data=chat", f"data.path={path}", f"run_dir={tmp_path / 'run'}", "quiet=true")
    assert_user_error(result, f"row 2 of {path}", "ends on a user turn", "data.skip_bad_rows=true")
    assert not (tmp_path / "run" / "checkpoints").exists()
