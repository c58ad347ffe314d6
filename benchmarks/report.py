"""Markdown table and PNG plot of a results file (written by benchmarks/memory.py)."""

from __future__ import annotations

from pathlib import Path

from blockllm_scale.launcher.models import MODEL_SIZES

from .grid import one_gpu_key

SIZE_ORDER = {size: i for i, size in enumerate(MODEL_SIZES)}


def measured_gib(entry: dict) -> tuple[float | None, bool]:
    """(peak, on_gpu): peak allocated GPU memory, or the process's peak RSS on CPU."""
    if entry.get("peak_allocated_gib") is not None:
        return entry["peak_allocated_gib"], True
    return entry.get("peak_rss_gib"), False


def error_pct(entry: dict) -> float | None:
    peak, on_gpu = measured_gib(entry)
    if not on_gpu or peak is None or entry.get("status") != "ok" or not entry.get("predicted_gib"):
        return None
    return 100 * (entry["predicted_gib"] - peak) / peak


def gpus(entry: dict) -> int:
    return entry["spec"].get("gpus", 1)  # results from before the GPU count was part of a configuration: 1


def tokens_per_gpu(entry: dict) -> float | None:
    """Median tokens/s per GPU: the launcher's tokens/s count the tokens of every rank."""
    rate = entry.get("tokens_per_s_median")
    return None if rate is None or entry.get("status") != "ok" else rate / gpus(entry)


def scaling_efficiency(entry: dict, by_key: dict[str, dict]) -> float | None:
    """Tokens/s per GPU at n GPUs over that of the same configuration on one GPU (None: either is missing)."""
    base = by_key.get(one_gpu_key(entry["key"]))
    if gpus(entry) == 1 or base is None or base is entry:
        return None
    here, there = tokens_per_gpu(entry), tokens_per_gpu(base)
    return None if here is None or not there else here / there


def group_key(entry: dict) -> tuple:
    spec = entry["spec"]
    return (gpus(entry), SIZE_ORDER.get(spec["model"], 99), spec["model"], spec["backend"], spec["checkpointing"],
            spec["batch_size"])


def ordered(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=group_key)  # stable: the grid's order within a group


