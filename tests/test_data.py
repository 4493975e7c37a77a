"""Reading rows, templates, tokenization, masking, splits, caching and the sample order."""
from __future__ import annotations

import json

import pytest

from qlorax.engine import data as D
from qlorax.engine.tiny import build_tokenizer
from qlorax.errors import QloraxError
from qlorax.paths import RunPaths
from qlorax.spec import compose


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_english_quotes_renders_reference_template():
    spec = compose(["data=english_quotes"])
    row = {"quote": "\u201cBe yourself.\u201d", "author": "Oscar Wilde", "tags": ["be-yourself", "honesty"]}
    prompt, response = D.render(row, spec.data)
    assert prompt + response == "\u201cBe yourself.\u201d ->: ['be-yourself', 'honesty']"


def test_alpaca_template_with_and_without_input():
    spec = compose(["data=alpaca"])
    with_input = D.render({"instruction": "Add", "input": "2 and 3", "output": "5"}, spec.data)
    without = D.render({"instruction": "Say hi", "input": "", "output": "hi"}, spec.data)
    assert "### Input:\n2 and 3" in with_input[0] and with_input[1] == "5"
    assert "### Input" not in without[0] and "### Instruction:\nSay hi" in without[0]


def test_train_on_inputs_false_masks_the_prompt(tokenizer):
    spec = compose(["data=alpaca"])
    prompt, response = D.render({"instruction": "Add", "input": "", "output": "five"}, spec.data)
    example, truncated = D.tokenize(prompt, response, tokenizer, spec.data)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert not truncated
    assert all(t == D.IGNORE_INDEX for t in example.labels[:n_prompt])
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[-1] == tokenizer.eos_token_id   # add_eos_token
    unmasked, _ = D.tokenize(prompt, response, tokenizer, compose(["data=alpaca", "data.train_on_inputs=true"]).data)
    assert unmasked.labels == unmasked.input_ids


def test_cutoff_truncates_and_counts(tokenizer, tmp_path, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": "x" * n, "a": "y"}) + "\n" for n in (5, 50, 500)))
    spec = compose(["data=local", f"data.path={rows}", 'data.prompt="{q} ->: "', 'data.response="{a}"',
                    "data.cutoff_len=40", "data.val_set_size=0"])
    with caplog.at_level("WARNING", logger="qlorax"):
        prepared = D.prepare(spec, tokenizer)
    assert prepared.stats["truncated"] == 2
    assert max(len(e.input_ids) for e in prepared.train) == 40
    assert "2 of 3 rows are longer than data.cutoff_len=40" in caplog.text


@pytest.mark.parametrize("suffix,writer", [
    (".json", lambda p, rows: p.write_text(json.dumps(rows))),
    (".jsonl", lambda p, rows: p.write_text("".join(json.dumps(r) + "\n" for r in rows))),
    (".csv", lambda p, rows: p.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))),
    (".parquet", None),
])
def test_generic_local_formats(tmp_path, suffix, writer, tokenizer):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    path = tmp_path / f"rows{suffix}"
    if writer is None:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        writer(path, rows)
    spec = compose(["data=local", f"data.path={path}", "data.val_set_size=2"])
    read, source = D.read_rows(spec.data)
    assert read == rows and source == str(path)
    prepared = D.prepare(spec, tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (8, 2)


def test_split_is_seeded_and_disjoint(tokenizer):
    spec = compose(["data.val_set_size=0.1"])
    a, b = D.prepare(spec, tokenizer), D.prepare(spec, tokenizer)
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    assert len(a.eval) == 40 and len(a.train) == 360
    other = D.prepare(compose(["data.val_set_size=0.1", "data.shuffle_seed=1"]), tokenizer)
    assert [e.input_ids for e in other.eval] != [e.input_ids for e in a.eval]
    evals = {tuple(e.input_ids) for e in a.eval}
    assert not evals & {tuple(e.input_ids) for e in a.train}


def test_tokenization_is_cached_in_the_run_directory(tokenizer, tmp_path, monkeypatch):
    spec = compose([])
    paths = RunPaths(tmp_path)
    first = D.prepare(spec, tokenizer, paths)
    assert len(list(paths.data_cache.glob("*.pt"))) == 1
    monkeypatch.setattr(D, "tokenize", lambda *a, **k: pytest.fail("tokenized again despite the cache"))
    second = D.prepare(spec, tokenizer, paths)
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]


def test_ranks_split_each_global_batch_without_overlap():
    single = D.rank_micro_batches(5, 8, 4, 0, 1, n_train=100, seed=3)
    ranks = [D.rank_micro_batches(5, 8, 2, r, 2, n_train=100, seed=3) for r in (0, 1)]
    flat_single = [i for mb in single for i in mb]
    flat_ranks = [i for r in ranks for mb in r for i in mb]
    assert flat_single == flat_ranks and len(set(flat_ranks)) == 8
    assert [len(mb) for mb in ranks[0]] == [2, 2]


def test_epochs_reshuffle():
    first = [D.stream_index(p, 10, 0) for p in range(10)]
    second = [D.stream_index(p, 10, 0) for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_collate_pads_right_and_masks_padding():
    ids, mask, labels = D.collate([D.Example([1, 2, 3], [1, 2, 3]), D.Example([1, 2], [-100, 2])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [1, 2, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[1, 2, 3], [-100, 2, -100]]


def test_global_token_count_covers_the_whole_batch():
    examples = [D.Example([1] * n, [1] * n) for n in (3, 5, 7, 9)]
    total = D.global_target_tokens(0, 4, examples, seed=0)
    assert total == sum(n - 1 for n in (3, 5, 7, 9))


def test_missing_template_field_names_field_row_and_file(tmp_path, tokenizer):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n" + json.dumps({"question": "c"}) + "\n")
    spec = compose(["data=local", f"data.path={rows}", 'data.prompt="{question} ->: "', 'data.response="{answer}"'])
    with pytest.raises(QloraxError) as info:
        D.prepare(spec, tokenizer)
    message = str(info.value)
    assert "'answer'" in message and "row 2" in message and str(rows) in message


def test_a_changed_data_file_is_tokenized_again(tokenizer, tmp_path, english_quotes):
    data = tmp_path / "quotes.jsonl"
    lines = english_quotes.read_text().splitlines()[:60]
    data.write_text("\n".join(lines) + "\n")
    spec = compose(["data=english_quotes", f"data.path={data}"])
    paths = RunPaths(tmp_path / "run")
    D.prepare(spec, tokenizer, paths)
    D.prepare(spec, tokenizer, paths)
    assert len(list(paths.data_cache.glob("*.pt"))) == 1   # same bytes: reused
    data.write_text("\n".join(lines[::-1]) + "\n")       # same rows, another order: another file
    D.prepare(spec, tokenizer, paths)
    assert len(list(paths.data_cache.glob("*.pt"))) == 2
