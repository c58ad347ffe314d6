"""The reproduction's numbers from its run directories: per-run summaries, memory and quality tables, ratios to
the paper's. Pure reading and arithmetic, no torch; ``render.py`` writes them as JSON + markdown + PNG.

A run directory holds ``run.json`` (what run.py launched, and how it ended) and the launcher's
``metrics.jsonl``; the runs directory holds ``invocations.jsonl`` (device, versions, commit, command).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# Table 3 of the paper (GB, as nvidia-smi reports them; perplexity from the final eval loss).
PAPER_TABLE3 = {size: {"blockllm": {"perplexity": ppl_b, "memory_gb": mem_b},
                       "galore": {"perplexity": ppl_g, "memory_gb": mem_g}}
                for size, ppl_b, mem_b, ppl_g, mem_g in (("60m", 34.31, 28.27, 34.88, 32.26),
                                                         ("130m", 25.36, 40.68, 25.36, 46.69),
                                                         ("350m", 19.02, 42.6, 18.95, 49.06))}
PAPER_STEPS = {"60m": 10_000, "130m": 20_000, "350m": 60_000}  # Table 9, total batch 512 x 256 tokens
PAPER_TOKENS_PER_STEP = 512 * 256
LABELS = {"blockllm": "BlockLLM s=0.5", "blockllm-s0.7": "BlockLLM s=0.7", "blockllm-s0.9": "BlockLLM s=0.9",
          "galore": "GaLore", "adamw": "AdamW (full)", "blockllm-random-m75": "random selection, m=75",
          "blockllm-norm": "norm only (no visit frequency)", "blockllm-defaults": "BlockLLM s=0.5, this project's defaults"}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing (a run that failed or has not run)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def paper_ratios() -> dict:
    keys = ("perplexity", "memory_gb")
    return {size: {k: round(ratio(row["blockllm"][k], row["galore"][k]), 4) for k in keys}
            for size, row in PAPER_TABLE3.items()}


# ----- reading runs ------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per step: a step logged twice (a resumed stretch) keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def summarize_run(run_dir: Path) -> dict:
    """What the tables need from one run: progress, eval curve, peak memory, speed, selection activity."""
    run_dir = Path(run_dir)
    spec = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    records = read_metrics(run_dir)
    evals = [{key: r[key] for key in ("step", "tokens", "eval_loss")} for r in records if "eval_loss" in r]
    peak = lambda key: max((r[key] for r in records if key in r), default=None)  # noqa: E731 (cumulative per process)
    speeds = [r["tokens_per_s"] for r in records[2:]] or [r["tokens_per_s"] for r in records]
    target, last = spec.get("target_steps"), records[-1] if records else {}
    summary = {
        "name": run_dir.name, "method": spec.get("method"), "size": spec.get("size"), "label": spec.get("label"),
        "command": spec.get("command"), "status": spec.get("status", "not run"), "target_steps": target,
        "steps_done": last.get("step", 0), "tokens": last.get("tokens", 0),
        "complete": target is not None and last.get("step", 0) >= target,
        "evals": evals, "final_train_loss": _tail_mean([r["loss"] for r in records], 20),
        "peak_allocated_gib": peak("peak_allocated_gib"), "peak_reserved_gib": peak("peak_reserved_gib"),
        "peak_rss_gib": peak("peak_rss_gib"), "median_tokens_per_s": statistics.median(speeds) if speeds else None,
    }
    fractions = [r["selected_fraction"] for r in records if "selected_fraction" in r]
    if fractions:
        summary["reselections"] = sum(bool(r.get("reselected")) for r in records)
        summary["mean_selected_fraction"] = statistics.fmean(fractions)
    return summary


def _tail_mean(values: list[float], n: int) -> float | None:
    return statistics.fmean(values[-n:]) if values else None


def peak_gib(run: dict) -> float | None:
    """GPU peak allocated; on the CPU dry run the process's peak RSS stands in."""
    return run["peak_allocated_gib"] if run["peak_allocated_gib"] is not None else run["peak_rss_gib"]


