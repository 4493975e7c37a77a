"""Every shipped config composes and validates; each kind of bad config gets its message."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from qlorax.errors import ConfigError
from qlorax.schema import GROUPS, RunSpec
from qlorax.spec import compose, group_options, with_overrides
from qlorax.specfile import from_dict, load_spec, save_spec, to_dict

from conftest import REPO, assert_user_error, run_cli


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_shipped_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "local":
        overrides.append(f"data.path={tmp_path / 'rows.jsonl'}")
    if group == "parallel" and option in ("ccl", "k8s"):
        overrides.append("workers=1")
    if group == "quant" and option == "bigdl":
        pass   # validation accepts it; the backend import is checked when loading
    spec = compose(overrides)
    assert isinstance(spec, RunSpec)
    assert getattr(spec, group).__class__.__name__.lower().startswith(group[:4])


def test_reference_recipe_defaults():
    spec = compose(["data=english_quotes"])
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (8, 32, 0.05)
    assert list(spec.lora.target_modules) == ["auto"]   # the family's q/k/v: on Llama exactly the reference's
    from qlorax.families import resolve_targets
    assert resolve_targets(spec.lora.target_modules, "llama") == ["q_proj", "k_proj", "v_proj"]
    assert (spec.train.micro_batch_size, spec.train.learning_rate, spec.train.warmup_steps, spec.train.max_steps) == (
        4, 2e-4, 20, 200)
    assert spec.data.prompt + spec.data.response == "{quote} ->: {tags}"
    assert (spec.quant.backend, spec.quant.type) == ("bnb", "nf4")


def test_spec_is_frozen():
    spec = compose([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lora.r = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.workers = 3


def test_spec_yaml_round_trip(tmp_path):
    spec = compose(["lora=all_linear", "train.max_steps=7", f"run_dir={tmp_path}"])
    save_spec(spec, tmp_path / "spec.yaml")
    again = load_spec(tmp_path / "spec.yaml")
    assert to_dict(again) == to_dict(spec)
    assert list(again.lora.target_modules) == ["all-linear"]


def test_workers_is_top_level():
    spec = compose(["parallel=ccl", "workers=2", "train.micro_batch_size=2"])
    assert spec.workers == 2 and spec.parallel.launcher == "ccl"


def test_parallel_ccl_workers_2_works_as_written_with_the_recipe_batch():
    spec = compose(["parallel=ccl", "workers=2"])   # global batch 4, micro-batch 4
    assert spec.train.batch_size == 4 and spec.train.micro_batch_for(2) == 2   # each rank runs its share
    assert spec.train.micro_batch_for(1) == 4


def _problems(overrides):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    return {p.key: p for p in info.value.problems}


def test_unknown_key_suggests_close_match():
    problems = _problems(["lora.rr=8"])
    assert "did you mean 'lora.r'" in problems["lora.rr"].message
    assert problems["lora.rr"].fix == "lora.r=8"


def test_unknown_group_option_lists_options():
    p = _problems(["model=llama2"])["model"]
    assert "llama2_7b" in p.message and p.fix == "model=llama2_7b"


def test_wrong_type_names_expected_type():
    p = _problems(["train.learning_rate=fast"])["train.learning_rate"]
    assert "not a valid number" in p.message


def test_out_of_range_values_all_reported_together():
    problems = _problems(["lora.r=-1", "data.cutoff_len=0", "lora.dropout=1.5"])
    assert set(problems) == {"lora.r", "data.cutoff_len", "lora.dropout"}
    assert ">= 1" in problems["lora.r"].message and problems["lora.r"].fix == "lora.r=8"


def test_bad_choice():
    p = _problems(["train.lr_scheduler=cosin"])["train.lr_scheduler"]
    assert p.fix == "train.lr_scheduler=cosine"


def test_incompatible_combinations():
    problems = _problems(["train.batch_size=6", "train.micro_batch_size=4"])
    assert "multiple of" in problems["train.batch_size"].message
    assert "parallel=ccl" in _problems(["workers=2", "train.micro_batch_size=2"])["workers"].fix
    assert "only sym_int4" in _problems(["quant=bigdl", "quant.type=nf4"])["quant.type"].message
    assert "double quantization" in _problems(["quant=bigdl", "quant.double_quant=true"])["quant.double_quant"].message
    assert "bitsandbytes has no" in _problems(["quant.type=sym_int4"])["quant.type"].message


def test_unknown_and_range_problems_together():
    problems = _problems(["lora.rr=8", "lora.r=0", "model=nope"])
    assert set(problems) == {"lora.rr", "lora.r", "model"}


def test_missing_required_value():
    p = _problems(["data=local"])["data.path"]
    assert "required" in p.message


def test_k8s_quantity_checked_before_rendering():
    p = _problems(["parallel=k8s", "k8s.cpu=abc"])["k8s.cpu"]
    assert "Kubernetes quantity" in p.message


def test_ccl_demanded_without_bindings():
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("oneccl_bindings_for_pytorch"):
        pytest.skip("oneCCL bindings are installed here")
    p = _problems(["parallel=ccl", "parallel.backend=ccl"])["parallel.backend"]
    assert "oneccl" in p.fix.lower() or "oneccl" in p.message.lower()


def test_with_overrides_on_existing_spec():
    spec = compose([])
    changed = with_overrides(spec, ["merge.tolerance=0.5", "verify.n_predict=4"])
    assert changed.merge.tolerance == 0.5 and changed.verify.n_predict == 4
    with pytest.raises(ConfigError):
        with_overrides(spec, ["merge.tolerance=-1"])


def test_from_dict_rejects_unknown_fields():
    data = to_dict(compose([]))
    data["lora"]["rank"] = 3
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert "spec.yaml does not match" in str(info.value)


@pytest.mark.parametrize("argv,needles", [
    (["train", "lora.rr=8"], ["lora.rr", "did you mean 'lora.r'", "fix: lora.r=8"]),
    (["train", "lora.r=-1", "data.cutoff_len=0"], ["lora.r: -1 is out of range", "fix: lora.r=8",
                                                   "data.cutoff_len: 0 is out of range", "fix: data.cutoff_len=256"]),
])
def test_cli_rejects_bad_config_fast_without_loading_a_model(argv, needles, tmp_path):
    started = time.perf_counter()
    result = run_cli(*argv, f"run_dir={tmp_path / 'run'}")
    elapsed = time.perf_counter() - started
    assert_user_error(result, *needles)
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert not (tmp_path / "run").exists(), "a rejected config must not create the run directory"


def test_validation_imports_no_torch():
    code = ("import sys\nfrom qlorax.spec import compose\nfrom qlorax.errors import ConfigError\n"
            "try:\n    compose(['lora.rr=8'])\nexcept ConfigError:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_plan_prints_resolved_spec_offline(tmp_path):
    result = run_cli("plan", "model=llama2_7b", "data=english_quotes", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "path: meta-llama/Llama-2-7b-hf" in result.stdout
    assert "# launch plan" in result.stdout and "OMP_NUM_THREADS" in result.stdout
    assert "# memory estimate" in result.stdout and "weights" in result.stdout


def test_hydra_cfg_job_and_help():
    cfg = run_cli("train", "--cfg", "job", "lora.r=16")
    assert cfg.returncode == 0, cfg.stderr
    assert "r: 16" in cfg.stdout
    helped = run_cli("train", "--help")
    assert helped.returncode == 0
    for group in ("model", "data", "lora", "parallel", "hardware", "quant"):
        assert f"{group}:" in helped.stdout or f"{group}/" in helped.stdout, helped.stdout


def test_unknown_command_suggests():
    assert_user_error(run_cli("trian"), "did you mean 'train'")


def test_users_own_config_dir_adds_group_options(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "support.yaml").write_text(
        'defaults:\n  - data_schema\nname: support\npath: rows.jsonl\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n')
    spec = compose(["data=support"], (str(tmp_path),))
    assert spec.data.name == "support" and spec.data.prompt == "Q: {question}\nA: "
    with pytest.raises(ConfigError):
        compose(["data=support"])   # not without the folder
    result = run_cli("plan", "--config-dir", str(tmp_path), "data=support")
    assert result.returncode == 0, result.stderr
    assert "name: support" in result.stdout
