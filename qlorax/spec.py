"""Compose, validate and freeze the run spec (``qlorax.specfile`` reads and writes spec.yaml).

The composed Hydra config is converted exactly once here. Validation collects every
problem (unknown keys with a close-match suggestion, wrong types, out-of-range values,
incompatible combinations) and raises them together as a ``ConfigError``, each naming
the override that fixes it. Nothing here imports torch or loads a model.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from qlorax.errors import ConfigError, Problem
from qlorax.schema import GROUPS, STAGES, RunSpec, register_configs
from qlorax.specfile import lookup, to_dict

CONFIG_MODULE = "qlorax.conf"
CONFIG_NAME = "config"
K8S_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


# ---------------------------------------------------------------- schema walking
def _all_keys(cls: type = RunSpec, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of the schema, mapped to its dataclass field."""
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            keys.update(_all_keys(sub, dotted + "."))
        else:
            keys[dotted] = f
    return keys


SCHEMA_KEYS = _all_keys()
DICT_KEYS = {k for k, f in SCHEMA_KEYS.items() if str(f.type).startswith(("Dict", "typing.Dict"))}


def force_dict_overrides(overrides: list[str]) -> list[str]:
    """Dict-typed keys (k8s.node_selector) start empty and Hydra only merges into them: set them instead."""
    return [f"++{o}" if o.split("=", 1)[0] in DICT_KEYS else o for o in overrides]


def group_options(group: str, config_dirs: tuple[str, ...] = ()) -> list[str]:
    """Names of the YAML options of a config group: shipped ones plus those in ``--config-dir`` folders."""
    from importlib import resources

    folders = [resources.files(CONFIG_MODULE) / group] + [Path(d) / group for d in config_dirs]
    return sorted({p.name[:-5] for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".yaml")})


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