def common_eval_step(runs: list[dict]) -> int | None:
    """The last step at which every run was evaluated: equal tokens, since the runs share batch and seq_len."""
    steps = [{e["step"] for e in run["evals"]} for run in runs]
    shared = set.intersection(*steps) if steps and all(steps) else set()
    return max(shared) if shared else None


def eval_loss_at(run: dict, step: int | None) -> float | None:
    return next((e["eval_loss"] for e in run["evals"] if e["step"] == step), None)


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 50 else None


# ----- the tables ----------------------------------------------------------------------------------
def memory_table(runs: list[dict]) -> dict:
    """Per size: peak memory of each method and the BlockLLM/GaLore ratios (allocated and reserved)."""
    table = {}
    for run in runs:
        table.setdefault(run["size"], {})[run["method"]] = {
            "peak_allocated_gib": peak_gib(run), "peak_reserved_gib": run["peak_reserved_gib"],
            "complete": run["complete"], "status": run["status"]}
    paper = paper_ratios()
    for size, row in table.items():
        def over(a: str, b: str, key: str = "peak_allocated_gib") -> float | None:
            return ratio((row.get(a) or {}).get(key), (row.get(b) or {}).get(key))

        row["ratios"] = {"blockllm_over_galore_allocated": over("blockllm", "galore"),
                         "blockllm_over_galore_reserved": over("blockllm", "galore", "peak_reserved_gib"),
                         "blockllm_over_adamw_allocated": over("blockllm", "adamw"),
                         "galore_over_adamw_allocated": over("galore", "adamw"),
                         "paper_blockllm_over_galore": paper.get(size, {}).get("memory_gb")}
    return table


def quality_table(runs: list[dict], reference: str | None = None) -> dict:
    """Eval loss of every run at the last step all of them reached (equal tokens), and ratios to `reference`."""
    step = common_eval_step(runs)
    rows = {}
    for run in runs:
        loss = eval_loss_at(run, step)
        rows[run["method"]] = {
            "eval_loss": loss, "eval_perplexity": perplexity(loss), "label": run["label"],
            "steps_done": run["steps_done"], "complete": run["complete"], "peak_allocated_gib": peak_gib(run),
            "median_tokens_per_s": run["median_tokens_per_s"], "reselections": run.get("reselections"),
            "mean_selected_fraction": run.get("mean_selected_fraction")}
    tokens = next((e["tokens"] for run in runs for e in run["evals"] if e["step"] == step), None)
    out = {"compared_at_step": step, "compared_at_tokens": tokens, "rows": rows}
    if reference in rows:
        ref = rows[reference]
        out["perplexity_ratio_to_" + reference] = {m: ratio(r["eval_perplexity"], ref["eval_perplexity"])
                                                   for m, r in rows.items()}
        out["eval_loss_delta_to_" + reference] = {
            m: None if r["eval_loss"] is None or ref["eval_loss"] is None else r["eval_loss"] - ref["eval_loss"]
            for m, r in rows.items()}
    if "blockllm" in rows and "galore" in rows:
        out["blockllm_over_galore_perplexity"] = ratio(rows["blockllm"]["eval_perplexity"],
                                                       rows["galore"]["eval_perplexity"])
    return out


def defaults_verdict(table: dict) -> str:
    """This project's defaults against the paper's rule, both BlockLLM s=0.5, at equal tokens."""
    rows = table["rows"]
    paper, defaults = rows.get("blockllm"), rows.get("blockllm-defaults")
    if not paper or not defaults or paper["eval_loss"] is None or defaults["eval_loss"] is None:
        return "Defaults vs the paper's rule: not measured (a run is missing)."
    delta = defaults["eval_loss"] - paper["eval_loss"]
    return (f"Defaults vs the paper's rule: eval loss {defaults['eval_loss']:.4f} vs {paper['eval_loss']:.4f} "
            f"({delta:+.4f}) at {table['compared_at_tokens']} tokens; trained fraction "
            f"{_fraction(defaults)} vs {_fraction(paper)}.")


def _fraction(row: dict) -> str:
    value = row.get("mean_selected_fraction")
    return "–" if value is None else f"{value:.3f}"
