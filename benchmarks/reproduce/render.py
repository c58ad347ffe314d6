"""Write the reproduction's results: benchmarks/results/reproduce_<table>.{json,md,png} for Table 3's memory and
perplexity, Figure 4 and the Appendix E.5 ablations, each with device, versions, commit, command, corpus and
plan in its header. ``write_all(runs_dir, results_dir)`` redraws everything from the run directories alone
(`run.py report`), e.g. on a machine with matplotlib after a GPU machine without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import report
from .report import LABELS, PAPER_STEPS, PAPER_TABLE3, PAPER_TOKENS_PER_STEP, peak_gib

TABLE3 = ("blockllm", "galore", "adamw")
# Table 3's perplexity runs add BlockLLM with this project's defaults beside the paper's rule.
TABLE3_PPL = TABLE3 + ("blockllm-defaults",)
FIGURE4 = ("blockllm", "blockllm-s0.7", "blockllm-s0.9", "galore", "adamw")
ABLATIONS = ("blockllm", "blockllm-random-m75", "blockllm-norm", "blockllm-defaults")


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_files(results_dir: Path, stem: str, payload: dict, markdown: str, plot=None) -> None:
    """reproduce_<stem>.json/.md, and .png when matplotlib is there (plot(plt, path) draws it)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    png = results_dir / f"reproduce_{stem}.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        payload["png"] = "not written: no matplotlib here; `run.py report` where it is redraws it"
    else:
        plot(plt, png)
        plt.close("all")
        payload["png"] = png.name
        markdown += f"\n![{stem}]({png.name})\n"
    (results_dir / f"reproduce_{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (results_dir / f"reproduce_{stem}.md").write_text(markdown)


def header(title: str, context: dict) -> str:
    inv, plan = context.get("invocation") or {}, context.get("plan") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (inv.get("versions") or {}).items())
    return "\n".join([
        f"# {title}", "",
        f"- device: {inv.get('device', '?')}; {versions}",
        f"- commit: {inv.get('commit', '?')} (source tree sha256 {str(inv.get('tree_sha256', '?'))[:16]})",
        f"- command: `{inv.get('command', '?')}`",
        f"- corpus: {(context.get('corpus') or {}).get('description', '?')}",
        f"- plan: {plan.get('summary', '?')}"]) + "\n"