# ---------------------------------------------------------------- override checks
def check_overrides(overrides: list[str], config_dirs: tuple[str, ...] = ()) -> tuple[list[str], list[Problem]]:
    """Check each command-line override on its own against the schema.

    Returns the overrides that are fine (to compose with) and a problem for each that is
    not, so that one bad key never hides another.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    good, problems = [], []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except Exception as exc:  # hydra's grammar error
            key, _, value = text.partition("=")
            fix = (f"quote the value for Hydra: '{key}=\"{value}\"' (keep the single quotes in a shell)"
                   if value and any(c in value for c in "{}[]:,=()") else "write overrides as key=value, e.g. lora.r=8")
            problems.append(Problem(key or text, f"cannot parse override {text!r}: {str(exc).splitlines()[0]}", fix))
            continue
        key = override.key_or_group
        if key.startswith("hydra.") or key.startswith("hydra/") or key == "hydra":
            good.append(text)
            continue
        if override.is_delete() or override.is_add():
            problems.append(Problem(key, "adding or deleting keys is not supported: every key is in the schema",
                                    f"set it instead: {key}=<value>"))
            continue
        if key in GROUPS:
            options = group_options(key, config_dirs)
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
                override.get_value_element_as_str()]
            bad = [v for v in values if v not in options]
            for v in bad:
                hint = _suggest(v, options)
                problems.append(Problem(key, f"unknown option '{v}'" + (f"; {hint}" if hint else "") + f" (options: {', '.join(options)})",
                                        f"{key}={difflib.get_close_matches(v, options, 1, 0.0)[0]}"))
            if not bad:
                good.append(text)
            continue
        if key not in SCHEMA_KEYS:
            prefix_match = [k for k in SCHEMA_KEYS if k.startswith(key + ".")]
            if prefix_match:
                problems.append(Problem(key, "is a section, not a value", f"set one of its keys, e.g. {prefix_match[0]}=..."))
            else:
                close = difflib.get_close_matches(key, list(SCHEMA_KEYS), n=1, cutoff=0.6)
                if close:
                    default = SCHEMA_KEYS[close[0]].default
                    shown = "..." if default is dataclasses.MISSING or default is None else default
                    problems.append(Problem(key, f"unknown key; did you mean '{close[0]}'?",
                                            f"{close[0]}={_override_text(shown)}"))
                else:
                    section = key.split(".")[0]
                    known = sorted(k for k in SCHEMA_KEYS if k.startswith(section + "."))
                    problems.append(Problem(key, "unknown key" + (f"; keys of {section}: {', '.join(k.split('.', 1)[1] for k in known)}" if known else ""),
                                            "see `qlorax train --help` for every key"))
            continue
        # Type check through OmegaConf's own structured-config validation, value by value.
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        probe = OmegaConf.structured(RunSpec)
        ok = True
        for value in values:
            try:
                OmegaConf.update(probe, key, value, merge=False)
            except (OmegaConfBaseException, ValueError) as exc:
                ok = False
                expected = _type_name(SCHEMA_KEYS[key].type)
                problems.append(Problem(key, f"value {value!r} is not a valid {expected}",
                                        f"{key}=<{expected}>  ({SCHEMA_KEYS[key].metadata.get('help', '')})"))
                del exc
                break
        if ok:
            good.append(text)
    return good, problems


def _override_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _choice_fix(value: Any, wrong: Any, choices: tuple) -> str:
    """The override text with ``wrong`` replaced by its closest allowed choice."""
    closest = difflib.get_close_matches(str(wrong), [str(c) for c in choices], 1, 0.0)[0]
    if not isinstance(value, (list, tuple)):
        return closest
    return "[" + ",".join(dict.fromkeys(closest if v == wrong else str(v) for v in value)) + "]"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("Optional[", "").rstrip("]")
    return {"int": "integer", "float": "number", "bool": "boolean (true/false)", "str": "string"}.get(text, text)


# ---------------------------------------------------------------- validation
def _constraint_problems(spec: RunSpec) -> list[Problem]:
    problems = []
    for key, f in SCHEMA_KEYS.items():
        value = lookup(spec, key)
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices"):   # a list field's choices apply to each of its items
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item not in meta["choices"]:
                    problems.append(Problem(key, f"'{item}' is not one of {', '.join(map(str, meta['choices']))}",
                                            f"{key}={_choice_fix(value, item, meta['choices'])}"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                  ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
        for name, ok, sign in bounds:
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                default = f.default if f.default is not dataclasses.MISSING else None
                fix = f"{key}={default}" if default is not None and ok(default, bound) else f"{key}=<value {sign} {bound}>"
                problems.append(Problem(key, f"{value} is out of range: must be {sign} {bound}", fix))
    return problems


def _cross_problems(spec: RunSpec, out_of_range: frozenset[str] = frozenset()) -> list[Problem]:
    """Rules that involve more than one field; those whose fields failed their own bounds are skipped
    (workers=0 is reported once, as out of range, not as a division by zero)."""
    p: list[Problem] = []
    t, q, par = spec.train, spec.quant, spec.parallel
    if out_of_range & {"workers", "train.batch_size", "train.micro_batch_size"}:
        pass
    elif t.batch_size % spec.workers:
        p.append(Problem("train.batch_size", f"global batch {t.batch_size} does not split evenly over {spec.workers} workers",
                         f"train.batch_size={(t.batch_size // spec.workers + 1) * spec.workers}"))
    else:
        per_rank = t.batch_size // spec.workers
        micro = t.micro_batch_for(spec.workers)
        if per_rank % micro:
            p.append(Problem("train.batch_size", f"each rank's share of the global batch ({per_rank}) is not a multiple "
                             f"of train.micro_batch_size={micro}",
                             f"train.batch_size={max(micro, per_rank // micro * micro) * spec.workers} or "
                             f"train.micro_batch_size={_largest_divisor(per_rank)}"))
    if t.max_steps == 0:
        p.append(Problem("train.max_steps", "0 steps trains nothing", "train.max_steps=200 (or -1 with train.epochs=N)"))
    if spec.workers > 1 and par.launcher == "local":
        p.append(Problem("workers", f"workers={spec.workers} needs a multi-process launcher",
                         f"parallel=ccl workers={spec.workers} (or workers=1)"))
    if par.backend == "ccl" and par.launcher != "k8s" and not _ccl_available():
        p.append(Problem("parallel.backend", "ccl was requested but oneccl_bindings_for_pytorch is not importable",
                         "install Intel's oneCCL bindings for your torch version "
                         "(pip install oneccl_bind_pt -f https://developer.intel.com/ipex-whl-stable-cpu) "
                         "or use parallel.backend=auto / gloo"))
    # Quantization: honour exactly what is asked, or refuse with the reason.
    if q.backend == "bnb":
        if q.type not in ("nf4", "fp4"):
            p.append(Problem("quant.type", f"bitsandbytes has no '{q.type}' 4-bit type", "quant.type=nf4 (or fp4)"))
    elif q.backend == "bigdl":
        if q.type != "sym_int4":
            reason = {"nf4": "raises on the first forward pass on CPU", "fp4": "raises on the first forward pass on CPU",
                      "asym_int4": "trains silently to NaN on CPU", "sym_int8": "trains silently to NaN on CPU"}.get(
                q.type, "is not a bigdl type")
            p.append(Problem("quant.type", f"bigdl {q.type} {reason}; only sym_int4 trains correctly on CPU",
                             "quant.type=sym_int4 (or quant=nf4 for bitsandbytes)"))
        if q.double_quant:
            p.append(Problem("quant.double_quant", "the bigdl backend has no double quantization",
                             "quant.double_quant=false"))
    elif q.backend == "none":
        if q.type not in ("none", "nf4"):
            p.append(Problem("quant.type", f"quant.backend=none does not quantize, but quant.type={q.type}",
                             "quant=none (sets both)"))
        if q.double_quant:
            p.append(Problem("quant.double_quant", "double quantization needs a 4-bit backend", "quant.double_quant=false"))
    if q.compute == "int8" and q.backend == "bigdl":
        p.append(Problem("quant.compute", "int8 compute runs on bitsandbytes 4-bit (quant=nf4/fp4) or bf16 (quant=none) "
                         "weights, not on ipex-llm's", "quant.compute=bf16 (or quant=nf4)"))
    if q.prequantized_dir and q.backend != "bnb":
        p.append(Problem("quant.prequantized_dir", "pre-quantized checkpoints are supported for quant.backend=bnb",
                         "quant.prequantized_dir=null"))
    if len(spec.lora.target_modules) == 0:
        p.append(Problem("lora.target_modules", "no target modules", "lora.target_modules=[auto]"))
    for word in ("all-linear", "auto"):
        if word in spec.lora.target_modules and len(spec.lora.target_modules) > 1:
            p.append(Problem("lora.target_modules", f"{word} cannot be combined with module names",
                             f"lora.target_modules=[{word}]"))
    if spec.lora.init in ("olora", "pissa"):
        p.append(Problem("lora.init", f"{spec.lora.init} trains the adapter against a residual base (the weight minus "
                         "its initial adapter), and qlorax's merge does not yet convert such an adapter back onto the "
                         "original weights: the merged model would not be the trained one", "lora.init=gaussian"))
    elif spec.lora.init == "pissa" and q.backend != "none":
        p.append(Problem("lora.init", "PiSSA splits the base weight by SVD, which peft only does on bf16/fp32 "
                         f"weights, not on a {q.backend} 4-bit base", "quant=none (bf16 LoRA) or lora.init=olora"))
    if (spec.lora.use_dora or spec.lora.init in ("olora", "pissa")) and q.backend == "bigdl":
        p.append(Problem("lora.use_dora" if spec.lora.use_dora else "lora.init",
                         "peft dequantizes only bitsandbytes 4-bit weights for DoRA / OLoRA; it would read "
                         "ipex-llm's packed sym_int4 bytes as the weight",
                         "quant=nf4 (bitsandbytes)"))
    d = spec.data
    for key, value in (("data.path", d.path), ("model.path", spec.model.path)):
        if not str(value).strip():
            p.append(Problem(key, "is required (a local path or a hub id)", f"{key}=/path/to/{key.split('.')[0]}"))
    if d.val_set_size >= 1 and d.val_set_size != int(d.val_set_size):
        p.append(Problem("data.val_set_size", "a count must be a whole number (fractions must be < 1)",
                         f"data.val_set_size={int(d.val_set_size)}"))
    if d.max_rows is not None and d.val_set_size >= 1 and d.val_set_size >= d.max_rows:
        p.append(Problem("data.val_set_size", f"eval split {int(d.val_set_size)} rows >= data.max_rows={d.max_rows}",
                         f"data.val_set_size={max(1, d.max_rows // 10)}"))
    if spec.model.max_seq_len is not None and d.cutoff_len > spec.model.max_seq_len:
        p.append(Problem("data.cutoff_len", f"{d.cutoff_len} exceeds model.max_seq_len={spec.model.max_seq_len}",
                         f"data.cutoff_len={spec.model.max_seq_len}"))
    if d.chat_format == "none" and "{" not in d.prompt + d.response:
        p.append(Problem("data.prompt", "the templates reference no {field} of the data rows",
                         'data.prompt="{question} ->: " data.response="{answer}"'))
    for name in ("prompt", "prompt_when_empty", "response"):
        template = getattr(d, name)
        if template is not None:
            err = _template_error(template)
            if err:
                p.append(Problem(f"data.{name}", f"bad template: {err}", f'data.{name}="... {{field}} ..." (double braces for a literal brace)'))
    if d.chat_format == "none" and (d.chat_template != "auto" or d.skip_bad_rows or d.messages_field):
        p.append(Problem("data.chat_format", "data.chat_template / data.skip_bad_rows / data.messages_field apply "
                         "to conversations only", "data=chat (or data.chat_format=openai|sharegpt)"))
    bad_stages = [s for s in spec.stages if s not in STAGES]
    if bad_stages:
        p.append(Problem("stages", f"unknown stage(s) {bad_stages}", f"stages=[{','.join(STAGES)}]"))
    if par.launcher != "k8s":   # pods bring their own image; its libraries are not this machine's
        from qlorax.engine.metrics import missing_library

        for sink in dict.fromkeys(spec.metrics.report_to):
            problem = missing_library(sink)
            if problem:
                others = [s for s in spec.metrics.report_to if s != sink]
                p.append(Problem("metrics.report_to", problem, f"metrics.report_to=[{','.join(others)}]"))
        if "export" in spec.stages:
            from qlorax.engine.export import missing_library as missing_exporter

            problem = missing_exporter(spec.export.format)
            if problem:
                p.append(Problem("stages", problem, f"stages=[{','.join(s for s in spec.stages if s != 'export')}]"))
    k = spec.k8s
    for key in ("cpu", "memory"):
        if not K8S_QUANTITY.match(str(getattr(k, key))):
            p.append(Problem(f"k8s.{key}", f"'{getattr(k, key)}' is not a Kubernetes quantity",
                             f"k8s.{key}={'8' if key == 'cpu' else '32Gi'}"))
    if k.volume == "nfs" and not k.nfs_server:
        p.append(Problem("k8s.nfs_server", "k8s.volume=nfs needs the server", "k8s.nfs_server=nfs.example.internal"))
    if k.hub_token_secret and ":" not in k.hub_token_secret:
        p.append(Problem("k8s.hub_token_secret", "expected <secret-name>:<key>", "k8s.hub_token_secret=hf-token:token"))
    hw = spec.hardware
    if hw.cores is not None and len(hw.cores) < spec.workers:
        p.append(Problem("hardware.cores", f"{len(hw.cores)} cores listed for {spec.workers} workers",
                         f"list at least {spec.workers} CPU ids or lower workers"))
    if par.launcher == "ccl" and hw.cores is None and hw.sysfs_root == "/":
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if spec.workers > ncpu:
            p.append(Problem("workers", f"{spec.workers} workers but this machine offers {ncpu} CPUs "
                             "(ranks would share cores and slow each other down)", f"workers={ncpu}"))
    return p


def _template_error(template: str) -> str:
    import string

    try:
        list(string.Formatter().parse(template))
    except ValueError as exc:
        return str(exc)
    return ""


def _largest_divisor(n: int) -> int:
    return max(d for d in range(1, max(n, 1) + 1) if n % d == 0 and d <= 8) if n >= 1 else 1


def _ccl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None


def validate(spec: RunSpec) -> list[Problem]:
    """Every problem with a composed spec (field constraints first, then cross-field rules)."""
    problems = _constraint_problems(spec)
    return problems + _cross_problems(spec, frozenset(p.key for p in problems))


# ---------------------------------------------------------------- composition
def compose(overrides: list[str], config_dirs: tuple[str, ...] = ()) -> RunSpec:
    """Compose the shipped configs (plus the user's ``config_dirs``) with ``overrides`` into a validated, frozen spec."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    good, problems = check_overrides(overrides, config_dirs)
    good = [_first_of_sweep(o) for o in good if not o.startswith("hydra")]
    if config_dirs:
        good.append("hydra.searchpath=[" + ",".join(f"file://{Path(d).resolve()}" for d in config_dirs) + "]")
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=force_dict_overrides(good))
    except HydraException as exc:
        problems.append(Problem("overrides", str(exc).splitlines()[0], "check the override syntax: key=value"))
        raise ConfigError(problems) from None
    return from_config(cfg, problems)


