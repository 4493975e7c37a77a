"""The train stage: 4-bit base + LoRA, trained on the CPU, one readable function.

    spec.yaml -> hardware report -> tokenizer, data -> 4-bit model + LoRA -> optimizer
    -> (resume) -> loop: micro-batches, all-reduce, clip, step, log, eval, checkpoint

Every rank runs this same function; rank 0 alone writes files.
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from typing import Any

from qlorax import hardware, runstatus
from qlorax.engine import checkpoint, distributed
from qlorax.engine.console import Progress, peak_rss_mib, reference_line, rss_mib, setup_logging
from qlorax.engine.data import collate, global_target_tokens, prepare, rank_micro_batches
from qlorax.engine.lean import make_lean
from qlorax.engine.lm import autocast, held_out_loss, loss_sum
from qlorax.engine.metrics import open_metrics
from qlorax.engine.model import attach_lora, load_tokenizer, resolve_model_path, trainable_parameters
from qlorax.engine.quant import linear_weight_bytes, load_base_model, unquantized_linear_layers, use_compute
from qlorax.engine.quant.int8 import row_codec
from qlorax.errors import Interrupted
from qlorax.paths import RunPaths, read_json
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def train(spec: RunSpec) -> dict[str, Any]:
    """Run (or resume) training as described by ``spec``; returns the train summary.

    The caller tracks the stage in status.json (``runstatus.tracking``); this writes "finished".
    """
    import torch

    paths = RunPaths(spec.run_dir)
    setup_logging(paths.log, distributed.env_world()[0], spec.quiet)
    world = distributed.init(spec.parallel.backend, spec.parallel.preflight_timeout_s, spec.parallel.collective_timeout_s)
    t = spec.train
    topo = hardware.detect(spec.hardware.sysfs_root)
    precision, why = hardware.choose_precision(t.precision, topo)
    log.info("hardware: %s", hardware.describe(topo))
    allocator = hardware.allocator_in_use()
    log.info("precision: %s (%s); %d thread(s) per rank, %d rank(s); allocator %s", precision, why,
             torch.get_num_threads(), world.size, allocator)
    if allocator == "system" and world.is_main and hardware.find_tcmalloc() is None:
        log.info("%s", hardware.allocator_advice())
    log.info("model: %s  quant: %s/%s%s  lora: r=%d alpha=%g dropout=%g on %s", spec.model.path, spec.quant.backend,
             spec.quant.type, "+double-quant" if spec.quant.double_quant else "", spec.lora.r, spec.lora.alpha,
             spec.lora.dropout, ",".join(spec.lora.target_modules))
    if world.is_main:
        checkpoint.remove_partial(paths)   # writes cut short by a kill

    # ---- data
    model_path = resolve_model_path(spec)
    tokenizer = load_tokenizer(spec, model_path)
    if world.is_main:
        data = prepare(spec, tokenizer, paths)
    distributed.barrier(world)
    if not world.is_main:
        data = prepare(spec, tokenizer, paths)   # reads the cache rank 0 just wrote
    n_train = len(data.train)
    global_batch = t.batch_size
    micro = t.micro_batch_for(world.size)
    accum = global_batch // (micro * world.size)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * n_train / global_batch))
    log.info("data: %s: %d train / %d eval examples, %d truncated to %d tokens; global batch %d = %d micro x %d "
             "accumulation x %d rank(s); %d steps (%.2f epochs)", spec.data.name, n_train, len(data.eval),
             data.stats["truncated"], spec.data.cutoff_len, global_batch, micro, accum, world.size,
             total_steps, total_steps * global_batch / n_train)

    finished = _finished_summary(paths, spec, total_steps)
    if finished is not None:
        if world.is_main:
            runstatus.write(paths, "finished", "train", step=finished["steps"], total_steps=finished["total_steps"])
        log.info("train: already finished: %d steps, final loss %.4f, eval loss %s -> %s; adapter in %s "
                 "(nothing to do; raise train.max_steps to train further)", finished["steps"], finished["final_loss"],
                 _fmt(finished.get("initial_eval_loss")), _fmt(finished.get("final_eval_loss")), finished["checkpoint"])
        distributed.shutdown(world)
        return finished

    # ---- model
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)   # identical base and LoRA init on every rank
    model = load_base_model(spec, model_path, precision)
    unquantized = unquantized_linear_layers(model, spec)   # named in load_base_model's warning
    model = attach_lora(model, spec)
    params = prepare_for_training(model, spec, precision)
    compute = use_compute(model, spec, _micro_batches(data.train, micro, spec.quant.int8_calibration_batches, pad_id),
                          _micro_batches(data.eval, micro, spec.quant.int8_guard_batches, pad_id), precision,
                          model_dir=model_path)
    weights = linear_weight_bytes(model)
    log.info("weights: decoder linear layers %.1f MiB (%s, %d left unquantized), other %.1f MiB; "
             "%d trainable LoRA parameters", weights["linear"] / 2**20,
             _weight_format(spec, precision), len(unquantized),
             weights["other"] / 2**20, sum(p.numel() for p in params))
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t.lr_scheduler, t.warmup_steps, total_steps))

    # ---- resume
    start_step, initial_eval = 0, None
    found = checkpoint.latest_valid(paths) if spec.resume == "auto" else None
    if found:
        step, where = found
        checkpoint.load_adapter_weights(model, where)
        state = checkpoint.load_state(where)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][world.rank] if world.rank < len(state["rng"]) else state["rng"][0])
        random.setstate(_tuple(state["py_rng"]))
        start_step, initial_eval = step, state.get("initial_eval_loss")
        log.info("resumed from %s (step %d of %d)", where, step, total_steps)
    else:
        torch.manual_seed(spec.seed + world.rank)   # dropout differs per rank
        random.seed(spec.seed + world.rank)

    def evaluate() -> float | None:
        """Held-out loss; each rank takes a shard of the eval examples."""
        if not data.eval:
            return None
        shard = data.eval[world.rank::world.size]
        total, count = held_out_loss(model, shard, micro, pad_id, precision,
                                     max(1, t.eval_max_batches // world.size))
        total, count = distributed.all_reduce_sum([total, count], world)
        return total / max(count, 1)

    if start_step == 0:
        initial_eval = evaluate()
        if initial_eval is not None:
            log.info("eval before training: eval_loss %.4f (perplexity %.2f)", initial_eval, math.exp(min(initial_eval, 50)))
            _warn_if_no_better_than_chance(initial_eval, model, spec)

    # ---- loop
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda num, frame: stop.update(signal=num)) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics = open_metrics(spec, paths, start_step, enabled=world.is_main)   # steps past start_step are redone
    outcome = "finished"
    progress = Progress(total_steps, start_step, enabled=world.is_main and not spec.quiet)
    model.train()
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
    last_loss, eval_loss = float("nan"), initial_eval
    step = start_step
    run_tokens = {"useful": 0, "computed": 0, "time": 0.0}   # padding share and useful-token rate of this session

    def save(at: int) -> None:
        state = {"step": at, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _gather_rng(world), "py_rng": list(random.getstate()), "initial_eval_loss": initial_eval}
        if world.is_main:
            checkpoint.save(paths, at, model, state, t.save_total_limit)
        distributed.barrier(world)

    try:
        while step < total_steps:
            started = time.perf_counter()
            target_tokens = global_target_tokens(step, global_batch, data.train, spec.data.shuffle_seed)
            step_loss, step_tokens, step_computed = 0.0, 0, 0
            for indices in rank_micro_batches(step, global_batch, micro, world.rank, world.size,
                                              n_train, spec.data.shuffle_seed):
                ids, mask, labels = collate([data.train[i] for i in indices], pad_id)
                with autocast(precision):
                    summed, _ = loss_sum(model, ids, mask, labels)
                (summed / target_tokens).backward()
                step_loss += float(summed.detach())
                del summed   # its spent graph would pin ~180 MiB of heap through the next forward (1.1B shape)
                step_tokens += int((mask > 0).sum())   # packed rows hold document numbers, padding 0
                step_computed += ids.numel()
            distributed.sum_gradients(params, world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)) if t.max_grad_norm > 0 else 0.0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # The stop flag rides on this all-reduce, so every rank stops after the same step: a signal
            # reaches ranks at different moments, and a rank stopping alone would leave the rest waiting.
            step_loss, step_tokens, step_computed, stopping = distributed.all_reduce_sum(
                [step_loss, step_tokens, step_computed, float(stop["signal"] is not None)], world)
            step += 1
            last_loss = step_loss / target_tokens
            elapsed = time.perf_counter() - started
            run_tokens["useful"] += step_tokens
            run_tokens["computed"] += step_computed
            run_tokens["time"] += elapsed
            window = {"loss": window["loss"] + last_loss, "steps": window["steps"] + 1,
                      "tokens": window["tokens"] + step_tokens, "time": window["time"] + elapsed}
            lr = scheduler.get_last_lr()[0]
            epoch = step * global_batch / n_train
            do_eval = step % t.eval_steps == 0 or step == total_steps
            if do_eval:
                eval_loss = evaluate()
            if step % t.logging_steps == 0 or do_eval or step == total_steps:
                record = {"step": step, "loss": window["loss"] / window["steps"], "learning_rate": lr, "epoch": epoch,
                          "grad_norm": grad_norm, "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
                          "rss_mib": round(rss_mib(), 1), "step_time_s": window["time"] / window["steps"]}
                if do_eval and eval_loss is not None:
                    record["eval_loss"] = eval_loss
                metrics.write(record)
                if world.is_main:
                    progress.print(reference_line(record["loss"], lr, epoch))
                    if not progress.live:
                        eta = progress.eta_s(step)
                        log.info("step %d/%d  loss %.4f%s  %.0f tok/s  rss %.0f MiB  eta %s", step, total_steps,
                                 record["loss"], f"  eval_loss {eval_loss:.4f}" if do_eval and eval_loss is not None
                                 else "", record["tokens_per_s"], record["rss_mib"], _fmt_eta(eta))
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
            progress.update(step, f"loss {last_loss:.4f} lr {lr:.2e} {step_tokens / max(elapsed, 1e-9):.0f} tok/s "
                                  f"rss {rss_mib():.0f}MiB")
            if step % t.save_steps == 0 or step == total_steps:
                save(step)
            if stopping:
                if step % t.save_steps and step != total_steps:
                    save(step)
                name = signal.Signals(stop["signal"]).name if stop["signal"] is not None else "a signal to another rank"
                raise Interrupted(f"{name}: stopped at step {step} after saving a checkpoint; continue with "
                                  f"`qlorax train run_dir={paths.root} resume=auto`")
    except BaseException as exc:
        outcome = "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "failed"
        raise
    finally:
        progress.close()
        metrics.close(outcome)
        for s, handler in previous.items():
            signal.signal(s, handler)

    divergence = distributed.max_divergence(params, world)
    if divergence > 0:
        log.warning("ranks hold different adapters (max difference %.3g): gradient synchronisation failed", divergence)
    summary = {"steps": step, "rank_adapter_max_diff": divergence, "total_steps": total_steps, "final_loss": last_loss, "initial_eval_loss": initial_eval,
               "final_eval_loss": eval_loss, "precision": precision, "precision_reason": why,
               "quant": f"{spec.quant.backend}/{spec.quant.type}", "compute": compute, "world_size": world.size,
               "linear_weight_bytes": weights["linear"], "other_weight_bytes": weights["other"],
               "unquantized_linear_layers": unquantized,
               "peak_rss_mib": round(peak_rss_mib(), 1), "data": data.stats,
               "tokens_per_s": _mean_rate(paths) if world.is_main else None,
               "useful_tokens_per_s": run_tokens["useful"] / run_tokens["time"] if run_tokens["time"] else None,
               "padding_share": 1 - run_tokens["useful"] / run_tokens["computed"] if run_tokens["computed"] else None,
               "packing": spec.data.packing,
               "checkpoint": str(paths.checkpoint(step))}
    if world.is_main:
        paths.train_summary.write_text(json.dumps(summary, indent=1))
        runstatus.write(paths, "finished", "train", step=step, total_steps=total_steps)
        log.info("train: done, %d steps, final loss %.4f, eval loss %s -> %s; adapter in %s", step, last_loss,
                 _fmt(initial_eval), _fmt(eval_loss), paths.checkpoint(step))
        if run_tokens["computed"]:
            log.info("tokens: %.1f%% of the computed positions were padding (data.packing=%s); %.0f useful tokens/s",
                     100 * summary["padding_share"], str(spec.data.packing).lower(), summary["useful_tokens_per_s"])
    distributed.shutdown(world)
    return summary


def _finished_summary(paths: RunPaths, spec: RunSpec, total_steps: int) -> dict | None:
    """The recorded summary of a run that already trained its ``total_steps`` (a rerun has nothing to do)."""
    if spec.resume != "auto":
        return None
    summary = read_json(paths.train_summary)
    found = checkpoint.latest_valid(paths)
    if not found or found[0] < total_steps or summary.get("steps") != found[0] or "final_loss" not in summary:
        return None
    return summary


def _warn_if_no_better_than_chance(initial_eval: float, model, spec: RunSpec) -> None:
    """A pretrained model whose held-out loss is ln(vocab) or worse predicts no better than uniform guessing:
    its weights are damaged (zeros, a cut file that loaded anyway) or it is not the model meant."""
    vocab = getattr(model.config, "vocab_size", None) or model.get_output_embeddings().out_features
    chance = math.log(vocab)
    if spec.model.path == "builtin:tiny" or initial_eval < chance - 0.05:
        return   # the built-in demo model starts from random weights on purpose
    log.warning("model: held-out loss before training is %.4f, at or above ln(vocab size %d) = %.4f: %s predicts "
                "no better than uniform guessing. Its weights are probably damaged or not what model.path should "
                "point at; check the files (re-download them) before trusting this run", initial_eval, vocab, chance,
                spec.model.path)


def prepare_for_training(model, spec: RunSpec, precision: str) -> list:
    """The LoRA model's trainable parameters, made ready as every training run has them (train and bench)."""
    params = trainable_parameters(model)
    for p in params:
        p.data = p.data.float()   # fp32 master copy of the adapter; the base stays 4-bit / bf16
    if spec.train.lean_kernels:
        codec = row_codec(spec.quant.int8_fuse) if spec.quant.keeps_mlp_int8 else None
        make_lean(model, autocast=precision == "bf16", mlp_codec=codec)
    if spec.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return params


def _weight_format(spec: RunSpec, precision: str) -> str:
    if spec.quant.compute == "int8":
        return f"{spec.quant.int8_weight}, int8 compute"
    return spec.quant.type if spec.quant.backend != "none" else precision


def _micro_batches(examples, micro: int, count: int, pad_id: int) -> list:
    """The first ``count`` micro-batches of ``examples``, collated (calibration and the int8 guard)."""
    return [collate(examples[i:i + micro], pad_id) for i in range(0, min(len(examples), count * micro), micro)]


def _lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)
    return factor


def _gather_rng(world: distributed.World) -> list:
    """Every rank's torch RNG state (dropout differs per rank), gathered on all ranks."""
    import torch

    state = torch.get_rng_state()
    if not world.distributed:
        return [state]
    import torch.distributed as dist

    states = [torch.empty_like(state) for _ in range(world.size)]
    dist.all_gather(states, state)
    return states


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _mean_rate(paths: RunPaths) -> float | None:
    from qlorax.engine.metrics.jsonl import read_metrics

    rates = [r["tokens_per_s"] for r in read_metrics(paths.metrics) if "tokens_per_s" in r]
    return sum(rates) / len(rates) if rates else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))

