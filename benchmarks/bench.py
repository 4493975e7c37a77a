#!/usr/bin/env python
"""Training throughput and memory of qlorax's backends, interleaved in rounds, on this machine.

    python benchmarks/bench.py            # full: TinyLlama-1.1B shape, batch 1 and 4, q/k/v and all-linear
    python benchmarks/bench.py --quick    # < 3 minutes: 4 layers of that shape, batch 1, q/k/v
    python benchmarks/bench.py --scaling  # qlorax train: 2 ranks x 1 thread vs 1 rank x 2 threads
    python benchmarks/bench.py --packing  # qlorax train: padding share and useful tokens/s, unpacked vs packed
    make bench / make bench-quick

Each backend runs in its own process (so peak RSS covers the whole process, load included):
NF4 (bitsandbytes, the default), int8 compute on the NF4-loaded base with int8 weights kept (nf4_int8) or
int4 weights unpacked per use (nf4_int4), int8 compute with int8 or int4 weights made from the bf16 checkpoint (int8, int4), bf16 LoRA (no quantization), "peer" (the same step as a
Hugging Face user writes it: transformers + peft + bitsandbytes, prepare_model_for_kbit_training) and,
when `.venv-bigdl` exists, the reference's ipex-llm sym_int4. `--backends nf4_int8,bf16` picks rows. After a warm-up step per process, steps run in rounds
(A B C A B C ...) so that drift of the machine hits every backend alike. The same run measures
the machine's bf16 matmul rate and reports model FLOPs utilisation (MFU).

Writes benchmarks/results/bench-<time>.json and prints a table. Not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
# Rows of the table: a name, the overrides that select it. "peer" is no qlorax mode but the same step as a
# Hugging Face user writes it (transformers + peft + bitsandbytes NF4, prepare_model_for_kbit_training).
BACKENDS = {"nf4": ["quant=nf4"], "bf16": ["quant=none"], "sym_int4": ["quant=bigdl"],
            "nf4_int8": ["quant=nf4", "quant.compute=int8"],
            "nf4_int4": ["quant=nf4", "quant.compute=int8", "quant.int8_weight=int4"],
            "int8": ["quant=none", "quant.compute=int8"],
            "int4": ["quant=none", "quant.compute=int8", "quant.int8_weight=int4"], "peer": []}
DEFAULT_BACKENDS = "nf4,nf4_int8,nf4_int4,int8,int4,bf16,sym_int4,peer"
TARGETS = {"qkv": ["lora=default"], "all-linear": ["lora=all_linear"]}
BIGDL_PYTHON = REPO / ".venv-bigdl" / "bin" / "python"


# ------------------------------------------------------------------ models
def cache_dir() -> Path:
    return Path(os.environ.get("QLORAX_CACHE", Path.home() / ".cache" / "qlorax")) / "bench"


def build_model(layers: int) -> Path:
    """TinyLlama-1.1B's shape with random weights (bf16), saved once to the cache."""
    out = cache_dir() / f"tinyllama-shape-{layers}l"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorax.engine.tiny import build_tokenizer

    print(f"building the TinyLlama-1.1B-shaped model ({layers} layers, random weights) in {out} ...", flush=True)
    config = LlamaConfig(**{**SHAPE_1B, "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.normal_(param, std=0.02)
    staging = out.with_suffix(".tmp")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


# ------------------------------------------------------------------ worker process
def worker(config: dict) -> None:
    """Load one backend, then run a training step per 'step' line on stdin."""
    import resource

    import torch

    if config["backend"] == "peer":
        return peer_worker(config)

    from qlorax import hardware
    from qlorax.engine.lm import autocast, loss_sum
    from qlorax.engine.model import attach_lora
    from qlorax.engine.quant import linear_weight_bytes, load_base_model, use_compute
    from qlorax.engine.train import prepare_for_training
    from qlorax.spec import compose

    started = time.perf_counter()
    spec = compose([f"model.path={config['model']}", *BACKENDS[config["backend"]], *TARGETS[config["targets"]],
                    "lora.dropout=0.05", f"train.micro_batch_size={config['batch']}", f"train.batch_size={config['batch']}",
                    f"data.cutoff_len={config['seq']}", "quant.int8_calibration_batches=1", "quant.int8_guard_batches=1"])
    precision, _ = hardware.choose_precision("auto", hardware.detect())
    model = attach_lora(load_base_model(spec, config["model"], precision), spec)
    params = prepare_for_training(model, spec, precision)
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids, mask = random_batch(config, model.config.vocab_size)
    compute = use_compute(model, spec, [(ids, mask, ids)], [(ids, mask, ids)], precision, model_dir=config["model"])
    weights = linear_weight_bytes(model)
    emit({"ready": True, "load_s": time.perf_counter() - started, "linear_bytes": weights["linear"],
          "other_bytes": weights["other"], "lora_params": sum(p.numel() for p in params),
          "threads": torch.get_num_threads(), "precision": precision,
          "load_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "int8_loss_gap": compute.get("loss_gap"), "allocator": hardware.allocator_in_use()})
    model.train()

    def step() -> float:
        with autocast(precision):
            summed, count = loss_sum(model, ids, mask, ids)
        (summed / count).backward()
        loss = float(summed) / count
        del summed   # as train.py does: a spent graph kept through the next forward pins heap memory
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    serve_steps(step)


def random_batch(config: dict, vocab: int):
    """The benchmark's one micro-batch of random token ids (the same in every worker) and its mask."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (config["batch"], config["seq"]), generator=generator)
    return ids, torch.ones_like(ids)


def serve_steps(step) -> None:
    """Run ``step()`` per 'step' line on stdin, reporting its time and loss; then the process's peak RSS."""
    import resource

    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = step()
        emit({"seconds": time.perf_counter() - t0, "loss": loss})
    emit({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def peer_worker(config: dict) -> None:
    """The step as a Hugging Face user writes it: transformers' bitsandbytes NF4 loader,
    peft's prepare_model_for_kbit_training (its defaults: fp32 norms/embeddings, gradient checkpointing),
    get_peft_model, bf16 autocast, the model's own loss."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    started = time.perf_counter()
    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(config["model"], quantization_config=quantization,
                                                 dtype=torch.bfloat16, device_map="cpu")
    model = prepare_model_for_kbit_training(model)
    targets = "all-linear" if config["targets"] == "all-linear" else ["q_proj", "k_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids, mask = random_batch(config, model.config.vocab_size)
    linear = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "lora_" not in n and "lm_head" not in n and n.endswith("proj.weight")
                 or n.endswith("proj.base_layer.weight"))
    emit({"ready": True, "load_s": time.perf_counter() - started, "linear_bytes": linear, "other_bytes": 0,
          "lora_params": sum(p.numel() for p in params), "threads": torch.get_num_threads(), "precision": "bf16",
          "load_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "int8_loss_gap": None})
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    serve_steps(step)


def emit(record: dict) -> None:
    print("BENCH " + json.dumps(record), flush=True)


PEER_BACKENDS = ("sym_int4", "peer")


class Worker:
    def __init__(self, python: str, config: dict):
        self.config = config
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if config["backend"] not in PEER_BACKENDS:   # qlorax's rows run with the allocator the CLI gives them;
            from qlorax.hardware import allocator_env   # the peers' rows as their users run them (glibc)

            env = allocator_env(env) or env
        self.log = tempfile.TemporaryFile(mode="w+")   # a pipe could fill up and block the worker
        self.proc = subprocess.Popen([python, __file__, "--worker", json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO)
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        self.log.seek(0)
        raise RuntimeError(f"{self.config['backend']} worker died: {self.log.read()[-3000:]}")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        final = self.read()
        self.proc.wait(timeout=60)
        return final


# ------------------------------------------------------------------ measurements
def matmul_rate(seq_tokens: int, hidden: int, inter: int, seconds: float = 3.0) -> float:
    """Sustained bf16 GEMM FLOP/s for the model's biggest projection at this token count."""
    import torch

    a = torch.randn(seq_tokens, hidden, dtype=torch.bfloat16)
    b = torch.randn(hidden, inter, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * seq_tokens * hidden * inter * n / (time.perf_counter() - t0)


def train_flops_per_token(shape: dict, seq: int, lora_params: int) -> float:
    """Frozen base: forward (2N) + input gradients (2N), no weight gradients; LoRA: 6 per parameter."""
    h, layers, inter, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (h * h * 2 + 2 * h * kv + 3 * h * inter) + vocab * h
    attention = layers * 2 * 2 * seq * h      # QK^T and AV per token, forward
    return 2 * linear * 2 + attention * 3 + 6 * lora_params


def run_config(model: Path, shape: dict, batch: int, targets: str, seq: int, rounds: int, backends: list[str]) -> dict:
    workers = {}
    for backend in backends:
        python = str(BIGDL_PYTHON) if backend == "sym_int4" else sys.executable
        print(f"  loading {backend} (batch {batch}, {targets}) ...", flush=True)
        workers[backend] = Worker(python, {"model": str(model), "backend": backend, "batch": batch,
                                           "targets": targets, "seq": seq})
        workers[backend].step()   # warm-up
    times = {b: [] for b in backends}
    for r in range(rounds):
        for backend in backends:   # A B C A B C ...
            times[backend].append(workers[backend].step()["seconds"])
    results = {}
    for backend, w in workers.items():
        final = w.close()
        median = statistics.median(times[backend])
        results[backend] = {"median_s_per_step": median, "tokens_per_s": batch * seq / median,
                            "steps_s": times[backend], "peak_rss_mib": final["peak_rss_mib"], **w.info}
        results[backend]["flops_per_token"] = train_flops_per_token(shape, seq, w.info["lora_params"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, batch 1, q/k/v, 2 rounds (< 3 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per backend")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", default=None, help="comma-separated micro-batch sizes (default 1,4)")
    parser.add_argument("--targets", default=None, help="comma-separated: qkv,all-linear")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated rows, any of {DEFAULT_BACKENDS} (default: all; nf4_int8 = loaded as NF4, "
                             "int8 weights kept, int8 compute; nf4_int4 = the same with int4 weights unpacked per use; "
                             "int8 / int4 = int8 / int4 weights from the bf16 checkpoint; peer = transformers+peft+bitsandbytes)")
    parser.add_argument("--scaling", action="store_true",
                        help="multi-process scaling through the real CLI: N ranks x 1 thread vs 1 rank x N threads")
    parser.add_argument("--packing", action="store_true",
                        help="packed attention (4-D mask vs per-example loop), then padding share and useful tokens/s "
                             "through the real CLI: unpacked vs data.packing=true")
    parser.add_argument("--scaling-args", default="model=stories260k data=english_quotes",
                        help="overrides for the --scaling and --packing runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.scaling:
        return scaling(args.scaling_args.split(), rounds=args.rounds or 2)
    if args.packing:
        packed_attention(rounds=args.rounds or 5)
        return packing(args.scaling_args.split(), rounds=args.rounds or 2)

    layers = 4 if args.quick else SHAPE_1B["num_hidden_layers"]
    rounds = args.rounds or (2 if args.quick else 3)
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,4")).split(",")]
    targets = (args.targets or ("qkv" if args.quick else "qkv,all-linear")).split(",")
    backends = (args.backends or DEFAULT_BACKENDS).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"--backends: unknown {unknown}; choose from {DEFAULT_BACKENDS}")
    if "sym_int4" in backends and not BIGDL_PYTHON.exists():
        print("sym_int4 (ipex-llm): skipped, .venv-bigdl is absent (make install-bigdl)", flush=True)
        backends.remove("sym_int4")
    shape = {**SHAPE_1B, "num_hidden_layers": layers}
    started = time.perf_counter()
    model = build_model(layers)
    import torch

    from qlorax import hardware

    topo = hardware.detect()
    rate = {b: matmul_rate(b * args.seq, shape["hidden_size"], shape["intermediate_size"]) for b in batches}
    report = {"machine": hardware.describe(topo), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "commit": _commit(), "shape": shape, "seq": args.seq, "rounds": rounds, "matmul_flops": rate,
              "results": []}
    for batch in batches:
        for target in targets:
            results = run_config(model, shape, batch, target, args.seq, rounds, backends)
            for backend, r in results.items():
                r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / rate[batch]
                r["vs_bf16_tokens"] = r["tokens_per_s"] / results["bf16"]["tokens_per_s"] if "bf16" in results else None
                r["vs_bf16_rss"] = r["peak_rss_mib"] / results["bf16"]["peak_rss_mib"] if "bf16" in results else None
                r["vs_sym_int4_tokens"] = (r["tokens_per_s"] / results["sym_int4"]["tokens_per_s"]
                                           if "sym_int4" in results else None)
                r["vs_peer_tokens"] = r["tokens_per_s"] / results["peer"]["tokens_per_s"] if "peer" in results else None
                report["results"].append({"batch": batch, "targets": target, "backend": backend, **r})
    report["wall_s"] = time.perf_counter() - started
    out = REPO / "benchmarks" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")


def scaling(overrides: list[str], rounds: int) -> None:
    """tokens/s of `qlorax train` as N ranks x 1 thread and as 1 rank x N threads (N = usable CPUs), interleaved."""
    from qlorax import hardware

    cores = hardware.detect().physical_cores()
    n = len(cores)
    common = [*overrides, "train.max_steps=40", "train.logging_steps=5", "train.eval_steps=1000", "train.save_steps=1000",
              f"train.batch_size={4 * n}", "train.micro_batch_size=4", "data.cutoff_len=128", "quiet=true"]
    layouts = {f"1 rank x {n} threads": ["parallel=local", f"hardware.cores={cores}".replace(" ", "")],
               f"{n} ranks x 1 thread": ["parallel=ccl", f"workers={n}"]}
    rates = {name: [r["tokens_per_s"] for r in runs] for name, runs in _interleaved_train(common, layouts, rounds).items()}
    print(f"\nscaling on {hardware.describe(hardware.detect())}")
    print(f"qlorax train {' '.join(common)}")
    base = statistics.median(next(iter(rates.values())))
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:<22} {med:8.0f} tokens/s  ({med / base:.2f}x)  rounds: {', '.join(f'{v:.0f}' for v in values)}")


def packing(overrides: list[str], rounds: int) -> None:
    """Padding share and useful (non-padding) tokens/s of `qlorax train` unpacked vs data.packing=true, interleaved."""
    from qlorax import hardware

    common = [*overrides, "train.max_steps=40", "train.logging_steps=5", "train.eval_steps=1000", "train.save_steps=1000",
              "train.batch_size=4", "train.micro_batch_size=4", "quiet=true"]
    layouts = {"unpacked": ["data.packing=false"], "packed": ["data.packing=true"]}
    runs = _interleaved_train(common, layouts, rounds)
    print(f"\npacking on {hardware.describe(hardware.detect())}")
    print(f"qlorax train {' '.join(common)}")
    base = statistics.median(r["tokens_per_s"] for r in runs["unpacked"])
    for name, results in runs.items():
        rate = statistics.median(r["tokens_per_s"] for r in results)
        share = statistics.median(r["padding_share"] for r in results)
        each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in results)
        print(f"  {name:<10} padding {100 * share:5.1f}%  {rate:8.0f} useful tokens/s  ({rate / base:.2f}x)  rounds: {each}")


def packed_attention(rounds: int) -> None:
    """Packed rows' attention, forward + backward: one SDPA call with the block-diagonal 4-D bool mask
    (what qlorax runs) vs a variable-length loop of one causal SDPA call per example, interleaved."""
    import torch
    import torch.nn.functional as F

    from qlorax.engine.data import model_inputs

    print(f"packed attention (forward + backward), {torch.get_num_threads()} threads; median of {rounds} rounds")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for batch, heads, width, doc in ((4, 8, 256, 50), (4, 32, 256, 50), (1, 32, 1024, 200), (1, 32, 2048, 60)):
            rows = []
            for _ in range(batch):
                lengths, left = [], width
                while left > 0:
                    lengths.append(min(left, int(torch.randint(doc // 2, doc * 3 // 2, (), generator=generator))))
                    left -= lengths[-1]
                rows.append(lengths)
            numbers = torch.stack([torch.repeat_interleave(torch.arange(1, len(r) + 1), torch.tensor(r)) for r in rows])
            mask = model_inputs(torch.zeros_like(numbers), numbers)["attention_mask"]
            q, k, v = (torch.randn(batch, heads, width, 64, dtype=dtype, requires_grad=True) for _ in range(3))

            def block_mask():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

            def per_example():
                outs = []
                for b, lengths in enumerate(rows):
                    starts = [sum(lengths[:i]) for i in range(len(lengths))]
                    outs.append(torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n],
                                                                          v[b:b + 1, :, s:s + n], is_causal=True)
                                           for s, n in zip(starts, lengths)], dim=2))
                torch.cat(outs).sum().backward()

            times: dict[str, list[float]] = {"4-D mask": [], "per example": []}
            for _ in range(rounds + 1):   # the first round warms up
                for name, run in (("4-D mask", block_mask), ("per example", per_example)):
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            masked, loop = (statistics.median(t[1:]) * 1e3 for t in times.values())
            print(f"  {str(dtype)[6:]:<9} batch {batch} heads {heads:>2} row {width:>4} examples ~{doc:>3}: "
                  f"4-D mask {masked:8.1f} ms  per example {loop:8.1f} ms  ({loop / masked:.2f}x)")


def _interleaved_train(common: list[str], layouts: dict[str, list[str]], rounds: int) -> dict[str, list[dict]]:
    """Run `qlorax train` per layout in rounds (A B A B ...); per run: the median useful tokens/s of the
    logged windows after the first (which includes warm-up) and the run's padding share."""
    import tempfile as tmp

    assets = Path(os.environ.get("QLORAX_ASSETS", REPO.parent / "shared" / "assets"))
    if "data=english_quotes" in common:
        common = [*common, f"data.path={assets / 'data/english_quotes.jsonl'}"]
    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    with tmp.TemporaryDirectory() as work:
        for r in range(rounds):
            for name, extra in layouts.items():
                run_dir = Path(work) / f"{r}-{len(runs[name])}-{name.split()[0]}"
                cmd = [sys.executable, "-m", "qlorax", "train", *common, *extra, f"run_dir={run_dir}"]
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
                summary = json.loads((run_dir / "train_summary.json").read_text())
                runs[name].append({"tokens_per_s": statistics.median(m["tokens_per_s"] for m in records[1:]),
                                   "padding_share": summary.get("padding_share")})
    return runs


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def print_table(report: dict) -> None:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    print(f"\n{report['machine']}\ntorch {report['torch']}, {report['threads']} threads, commit {report['commit']}; "
          f"model: TinyLlama-1.1B shape, {report['shape']['num_hidden_layers']} layers, seq {report['seq']}, "
          f"{report['rounds']} interleaved rounds")
    for batch, rate in report["matmul_flops"].items():
        print(f"bf16 matmul rate at {batch}x{report['seq']} tokens: {rate / 1e9:.0f} GFLOP/s")
    allocators = sorted({f"{r['backend']} {r.get('allocator') or 'system'}" for r in report["results"]})
    print("allocator: " + ", ".join(allocators))
    header = (f"{'batch':>5} {'lora':<10} {'backend':<9} {'s/step':>8} {'tok/s':>8} {'peak RSS':>9} {'weights':>9} "
              f"{'MFU':>6} {'tok/s vs bf16':>13} {'RSS vs bf16':>11} {'tok/s vs sym_int4':>17} {'vs peer':>7} "
              f"{'int8 gap':>8}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(f"{r['batch']:>5} {r['targets']:<10} {r['backend']:<9} {r['median_s_per_step']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['peak_rss_mib']:>6.0f}MiB {r['linear_bytes'] / 2**20:>6.0f}MiB {r['mfu'] * 100:>5.1f}% "
              f"{ratio(r['vs_bf16_tokens']):>13} {ratio(r['vs_bf16_rss']):>11} {ratio(r['vs_sym_int4_tokens']):>17} "
              f"{ratio(r.get('vs_peer_tokens')):>7} "
              f"{'-' if r.get('int8_loss_gap') is None else format(100 * r['int8_loss_gap'], '+.2f') + '%':>8}")


if __name__ == "__main__":
    main()