def _curves(ax, runs: list[dict], ylabel: str, transform=lambda loss: loss) -> None:
    most = max((e["tokens"] for run in runs for e in run["evals"]), default=0)
    scale, unit = (1e6, "M") if most >= 1e6 else (1e3, "K")
    for run in (r for r in runs if r["evals"]):
        ax.plot([e["tokens"] / scale for e in run["evals"]], [transform(e["eval_loss"]) for e in run["evals"]],
                marker="o", markersize=3, label=LABELS.get(run["method"], run["method"]))
    ax.set_xlabel(f"training tokens ({unit})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _memory_bars(ax, names: list[str], values: list, title: str) -> None:
    shown = [(LABELS.get(n, n), v) for n, v in zip(names, values) if v is not None]
    ax.barh([n for n, _ in shown], [v for _, v in shown], color="tab:blue")
    for i, (_, v) in enumerate(shown):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set_xlabel("peak allocated GiB")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()


def report_memory(runs: list[dict], context: dict, results_dir: Path) -> None:
    table = report.memory_table(runs)
    batches = {s: f"{b} x {a}" for s, (b, a) in (context.get("plan") or {}).get("memory_batches", {}).items()}
    md = [header("Reproduction: Table 3, peak memory (BlockLLM vs GaLore vs AdamW)", context),
          "Peak `torch.cuda.max_memory_allocated` (and `max_memory_reserved`, nearer the paper's nvidia-smi) over the "
          "whole of a few steps of each method (BlockLLM's scoring step included), each method in its own process, "
          "at the paper's batch (Appendix E.3: GaLore's total batch of 512 x 256 tokens as micro-batch x "
          "accumulation).", "",
          "| size | micro-batch x accum | BlockLLM GiB | GaLore GiB | AdamW GiB | BlockLLM/GaLore allocated | "
          "reserved | paper BlockLLM / GaLore GB | paper ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for size, row in table.items():
        cell = lambda m: fmt((row.get(m) or {}).get("peak_allocated_gib"))  # noqa: E731
        paper = PAPER_TABLE3.get(size)
        paper_gb = f"{paper['blockllm']['memory_gb']} / {paper['galore']['memory_gb']}" if paper else "–"
        md.append(f"| {size} | {batches.get(size, '?')} | {cell('blockllm')} | {cell('galore')} | {cell('adamw')} | "
                  f"{fmt(row['ratios']['blockllm_over_galore_allocated'], 3)} | "
                  f"{fmt(row['ratios']['blockllm_over_galore_reserved'], 3)} | {paper_gb} | "
                  f"{fmt(row['ratios']['paper_blockllm_over_galore'])} |")
    extra = [r for r in runs if r["method"] not in TABLE3]
    md += ["", "Other BlockLLM settings at the same batch (Figure 4's sparsities):", ""] if extra else []
    md += [f"- {r['size']} {LABELS.get(r['method'], r['method'])}: {fmt(peak_gib(r))} GiB allocated, "
           f"{fmt(r['peak_reserved_gib'])} GiB reserved" for r in extra]
    failed = [r for r in runs if not r["complete"]]
    md += ["", "Incomplete: " + ", ".join(f"{r['name']} ({r['status']})" for r in failed)] if failed else []

    def plot(plt, path):
        sizes = list(table)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for i, method in enumerate(TABLE3):
            values = [(table[s].get(method) or {}).get("peak_allocated_gib") or 0 for s in sizes]
            ax.bar([x + 0.27 * (i - 1) for x in range(len(sizes))], values, width=0.27, label=LABELS[method])
        for x, size in enumerate(s for s in sizes if s in PAPER_TABLE3):
            for offset, method in ((-1, "blockllm"), (0, "galore")):
                ax.plot(x + 0.27 * offset, PAPER_TABLE3[size][method]["memory_gb"], "k_", markersize=14)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title("bars: ours (max_memory_allocated); black dashes: the paper (nvidia-smi, GB)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    payload = {"table": "table3-memory", **context, "runs": runs, "memory": table, "paper": PAPER_TABLE3}
    write_files(results_dir, "table3_memory", payload, "\n".join(md) + "\n", plot)


def report_ppl(runs: list[dict], context: dict, results_dir: Path) -> None:
    by_size = {}
    for run in runs:
        by_size.setdefault(run["size"], []).append(run)
    tables = {size: report.quality_table(group, reference="galore") for size, group in by_size.items()}
    paper = report.paper_ratios()
    md = [header("Reproduction: Table 3, perplexity at equal tokens (scaled budget)", context),
          "Eval perplexity on held-out documents at the last step every method reached (same data order and "
          "batch, so equal tokens). The paper trains 10K-60K steps of 512 x 256 tokens; ours is a scaled budget "
          "(see plan), so absolute perplexities are far higher and the ratios are comparable only loosely.", "",
          "BlockLLM: the paper's rule read literally (single tensors by ||G|| / visits, embeddings candidates like "
          "every other tensor, no warm-up); BlockLLM defaults: this project's defaults (blockllm_scale.BlockLLMConfig).",
          "",
          "| size | tokens (step) | BlockLLM ppl | BlockLLM defaults ppl | GaLore ppl | AdamW ppl | "
          "BlockLLM/GaLore | defaults/GaLore | paper BlockLLM / GaLore | paper ratio | paper tokens |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, table in tables.items():
        cell = lambda m: fmt((table["rows"].get(m) or {}).get("eval_perplexity"))  # noqa: E731
        p = PAPER_TABLE3.get(size)
        paper_ppl = f"{p['blockllm']['perplexity']} / {p['galore']['perplexity']}" if p else "–"
        paper_tokens = fmt(PAPER_STEPS[size] * PAPER_TOKENS_PER_STEP) if size in PAPER_STEPS else "–"
        md.append(f"| {size} | {fmt(table['compared_at_tokens'])} ({fmt(table['compared_at_step'])}) | "
                  f"{cell('blockllm')} | {cell('blockllm-defaults')} | {cell('galore')} | {cell('adamw')} | "
                  f"{fmt(table.get('blockllm_over_galore_perplexity'), 3)} | "
                  f"{fmt((table.get('perplexity_ratio_to_galore') or {}).get('blockllm-defaults'), 3)} | {paper_ppl} | "
                  f"{fmt(paper.get(size, {}).get('perplexity'))} | {paper_tokens} |")

    def plot(plt, path):
        fig, axes = plt.subplots(1, len(by_size), figsize=(5 * len(by_size), 3.5), squeeze=False)
        for ax, (size, group) in zip(axes[0], by_size.items()):
            _curves(ax, group, "eval loss")
            ax.set_title(f"LLaMA {size}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    payload = {"table": "table3-ppl", **context, "runs": runs, "quality": tables, "paper": PAPER_TABLE3}
    write_files(results_dir, "table3_ppl", payload, "\n".join(md) + "\n", plot)


def _quality_markdown(table: dict, at_paper_batch: dict, reference: str, parallel: int) -> list[str]:
    shared = f" ({parallel} runs shared the device: each got about 1/{parallel} of it)" if parallel > 1 else ""
    md = [f"Compared at step {fmt(table['compared_at_step'])} = {fmt(table['compared_at_tokens'])} tokens. "
          f"Trained fraction: mean share of parameters trained per step (blocks are whole tensors, so a selection "
          f"can overshoot 1 - s). Tokens/s{shared}.", "",
          f"| method | eval loss | eval ppl | loss - {LABELS.get(reference, reference)} | peak GiB (training batch) | "
          "peak GiB (paper batch) | tokens/s | reselections | trained fraction | steps done |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    deltas = table.get("eval_loss_delta_to_" + reference, {})
    for method, row in table["rows"].items():
        paper_batch = at_paper_batch.get(method)
        md.append(f"| {LABELS.get(method, method)} | {fmt(row['eval_loss'], 4)} | {fmt(row['eval_perplexity'])} | "
                  f"{fmt(deltas.get(method), 4)} | {fmt(row['peak_allocated_gib'])} | "
                  f"{fmt(peak_gib(paper_batch) if paper_batch else None)} | {fmt(row['median_tokens_per_s'], 0)} | "
                  f"{fmt(row['reselections'])} | {fmt(row['mean_selected_fraction'], 3)} | {row['steps_done']} |")
    return md


def report_figure(stem: str, title: str, intro: str, runs: list[dict], memory_runs: list[dict], context: dict,
                  results_dir: Path, reference: str) -> None:
    table = report.quality_table(runs, reference=reference)
    at_paper_batch = {r["method"]: r for r in memory_runs if r["size"] == runs[0]["size"]}
    parallel = (context.get("plan") or {}).get("parallel", 1)
    md = [header(title, context), intro, ""] + _quality_markdown(table, at_paper_batch, reference, parallel)
    md += ["", report.defaults_verdict(table)] if stem == "ablations" else []

    def plot(plt, path):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
        _curves(left, runs, "eval perplexity", transform=lambda loss: math.exp(min(loss, 50)))
        left.set_yscale("log")
        names = [r["method"] for r in runs]
        paper_batch = all(n in at_paper_batch for n in names)
        source = at_paper_batch if paper_batch else {r["method"]: r for r in runs}
        _memory_bars(right, names, [peak_gib(source[n]) for n in names],
                     f"peak memory ({'paper' if paper_batch else 'training'} batch)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    payload = {"table": stem, **context, "runs": runs, "quality": table,
               "memory_at_paper_batch": {m: peak_gib(r) for m, r in at_paper_batch.items()}}
    write_files(results_dir, stem, payload, "\n".join(md) + "\n", plot)


def _context(runs_dir: Path) -> dict:
    path = runs_dir / "invocations.jsonl"
    invocations = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    latest = invocations[-1] if invocations else {}
    return {"invocation": latest, "invocations": invocations, "corpus": latest.get("corpus", {}),
            "plan": latest.get("plan", {})}


def write_all(runs_dir: Path, results_dir: Path, which: str = "all") -> list[str]:
    """(Re)write the reports `which` names from what runs_dir holds; returns short summary lines."""
    context = _context(runs_dir)
    load = lambda kind: [report.summarize_run(d) for d in sorted((runs_dir / kind).glob("*"))  # noqa: E731
                         if (d / "run.json").exists()]
    memory_runs, train_runs = load("memory"), load("train")
    wanted = lambda name: which in (name, "all", "report")  # noqa: E731
    summary = []
    if wanted("table3-memory") and memory_runs:
        report_memory(memory_runs, context, results_dir)
        summary += [f"memory {size}: BlockLLM/GaLore = {fmt(row['ratios']['blockllm_over_galore_allocated'], 3)} "
                    f"(paper {fmt(row['ratios']['paper_blockllm_over_galore'])})"
                    for size, row in report.memory_table(memory_runs).items()]
    ppl_runs = [r for r in train_runs if r["method"] in TABLE3_PPL]
    if wanted("table3-ppl") and ppl_runs:
        report_ppl(ppl_runs, context, results_dir)
        for size in dict.fromkeys(r["size"] for r in ppl_runs):
            table = report.quality_table([r for r in ppl_runs if r["size"] == size], reference="galore")
            summary.append(f"ppl {size} at {fmt(table['compared_at_tokens'])} tokens: BlockLLM/GaLore = "
                           f"{fmt(table.get('blockllm_over_galore_perplexity'), 3)} "
                           f"(paper {fmt(report.paper_ratios().get(size, {}).get('perplexity'))})")
    size = context["plan"].get("figure_size")
    for stem, methods, title, intro, reference in (
            ("figure4", FIGURE4, "Reproduction: Figure 4, sparsity vs GaLore vs AdamW",
             "Eval perplexity at equal tokens, and peak memory; BlockLLM with m = 50, lr 1e-3, no warm-up.", "adamw"),
            ("ablations", ABLATIONS, "Reproduction: selection ablations (Appendix E.5) and this project's defaults",
             "BlockLLM s = 0.5 by the paper's rule (gradient norm / visit frequency, embeddings as candidates) against "
             "random selection (m = 75, the paper's tuned value), norm-only selection, and this project's defaults.",
             "blockllm")):
        runs = [r for m in methods for r in train_runs if r["method"] == m and r["size"] == size]
        if wanted(stem) and runs:
            report_figure(stem, title, intro, runs, memory_runs, context, results_dir, reference)
            table = report.quality_table(runs, reference=reference)
            summary.append(f"{stem} eval loss at {fmt(table['compared_at_tokens'])} tokens: "
                           + ", ".join(f"{m} {fmt(r['eval_loss'], 3)}" for m, r in table["rows"].items()))
            summary += [report.defaults_verdict(table)] if stem == "ablations" else []
    return summary
