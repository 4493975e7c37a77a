"""report.md + loss.png: the run at a glance, built only from the run directory's files."""
from __future__ import annotations

import logging
from pathlib import Path

from qlorax.engine.metrics.jsonl import read_metrics
from qlorax.paths import RunPaths, read_json

log = logging.getLogger("qlorax")


def plot_losses(metrics: list[dict], out: Path) -> bool:
    """Training and eval loss against step; False when matplotlib is missing or there is nothing to plot."""
    if not metrics:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_report(paths: RunPaths) -> Path:
    """Write report.md (and loss.png) from metrics.jsonl, train_summary.json, merge_info.json, verify.json."""
    metrics = read_metrics(paths.metrics)
    summary = read_json(paths.train_summary)
    merge = read_json(paths.merge_info)
    verify = read_json(paths.verify)
    has_plot = plot_losses(metrics, paths.loss_plot)

    def num(x, fmt=".4f"):
        return "n/a" if x is None else format(x, fmt)

    lines = [f"# qlorax run report: `{paths.root.name}`", ""]
    if metrics:
        first, last = metrics[0], metrics[-1]
        rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        rss = [m["rss_mib"] for m in metrics if "rss_mib" in m]
        lines += ["## Training", "",
                  f"- steps: {last['step']}" + (f" of {summary['total_steps']}" if summary.get("total_steps") else ""),
                  f"- loss: {num(first['loss'])} (step {first['step']}) -> {num(last['loss'])} (step {last['step']})",
                  f"- eval loss: {num(summary.get('initial_eval_loss'))} before -> {num(summary.get('final_eval_loss'))} after",
                  f"- throughput: {num(sum(rates) / len(rates), '.1f') if rates else 'n/a'} tokens/s (mean of logged steps)",
                  f"- memory: {num(max(rss), '.0f') if rss else 'n/a'} MiB RSS (max logged)"
                  + (f", {summary['peak_rss_mib']:.0f} MiB peak" if summary.get("peak_rss_mib") else ""),
                  f"- precision: {summary.get('precision', 'n/a')} ({summary.get('precision_reason', '')}); "
                  f"quantization: {summary.get('quant', 'n/a')}; ranks: {summary.get('world_size', 'n/a')}",
                  ]
        if summary.get("linear_weight_bytes"):
            lines.append(f"- decoder linear weights: {summary['linear_weight_bytes'] / 2**20:.2f} MiB")
        lines.append("")
        if has_plot:
            lines += [f"![loss curves]({paths.loss_plot.name})", ""]
    if merge:
        lines += ["## Merge", "", f"- merged model: `{paths.merged.name}/` ({merge.get('dtype')}, {merge.get('base')} base, "
                  f"adapter step {merge.get('adapter_step')})",
                  f"- max |logit difference| merged vs base+adapter: {merge.get('max_logit_diff'):.3g} "
                  f"(tolerance {merge.get('tolerance')}, {merge.get('parity_samples')} held-out examples)", ""]
    if verify:
        lines += ["## Verify", "",
                  f"- held-out loss: base {num(verify.get('base_eval_loss'))} -> fine-tuned {num(verify.get('tuned_eval_loss'))}",
                  f"- perplexity: base {num(verify.get('base_perplexity'), '.2f')} -> fine-tuned "
                  f"{num(verify.get('tuned_perplexity'), '.2f')}", "",
                  "| prompt | base | fine-tuned |", "|---|---|---|"]
        for g in verify.get("generations", []):
            cells = [g["prompt"], g["base"]["text"], g["tuned"]["text"]]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    paths.report.write_text("\n".join(lines))
    log.info("report: %s", paths.report)
    return paths.report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or " "