def _first_of_sweep(override: str) -> str:
    """`lora.r=4,8,16` -> `lora.r=4`: each sweep value was checked; compose one to validate the rest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([override])
    if not parsed.is_sweep_override():
        return override
    return f"{parsed.key_or_group}={next(iter(parsed.sweep_string_iterator()))}"


def from_config(cfg: Any, problems: list[Problem] | None = None, run_dir: str | None = None) -> RunSpec:
    """Convert a composed DictConfig to a frozen RunSpec, raising every problem together."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems = list(problems or [])
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    for key in sorted(OmegaConf.missing_keys(cfg)):
        help_text = SCHEMA_KEYS.get(key).metadata.get("help", "") if key in SCHEMA_KEYS else ""
        problems.append(Problem(key, f"is required ({help_text})", f"{key}=..."))
        OmegaConf.update(cfg, key, "<missing>", merge=False)
    try:
        OmegaConf.resolve(cfg)
        spec: RunSpec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        problems.append(Problem(getattr(exc, "full_key", "") or "config", str(exc).splitlines()[0], "fix the value"))
        raise ConfigError(problems) from None
    if run_dir is not None:
        spec.run_dir = str(Path(run_dir).resolve())
    elif spec.run_dir:
        spec.run_dir = str(Path(spec.run_dir).resolve())
    problems += [p for p in validate(spec) if p.key not in {q.key for q in problems}]
    if problems:
        raise ConfigError(problems)
    return spec.freeze()