def _fmt(value, digits=2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def notes(entry: dict) -> str:
    parts = [entry["reason"].splitlines()[-1][:160]] if entry.get("reason") else []
    parts += entry.get("notes", [])
    if "selected_fraction" in entry:
        parts.append(f"trained {entry['selected_fraction']:.3f} of params, {entry.get('reselections', 0)} reselections")
    if "scoring_time_share" in entry:
        sparse = f" against {entry['sparse_step_s_median']:.3f} s" if "sparse_step_s_median" in entry else ""
        parts.append(f"scoring steps {entry['scoring_time_share']:.0%} of the time after warm-up "
                     f"(median {entry['scoring_step_s_median']:.3f} s{sparse})")
    # Whole-model optimizers always reach the embeddings: say the depth where it varies.
    if "lowest_trained_layer_mean" in entry and ("selected_fraction" in entry or entry["lowest_trained_layer_mean"] != -1):
        parts.append(f"backward down to layer {entry['lowest_trained_layer_mean']:.1f} on average (-1: embeddings)")
    if entry.get("predicted_phase"):
        parts.append(f"predicted peak in {entry['predicted_phase']}")
    return "; ".join(parts).replace("|", "/")


def table(entries: list[dict]) -> list[str]:
    on_gpu = any(measured_gib(e)[1] for e in entries)
    peak_name = "peak alloc GiB/GPU" if on_gpu else "peak RSS GiB/process"
    by_key = {e["key"]: e for e in entries}
    lines = [f"| optimizer | model | backend | ckpt | batch/GPU | GPUs | status | {peak_name} | reserved GiB | predicted GiB "
             "| error | tok/s median | tok/s run mean | tok/s/GPU | scaling eff. | final loss | steps | notes |",
             "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in ordered(entries):
        spec, err, eff = e["spec"], error_pct(e), scaling_efficiency(e, by_key)
        lines.append(" | ".join([
            f"| {spec['label']}", spec["model"], spec["backend"], "on" if spec["checkpointing"] else "off",
            str(spec["batch_size"]), str(gpus(e)), e["status"], _fmt(measured_gib(e)[0]), _fmt(e.get("peak_reserved_gib")),
            _fmt(e.get("predicted_gib")), "" if err is None else f"{err:+.1f}%", _fmt(e.get("tokens_per_s_median"), 0),
            _fmt(e.get("tokens_per_s_mean"), 0), _fmt(tokens_per_gpu(e), 0), "" if eff is None else f"{100 * eff:.0f}%",
            _fmt(e.get("final_loss"), 3), str(e.get("steps_done", "")), notes(e)]) + " |")
    return lines


def markdown(data: dict) -> str:
    lines = [f"# Memory benchmark: {data['name']}", ""]
    for i, inv in enumerate(data["invocations"]):
        libs = ", ".join(f"{k} {v}" for k, v in inv["versions"].items())
        lines += [f"- run {i} ({inv['started']}): {inv['device']}; commit `{inv['git_commit']}`; "
                  f"measured: {inv['measured']}", f"  - command: `{inv['command']}`", f"  - versions: {libs}"]
    entries = data["results"]
    on_gpu = any(measured_gib(e)[1] for e in entries)
    lines += ["", "Synthetic tokens; vocabulary as the size defines it (GaLore's 32000; tiny: 8192). tok/s median: "
              "steps after warm-up; run mean: total tokens / total time of those steps (counts BlockLLM's scoring "
              "steps); both count the tokens of all GPUs. batch is per GPU (process). tok/s/GPU: the median / GPUs; "
              "scaling eff.: tok/s/GPU over that of the same configuration on 1 GPU. Peak memory per GPU is the "
              f"largest over ranks ({'torch.cuda.max_memory_allocated' if on_gpu else 'process peak RSS'}, "
              "reduced with a max before rank 0 writes metrics.jsonl). predicted: "
              "benchmarks/memory_model.py at that world size; error = (predicted - measured) / measured.", ""]
    if entries and not on_gpu and any(gpus(e) > 1 for e in entries):
        lines += ["**Measured on the CPU: a correctness dry run of the scripts, not a measurement.** \"GPUs\" are "
                  "CPU processes sharing the machine's cores, so tokens/s, tok/s/GPU and scaling efficiency say "
                  "nothing about GPU scaling, and peak RSS is not comparable with the (GPU) prediction.", ""]
    return "\n".join(lines + (table(entries) if entries else ["No configuration has run yet."])) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = ordered(data["results"])
    counts = sorted({gpus(e) for e in entries})
    groups = list(dict.fromkeys(group_key(e) for e in entries))
    labels = list(dict.fromkeys(e["spec"]["label"] for e in entries))
    # Each group holds only its own bars, side by side around the group's tick.
    members = {g: [e["spec"]["label"] for e in entries if group_key(e) == g] for g in groups}
    widest = max((len(m) for m in members.values()), default=1)
    scaling = len(counts) > 1
    fig = plt.figure(figsize=(max(8, 0.5 * len(entries) + 2) + 3, 14 if scaling else 9))
    rows = fig.add_gridspec(3 if scaling else 2, 2)
    mem_ax, tok_ax = fig.add_subplot(rows[0, :]), fig.add_subplot(rows[1, :])
    width = 0.8 / widest
    colors = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    for e in entries:
        slots = members[group_key(e)]
        x = groups.index(group_key(e)) + (slots.index(e["spec"]["label"]) - (len(slots) - 1) / 2) * width
        peak, _ = measured_gib(e)
        color = colors[e["spec"]["label"]]
        if peak is not None:
            mem_ax.bar(x - width / 4, peak, width / 2, color=color)
        if e.get("predicted_gib"):
            mem_ax.bar(x + width / 4, e["predicted_gib"], width / 2, color=color, alpha=0.35, hatch="//", edgecolor=color)
        if e["status"] != "ok":
            mem_ax.text(x, 0, e["status"], rotation=90, ha="center", va="bottom", fontsize=7)
        if e.get("tokens_per_s_median"):
            tok_ax.bar(x, e["tokens_per_s_median"], width * 0.9, color=color)
            tok_ax.plot([x], [e["tokens_per_s_mean"]], "k.", markersize=6)
    unit = "GPU" if any(measured_gib(e)[1] for e in entries) else "proc"
    names = [f"{g[2]} {g[3]}\n{'ckpt' if g[4] else 'no ckpt'} b{g[5]}" + (f"\n{g[0]} {unit}" if scaling else "")
             for g in groups]
    for ax in (mem_ax, tok_ax):
        ax.set_xticks(range(len(groups)), names, fontsize=8)
    on_gpu = any(measured_gib(e)[1] for e in entries)
    mem_ax.set_ylabel("peak allocated GiB" if on_gpu else "peak RSS GiB (CPU)")
    mem_ax.set_title(f"{data['name']}: measured (solid) and predicted (hatched) peak memory")
    tok_ax.set_ylabel("tokens/s (bar: median, dot: run mean)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    mem_ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if scaling:
        plot_scaling(entries, counts, fig.add_subplot(rows[2, 0]), fig.add_subplot(rows[2, 1]), on_gpu)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(entries: list[dict], counts: list[int], mem_ax, tok_ax, on_gpu: bool) -> None:
    """Per-GPU peak and tokens/s per GPU against the GPU count, one line per optimizer, model and backend."""
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[dict]] = {}
    for e in entries:
        spec = e["spec"]
        lines.setdefault((spec["label"], spec["model"], spec["backend"], spec["checkpointing"], spec["batch_size"]),
                         []).append(e)
    markers = {"zero1": "^", "zero2": "v", "zero3": "o", "fsdp2": "s", "plain": "D"}
    for i, (line, members) in enumerate(lines.items()):
        members = sorted((e for e in members if e["status"] == "ok"), key=gpus)
        style = dict(color=plt.cm.tab10(i % 10), marker=markers.get(line[2], "x"), label=f"{line[0]}, {line[1]} {line[2]}")
        peaks = [(gpus(e), measured_gib(e)[0]) for e in members if measured_gib(e)[0] is not None]
        rates = [(gpus(e), tokens_per_gpu(e)) for e in members if tokens_per_gpu(e)]
        if peaks:
            mem_ax.plot(*zip(*peaks), **style)
        if rates:
            tok_ax.plot(*zip(*rates), **style)
    for ax in (mem_ax, tok_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("GPUs" if on_gpu else "processes (CPU dry run)")
        ax.grid(alpha=0.3)
    mem_ax.set_ylabel("peak GiB, largest GPU" if on_gpu else "peak RSS GiB, largest process")
    mem_ax.set_title("scaling: per-GPU peak memory")
    tok_ax.set_ylabel("tokens/s per GPU (median)")
    tok_ax.set_title("scaling: tokens/s per GPU" + ("" if on_gpu else " (CPU: says nothing about GPUs)"))
    tok_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def write(data: dict, stem: Path) -> list[Path]:
    """Write <stem>.md and <stem>.png (the plot only where matplotlib is installed: the GPU machine may
    lack it; ``memory.py --report_only`` draws it later); returns the paths written."""
    md, png = stem.with_suffix(".md"), stem.with_suffix(".png")
    md.write_text(markdown(data))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [md]
    plot(data, png)
    return [md, png]


def one_line(entry: dict) -> str:
    peak, on_gpu = measured_gib(entry)
    text = f"{entry['status']}"
    if peak is not None:
        text += f", peak {peak:.2f} GiB{'' if on_gpu else ' RSS'}"
    if entry.get("predicted_gib"):
        text += f" (predicted {entry['predicted_gib']:.2f})"
    if entry.get("tokens_per_s_median"):
        text += f", {entry['tokens_per_s_median']:,.0f} tok/s median, {entry['tokens_per_s_mean']:,.0f} run mean"
    if entry.get("reason"):
        text += f": {entry['reason'].splitlines()[-1][:200]}"
    return text


def listing(specs: list, results: list[dict], predicted: list[float | None]) -> str:
    """One row per configuration: done or to do, its key, the predicted peak and any result's status."""
    done = {r["key"]: r for r in results}
    rows = [f"{'done' if s.key in done else 'todo':4s}  {s.key}  predicted {_fmt(gib)} GiB"
            + (f"  [{one_line(done[s.key])}]" if s.key in done else "") for s, gib in zip(specs, predicted)]
    return "\n".join(rows + [f"{sum(s.key in done for s in specs)} of {len(specs)} done"])
