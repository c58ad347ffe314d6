"""What loss does each optimizer train to at equal tokens? Several configurations of one model trained side by side.

    python benchmarks/reproduce/build_corpus.py --source python-sources   # on the GPU machine: ~100M tokens
    python benchmarks/quality.py --preset 60m --time_budget 540           # all runs at once; call again to continue
    python benchmarks/quality.py --preset 60m --report                    # rewrite the results from the runs
    python benchmarks/quality.py --preset cpu --device cpu                # dry run: tiny model, shipped corpus

Every configuration is one ``launch/pretrain.py`` process in ``runs/quality/<preset>/<name>/``, all sharing the
device, on the same batches in the same order. A run stopped by ``--time_budget`` resumes from its checkpoint on
the next call (on the same, still warm, machine); a finished run is not rerun. Runs are compared at the last
evaluation every one of them reached, so equal tokens, whatever the budget cut. Every run uses the same
precision (``--dtype bf16``: bf16 weights and compute, fp32 copies of what each optimizer trains).

Results: ``benchmarks/results/quality_<preset>.{json,md,png}``: a ``rows`` list (optimizer, label, model,
sparsity, tokens, eval_loss, eval_ppl, trained_fraction, peak_gib, ...), loss-vs-tokens curves, and the
targets each row meets, with device, versions, commit, command and corpus (sha256).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
from blockllm_scale.benchmarks.reproduce import report, run  # noqa: E402  (the side-by-side runner and its run summaries)
from blockllm_scale.benchmarks.reproduce.render import fmt  # noqa: E402
from blockllm_scale.config import PAPER_SETTINGS  # noqa: E402
from blockllm_scale.launcher.cli import settings_as_flags  # noqa: E402

ADAMW = "--optimizer adamw --lr 1e-3"
GALORE = "--optimizer galore --update_proj_gap 200 --scale 0.25 --lr 0.01"


PAPER = " ".join(settings_as_flags(PAPER_SETTINGS))


def blockllm(sparsity: float, *extra: str) -> str:
    """BlockLLM with the library's defaults, at lr 2e-3 and the AdamW baseline's schedule."""
    return " ".join([f"--optimizer blockllm --lr 2e-3 --sparsity {sparsity}", *extra])


@dataclass(frozen=True)
class QualityPlan:
    """One question: a model, a token budget, and the configurations compared on it."""

    title: str
    model: str
    batch_size: int
    seq_len: int
    steps: int
    eval_every: int
    eval_batches: int
    configs: dict  # name -> (label, launcher flags)
    dtype: str = "bf16"
    parallel: int = 8
    save_every: int = 0  # 0: checkpoints only when a call's --time_budget stops the runs (and at the end)
    warmup_fraction: float = 0.1
    references: tuple = ("adamw", "adamw-lr2e-3")  # ratios are to the best of these (lowest eval loss)
    # (name, what, bound): a row meets its target when eval perplexity / the reference's is <= bound
    targets: tuple = ()
    reserve_s: float = 40.0  # a child's start-up and final checkpoint, kept out of its --time_budget
    in_process: bool = False  # the CPU dry run: the launcher runs in this process
    memory_timeout_s: float = 0.0  # (the runner's memory runs; none here)

    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


def _sixty_m_configs(galore_rank: int) -> dict:
    # BlockLLM at lr 2e-3: a block trained on about half the steps moves about half as far at AdamW's lr
    # (CPU sweep: eval loss 5.58 -> 5.40 at s=0.5). AdamW at 2e-3 is its own best at 60M too (H200, 90M tokens:
    # ppl 6.52 against 6.58 at 1e-3), so it is the reference: no ratio flatters BlockLLM by a weak AdamW.
    return {
        "adamw-lr2e-3": ("AdamW lr 2e-3", ADAMW.replace("1e-3", "2e-3")),
        "galore": (f"GaLore r{galore_rank} lr 0.01", f"{GALORE} --rank {galore_rank}"),
        "blockllm-s0.5": ("BlockLLM s=0.5 lr 2e-3", blockllm(0.5)),
        "blockllm-s0.5-random": ("random blocks s=0.5 lr 2e-3", blockllm(0.5, "--strategy random")),
    }


# Four 60M runs at batch 128 x 256 share an H200 at ~540k tokens/s in all: 150M tokens each take ~19 minutes of
# training, one device hold (~25 minutes with start-up and the corpus build). A 130M run costs ~2.2x a 60M one:
# its table is built over several sessions, a few configurations per hold (``--only``; runs compared across
# holds share corpus, batches, order and settings, and the report reads every run directory it is given).
PRESETS = {
    # 4600 steps x 128 x 256 = 150.7M tokens per run.
    "60m": QualityPlan("LLaMA-60M, a 150M-token schedule: BlockLLM s=0.5 against AdamW, GaLore and random blocks "
                       "at equal tokens", "60m", 128, 256, 4600, 460, 8, _sixty_m_configs(128),
                       targets=(("blockllm-s0.5", "<= 1.03x AdamW", 1.03),)),
    "60m-s0.9": QualityPlan("LLaMA-60M, a 150M-token schedule: BlockLLM s=0.9 against AdamW and random blocks at "
                            "equal tokens", "60m", 128, 256, 4600, 460, 8, {
                                "adamw-lr2e-3": ("AdamW lr 2e-3", ADAMW.replace("1e-3", "2e-3")),
                                "blockllm-s0.9": ("BlockLLM s=0.9 lr 2e-3", blockllm(0.9)),
                                "blockllm-s0.9-random": ("random blocks s=0.9 lr 2e-3",
                                                         blockllm(0.9, "--strategy random"))},
                            targets=(("blockllm-s0.9", "<= 1.10x AdamW", 1.10),)),
    "130m": QualityPlan("LLaMA-130M, a 150M-token schedule: BlockLLM s=0.5 against AdamW and GaLore at equal tokens",
                        "130m", 128, 256, 4600, 460, 8,
                        {k: v for k, v in _sixty_m_configs(256).items()
                         if k in ("adamw-lr2e-3", "galore", "blockllm-s0.5")},
                        targets=(("blockllm-s0.5", "<= 1.03x AdamW", 1.03),)),
    # Sweeps: short runs (33M tokens) of BlockLLM's settings at 60M, to choose what the long runs confirm.
    "60m-sweep": QualityPlan("LLaMA-60M sweep: BlockLLM's settings at 33M tokens", "60m", 128, 256, 1000, 250, 8, {
        "adamw": ("AdamW", ADAMW),
        "blockllm-s0.5": ("BlockLLM s=0.5 (defaults)", blockllm(0.5)),
        "blockllm-s0.5-random": ("random blocks s=0.5", blockllm(0.5, "--strategy random")),
        "blockllm-s0.5-paper": ("paper-literal s=0.5", blockllm(0.5, PAPER)),
        "blockllm-s0.5-pure": ("defaults, pure bf16", blockllm(0.5) + " --dtype bf16-pure"),
        "blockllm-s0.5-sr": ("defaults, stochastic rounding", blockllm(0.5, "--weight_update stochastic_rounding")),
        "blockllm-s0.5-rms": ("rms_over_visits", blockllm(0.5, "--strategy rms_over_visits")),
        "blockllm-s0.9": ("BlockLLM s=0.9", blockllm(0.9)),
    }),
    # On a CPU, in minutes: does s=0.9 train within its budget, and how well, on a model shaped like LLaMA-60M
    # ("mini": embeddings and head 57% of the parameters, each larger than the s=0.9 budget)? A direction
    # check on the shipped corpus (fp32), not the GPU-scale evidence of 60m-s0.9.
    "mini-cpu-s0.9": QualityPlan("LLaMA-60M-shaped mini on a CPU, 300 steps: BlockLLM s=0.9 (row ranges) against "
                                 "whole embeddings, random blocks and AdamW", "mini", 16, 64, 300, 50, 16, {
                                     "adamw-lr2e-3": ("AdamW lr 2e-3", ADAMW.replace("1e-3", "2e-3")),
                                     "blockllm-s0.9": ("BlockLLM s=0.9 (defaults: row ranges)", blockllm(0.9)),
                                     "blockllm-s0.9-whole": ("s=0.9, whole tensors (--no-row_ranges)",
                                                             blockllm(0.9, "--no-row_ranges")),
                                     "blockllm-s0.9-random": ("random blocks s=0.9", blockllm(0.9, "--strategy random"))},
                                 dtype="fp32", parallel=1, reserve_s=0.0, in_process=True,
                                 targets=(("blockllm-s0.9", "<= 1.10x AdamW", 1.10),)),
    # Every code path in seconds on a CPU (tests/unit/test_quality_benchmark.py).
    "cpu": QualityPlan("CPU dry run", "tiny", 4, 32, 6, 3, 2, {
        "adamw": ("AdamW", ADAMW), "blockllm-s0.5": ("BlockLLM s=0.5", blockllm(0.5)),
    }, dtype="fp32", parallel=1, reserve_s=0.0, in_process=True,
        targets=(("blockllm-s0.5", "<= 1.5x AdamW", 1.5),)),
}


PRECISION = {"bf16": "bf16 weights and compute, each optimizer updating fp32 copies of what it trains, unless a "
                     "row says otherwise", "fp32": "fp32 weights, compute and Adam states"}


# Defects found after a result was measured, by the commit that measured it: the report states them beside
# the numbers they affect (a result is kept, not silently replaced, until it is measured again).
KNOWN_DEFECTS = {
    "20ffbc9": "BlockLLM's greedy rows ran with a defect fixed in c304691: in bf16 with fp32 copies, the scoring "
               "step read the trained blocks' gradient norms after the update had freed them, so they scored 0 "
               "and every reselection dropped all blocks being trained. Random blocks (no scoring) and the other "
               "optimizers are unaffected; the greedy rule's rows, and so greedy against random, are not valid "
               "evidence of the rule until measured again.",
}


def make_jobs(plan: QualityPlan, args) -> list[run.Job]:
    warmup = int(plan.steps * plan.warmup_fraction)
    common = (f"--model {plan.model} --batch_size {plan.batch_size} --seq_len {plan.seq_len} --steps {plan.steps} "
              f"--eval_every {plan.eval_every} --eval_batches {plan.eval_batches} --save_every {plan.save_every} "
              f"--dtype {plan.dtype} --warmup_steps {warmup} --min_lr_ratio 0.1 --weight_decay 0 --seed 0").split()
    common += data_flags(args, plan) + (["--device", args.device] if args.device else [])
    stop = min(args.stop_at_step or plan.steps, plan.steps)
    jobs = []
    for name, (label, flags) in plan.configs.items():
        if args.only and not any(key == name for key in args.only.split(",")):
            continue
        # A flag given twice (a config's own --dtype) takes its last value: the config's.
        jobs.append(run.Job(name, "train", plan.model, name, [*common, *flags.split()], stop, label=label))
    return jobs


def data_flags(args, plan: QualityPlan) -> list[str]:
    corpus = Path(args.corpus_dir)
    if (corpus / "train.npy").exists():
        return ["--dataset", str(corpus / "train.npy"), "--eval_dataset", str(corpus / "eval.npy"),
                "--tokenizer", str(HERE / "reproduce" / "tokenizer")]
    if plan.in_process:
        return ["--dataset", "shakespeare", "--tokenizer", "shipped"]
    raise SystemExit(f"quality.py: no corpus at {corpus}: on the GPU machine, "
                     "python benchmarks/reproduce/build_corpus.py --source python-sources makes it")


# ----- the report ------------------------------------------------------------------------------------------
def rows_at_equal_tokens(runs: list[dict], plan: QualityPlan) -> tuple[list[dict], dict]:
    step = report.common_eval_step(runs)
    references = [loss for r in runs if r["method"] in plan.references
                  if (loss := report.eval_loss_at(r, step)) is not None]
    ref_loss = min(references, default=None)  # the best AdamW: no ratio flatters BlockLLM by a weak reference
    rows = []
    for r in runs:
        loss = report.eval_loss_at(r, step)
        flags = plan.configs[r["method"]][1].split()
        optimizer = flags[flags.index("--optimizer") + 1]
        sparsity = float(flags[flags.index("--sparsity") + 1]) if "--sparsity" in flags else 0.0
        rows.append({
            "name": r["method"], "optimizer": optimizer, "label": r["label"], "model": plan.model,
            "sparsity": sparsity, "tokens": step and next(e["tokens"] for e in r["evals"] if e["step"] == step),
            "eval_loss": loss, "eval_ppl": report.perplexity(loss),
            "ppl_ratio_to_reference": report.ratio(report.perplexity(loss), report.perplexity(ref_loss)),
            "trained_fraction": r.get("mean_selected_fraction", 1.0), "peak_gib": report.peak_gib(r),
            "reselections": r.get("reselections"), "median_tokens_per_s": r["median_tokens_per_s"],
            "steps_done": r["steps_done"], "target_steps": r["target_steps"], "status": r["status"],
            "curve": [{"tokens": e["tokens"], "eval_loss": e["eval_loss"]} for e in r["evals"]]})
    return rows, {"compared_at_step": step, "compared_at_tokens": rows[0]["tokens"] if rows else None}


def verdicts(rows: list[dict], plan: QualityPlan) -> list[str]:
    by_name = {r["name"]: r for r in rows}
    lines = []
    for name, what, bound in plan.targets:
        row = by_name.get(name)
        ratio = row and row["ppl_ratio_to_reference"]
        if ratio is None:
            lines.append(f"- {name} {what}: not measured")
            continue
        lines.append(f"- {row['label']} {what}: {ratio:.3f}x, {'met' if ratio <= bound else 'NOT met'}")
    for name, random_row in by_name.items():  # "<config>-random" is <config> with random block choice
        greedy = by_name.get(name.removesuffix("-random")) if name.endswith("-random") else None
        if greedy and None not in (random_row["eval_loss"], greedy["eval_loss"]):
            better = random_row["eval_loss"] >= greedy["eval_loss"]
            lines.append(f"- {random_row['label']} no better than {greedy['label']}: eval loss "
                         f"{random_row['eval_loss']:.4f} vs {greedy['eval_loss']:.4f}, {'met' if better else 'NOT met'}")
    default = by_name.get("blockllm-s0.5")
    galore = by_name.get("galore")
    if galore and default and None not in (galore["eval_ppl"], default["eval_ppl"]):
        lines.append(f"- BlockLLM s=0.5 <= GaLore's perplexity: {default['eval_ppl']:.3f} vs {galore['eval_ppl']:.3f}, "
                     f"{'met' if default['eval_ppl'] <= galore['eval_ppl'] else 'NOT met'}")
    for row in rows:
        if row["optimizer"] == "blockllm" and row["trained_fraction"] is not None:
            budget = 1 - row["sparsity"]
            off = abs(row["trained_fraction"] - budget) / budget
            lines.append(f"- {row['label']}: trains {row['trained_fraction']:.3f} of the parameters per step "
                         f"(budget {budget:.2f}; {'within' if off <= 0.05 else 'NOT within'} 5%)")
    return lines


def write_report(plan_name: str, plan: QualityPlan, runs_dir: Path, results_dir: Path) -> list[str]:
    runs = [report.summarize_run(d) for d in sorted(runs_dir.iterdir()) if (d / "run.json").exists()]
    runs = [r for r in runs if r["method"] in plan.configs]
    if not runs:
        return [f"[quality] no runs in {runs_dir}"]
    rows, at = rows_at_equal_tokens(runs, plan)
    invocations = [json.loads(line) for line in (runs_dir / "invocations.jsonl").read_text().splitlines()]
    context = invocations[-1]
    lines = verdicts(rows, plan)
    table = ["| configuration | eval loss | eval ppl | ppl / best AdamW | trained fraction | peak GiB | reselections "
             "| tokens/s | steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['label']} | {fmt(r['eval_loss'], 4)} | {fmt(r['eval_ppl'])} | "
                     f"{fmt(r['ppl_ratio_to_reference'], 3)} | {fmt(r['trained_fraction'], 3)} | {fmt(r['peak_gib'])} | "
                     f"{fmt(r['reselections'])} | {fmt(r['median_tokens_per_s'], 0)} | "
                     f"{r['steps_done']}/{r['target_steps']} ({r['status']}) |")
    corpus = context.get("corpus", {})
    markdown = "\n".join([
        f"# {plan.title}", "",
        f"- device: {context.get('device')}; " + ", ".join(f"{k} {v}" for k, v in context.get("versions", {}).items()),
        f"- commit: {context.get('commit')} (source tree sha256 {str(context.get('tree_sha256'))[:16]})",
        f"- command: `{context.get('command')}` ({len(invocations)} call(s); runs resume across calls)",
        f"- corpus: {corpus.get('description')}; train sha256 {corpus.get('train_sha256', '–')}",
        f"- every run: LLaMA-{plan.model}, batch {plan.batch_size} x {plan.seq_len} tokens, a {plan.steps}-step cosine "
        f"schedule to 10% with {plan.warmup_fraction:.0%} warm-up ({plan.tokens():,} tokens), weight decay 0, seed 0, "
        f"--dtype {plan.dtype} ({PRECISION.get(plan.dtype, plan.dtype)}), the same batches in the same order; "
        + (f"{min(plan.parallel, len(rows))} runs sharing the device" if not plan.in_process else
           "one run after another in one process (peak GiB: that process's resident memory, not a run's)"),
        f"- compared at step {at['compared_at_step']} = {fmt(at['compared_at_tokens'])} tokens (the last evaluation "
        f"every run reached), on {plan.eval_batches} x {plan.batch_size} held-out rows", "",
        *table, "", "Targets:", *lines, "",
        *[f"**Known defect of commit {commit}**: {text}\n" for commit, text in KNOWN_DEFECTS.items()
          if str(context.get("commit", "")).startswith(commit)]])
    payload = {"question": plan.title, "preset": plan_name, **at, "rows": rows, "targets": lines,
               "plan": dataclasses.asdict(plan), "invocations": invocations}
    stem = f"quality_{plan_name.replace('-', '_')}"
    results_dir.mkdir(parents=True, exist_ok=True)
    if _plot(rows, plan, results_dir / f"{stem}.png"):
        markdown += f"\n![eval loss against tokens]({stem}.png)\n"
        payload["png"] = f"{stem}.png"
    (results_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (results_dir / f"{stem}.md").write_text(markdown)
    return [*table, *lines, f"[quality] wrote {results_dir / stem}.{{json,md,png}}"]


def _plot(rows: list[dict], plan: QualityPlan, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference: dict = {}  # per token count, the best reference's eval loss
    for r in (r for r in rows if r["name"] in plan.references):
        for c in r["curve"]:
            reference[c["tokens"]] = min(reference.get(c["tokens"], c["eval_loss"]), c["eval_loss"])
    for r in rows:
        tokens = [c["tokens"] / 1e6 for c in r["curve"]]
        left.plot(tokens, [c["eval_loss"] for c in r["curve"]], marker="o", markersize=3, label=r["label"])
        shared = [c for c in r["curve"] if c["tokens"] in reference]
        right.plot([c["tokens"] / 1e6 for c in shared],
                   [2.718281828 ** (c["eval_loss"] - reference[c["tokens"]]) for c in shared], marker="o", markersize=3)
    left.set(xlabel="training tokens (M)", ylabel="eval loss", title=f"LLaMA-{plan.model}: eval loss")
    right.set(xlabel="training tokens (M)", ylabel="eval perplexity / best AdamW's",
              title="perplexity ratio to the best AdamW")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_ylim(0.9, 1.6)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--time_budget", type=float, default=0, help="seconds for this call; runs stop, checkpointed")
    parser.add_argument("--stop_at_step", type=int, default=0, help="stop every run here (resumable); 0: the end")
    parser.add_argument("--parallel", type=int, default=0, help="runs at once (default: the preset's)")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--device", default="", help="cpu or cuda (default: the launcher's)")
    parser.add_argument("--runs_dir", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--results_dir", default=str(HERE / "results"))
    parser.add_argument("--corpus_dir", default=str(REPO / ".data" / "python-sources"))
    parser.add_argument("--report", action="store_true", help="only rewrite the results from the run directories")
    parser.add_argument("--dry_run", action="store_true", help="print the launcher commands and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    plan = PRESETS[args.preset]
    runs_dir = Path(args.runs_dir) / args.preset
    if not args.report:
        jobs = make_jobs(plan, args)
        if args.dry_run:
            print("\n".join(run.shown(["python", "launch/pretrain.py", *run.launcher_argv(j, runs_dir / j.name, None)])
                            for j in jobs))
            return []
        deadline = time.monotonic() + args.time_budget if args.time_budget else None
        run.record_invocation(runs_dir, plan, args, ["benchmarks/quality.py", *argv])
        run.run_jobs(jobs, runs_dir, plan, args.parallel or plan.parallel, deadline, flat=True)
    summary = write_report(args.preset, plan, runs_dir, Path(args.results_dir))
    print("\n".join(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
