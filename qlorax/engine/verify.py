"""The verify stage: the same prompts through the base and the fine-tuned model, side by side.

Greedy generation (with time and tokens/s) and held-out loss / perplexity for both models;
results go to ``verify.json`` and a table on the console.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from qlorax import hardware
from qlorax.engine import checkpoint
from qlorax.engine.data import chat_prompts, chat_stop_ids, prepare, render
from qlorax.engine.lm import generate, held_out_loss, perplexity
from qlorax.engine.model import load_tokenizer, resolve_model_path
from qlorax.engine.quant import load_base_model
from qlorax.engine.quant.common import dtype_kwarg
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def verify(spec: RunSpec) -> dict[str, Any]:
    """Compare base and fine-tuned model on prompts and held-out data; write verify.json."""
    paths = RunPaths(spec.run_dir)
    v = spec.verify
    precision, _ = hardware.choose_precision(spec.train.precision, hardware.detect(spec.hardware.sysfs_root))
    model_path = resolve_model_path(spec)
    tokenizer = load_tokenizer(spec, model_path)
    data = prepare(spec, tokenizer, paths)
    is_chat = spec.data.chat_format != "none"
    if is_chat:   # the way the model will be used: through its chat template, ending with the generation prompt
        prompts = chat_prompts(data.eval_rows[: v.num_prompts], list(v.prompts), spec.data, tokenizer)
    else:
        prompts = list(v.prompts) or [render(row, spec.data, with_response=False)[0]
                                      for row in data.eval_rows[: v.num_prompts]]
    held_out = data.eval or data.train[: spec.train.micro_batch_size * v.eval_batches]
    pad_id = tokenizer.pad_token_id

    def measure(model) -> tuple[list[dict], float | None]:
        outputs = [generate(model, tokenizer, p, v.n_predict, precision, add_special_tokens=not is_chat,
                            stop_ids=chat_stop_ids(tokenizer) if is_chat else None) for p in prompts]
        total, count = held_out_loss(model, held_out, spec.train.micro_batch_size, pad_id, precision, v.eval_batches)
        return outputs, (total / count if count else None)

    base = load_base_model(spec, model_path, precision, quantize=False)
    base_out, base_loss = measure(base)
    del base
    tuned, tuned_source = _load_tuned(spec, paths, model_path, precision)
    tuned_out, tuned_loss = measure(tuned)

    report = {"tuned_model": tuned_source, "precision": precision, "n_predict": v.n_predict,
              "base_eval_loss": base_loss, "tuned_eval_loss": tuned_loss,
              "base_perplexity": perplexity(base_loss), "tuned_perplexity": perplexity(tuned_loss),
              "eval_examples": len(held_out),
              "generations": [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_out, tuned_out)]}
    paths.verify.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    _print_table(report)
    return report


def _load_tuned(spec: RunSpec, paths: RunPaths, model_path: str, precision: str):
    """The merged model when it exists (4-bit if asked), else base + the latest adapter."""
    import torch

    if paths.merged.is_dir() and paths.merge_info.is_file():
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs: dict[str, Any] = {**dtype_kwarg(dtype), "device_map": "cpu"}
        if spec.verify.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=spec.quant.type if spec.quant.backend == "bnb" else "nf4",
                bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(spec.quant.skip_modules))
        model = AutoModelForCausalLM.from_pretrained(paths.merged, **kwargs)
        if spec.verify.load_in_4bit:
            from qlorax.engine.quant.bnb import prepare_cpu

            matmul = prepare_cpu(model, spec.quant.bf16_matmul)["matmul"]   # quant.bf16_matmul, as in training
            return model.eval(), f"{paths.merged} (loaded 4-bit, bf16 matmul: {matmul})"
        return model.eval(), f"{paths.merged}"
    from peft import PeftModel

    step, adapter = checkpoint.require_adapter(paths)
    base = load_base_model(spec, model_path, precision, quantize=spec.verify.load_in_4bit)
    return PeftModel.from_pretrained(base, str(adapter)).eval(), f"base + adapter {adapter.name}"


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(stderr=True, soft_wrap=False)
    table = Table(title=f"verify: base vs fine-tuned ({report['tuned_model']})", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("base", overflow="fold")
    table.add_column("fine-tuned", overflow="fold")
    for g in report["generations"]:
        table.add_row(Text(g["prompt"]), Text(f"{g['base']['text']}\n({g['base']['tokens_per_s']} tok/s)"),
                      Text(f"{g['tuned']['text']}\n({g['tuned']['tokens_per_s']} tok/s)"))
    console.print(table)

    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    console.print(f"held-out loss: base {fmt(report['base_eval_loss'])} -> fine-tuned {fmt(report['tuned_eval_loss'])}; "
                  f"perplexity {fmt(report['base_perplexity'])} -> {fmt(report['tuned_perplexity'])}", markup=False)