# What must not change when a run directory is reused: anything that alters the trained result.
_IDENTITY_KEYS = ("model.path", "model.revision", "quant", "data", "lora", "seed", "train.batch_size",
                  "train.learning_rate", "train.lr_scheduler", "train.warmup_steps", "train.weight_decay",
                  "train.adam_beta1", "train.adam_beta2", "train.max_grad_norm", "train.precision")


def identity(spec: RunSpec) -> dict:
    full = to_dict(spec)
    out = {}
    for key in _IDENTITY_KEYS:
        value = full
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def identity_diff(old: RunSpec, new: RunSpec) -> list[str]:
    """Keys (dotted) whose values differ between two specs in ways that change training."""
    a, b = _flatten(identity(old)), _flatten(identity(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def with_overrides(spec: RunSpec, overrides: list[str]) -> RunSpec:
    """Apply ``key=value`` overrides to an existing spec (used by stages run on a run directory)."""
    if not overrides:
        return spec
    from omegaconf import OmegaConf

    good, problems = check_overrides(overrides)
    groups = [o for o in good if o.split("=", 1)[0] in GROUPS]
    for o in groups:
        problems.append(Problem(o.split("=", 1)[0], "config groups cannot change on an existing run directory",
                                "start a new run (a new run_dir) to change it"))
    cfg = OmegaConf.merge(OmegaConf.structured(RunSpec), to_dict(spec))
    for o in good:
        if o not in groups and not o.startswith("hydra"):
            key, value = o.split("=", 1)
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else value, merge=False)
    return from_config(cfg, problems)

