"""End to end through the real CLI: `qlorax run data=chat` on stories260K given a real chat
template (Zephyr's, with </s> ending each turn), packed with document boundaries."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    from conftest import asset

    model = tmp_path_factory.mktemp("chat-model") / "stories260K-chat"
    shutil.copytree(asset("models/stories260K-hf"), model)
    (model / "chat_template.jinja").write_text(ZEPHYR)
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    result = run_cli("run", "model=stories260k", f"model.path={model}", "data=chat", "data.packing=true",
                     "data.cutoff_len=256", "train.max_steps=30", "train.warmup_steps=5", "train.learning_rate=5e-3",
                     "train.eval_steps=30", "verify.num_prompts=2", "verify.n_predict=8", "quiet=true",
                     f"run_dir={run_dir}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_chat_recipe_trains_merges_and_verifies_through_the_template(chat_run):
    run_dir, result = chat_run
    output = result.stdout + result.stderr
    assert "chat template: the tokenizer's own" in output
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["data"]["chat_template"] == "tokenizer" and summary["data"]["skipped_rows"] == 0
    assert summary["final_eval_loss"] < summary["initial_eval_loss"], summary
    assert summary["packing"] and 0 <= summary["padding_share"] < 0.5 and summary["useful_tokens_per_s"] > 0
    assert json.loads((run_dir / "merged" / "merge_info.json").read_text())
    report = json.loads((run_dir / "verify.json").read_text())
    assert len(report["generations"]) == 2
    for g in report["generations"]:   # held-out conversations cut before their last answer, generation prompt last
        assert g["prompt"].startswith(("<|system|>\n", "<|user|>\n")) and g["prompt"].endswith("</s>\n<|assistant|>\n")
