#!/usr/bin/env bash
# The whole reproduction in one GPU sitting (~7.5 minutes on one H100). From the repository root, with
# .whl/ (galore-torch + bitsandbytes are the ones needed) and .data/reproduce/ (build_corpus.py) carried:
#
#     GIT_COMMIT=<git hash> bash benchmarks/reproduce/gpu.sh      # (the copy there may carry a stale .git)
#
# Runs `run.py all --plan gpu`: 11 memory runs (60M/130M/350M x BlockLLM/GaLore/AdamW at the paper's batch,
# plus s = 0.7/0.9 at 60M), then 8 pre-training runs of LLaMA-60M (8.2M tokens each, all at once).
# Runs left unfinished by the budget resume on the next call on the same (warm) machine.
# Writes 5 files to $OUT: results.tar.gz (benchmarks/results/reproduce_* and runs/reproduce without
# checkpoints: untar it in the repository root), summary.md, figure4.png, table3_memory.png, gpu.log.
# Settings: REPRO_BUDGET_S (seconds for this script, default 450), REPRO_PLAN (gpu; cpu for a dry run),
# REPRO_SKIP_INSTALL=1 (use the installed packages).
set -uo pipefail
t0=$SECONDS
budget=${REPRO_BUDGET_S:-450}
plan=${REPRO_PLAN:-gpu}
out=${OUT:-/tmp/reproduce-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -z "${REPRO_SKIP_INSTALL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers, galore_torch; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | tail -1
  du -sh .data/reproduce 2>/dev/null || echo "no .data/reproduce: carry it (python benchmarks/reproduce/build_corpus.py makes it)"
} 2>&1 | tee "$out/gpu.log"

left=$(( budget - (SECONDS - t0) - 15 ))  # 15 s kept for packing
python3 benchmarks/reproduce/run.py all --plan "$plan" --time_budget "$left" 2>&1 | tee -a "$out/gpu.log"

tar czf "$out/results.tar.gz" --exclude=checkpoints benchmarks/results/reproduce_* runs/reproduce 2>>"$out/gpu.log"
cat benchmarks/results/reproduce_{table3_memory,table3_ppl,figure4,ablations}.md > "$out/summary.md" 2>/dev/null
cp benchmarks/results/reproduce_figure4.png "$out/figure4.png" 2>/dev/null
cp benchmarks/results/reproduce_table3_memory.png "$out/table3_memory.png" 2>/dev/null
echo "[gpu.sh] $((SECONDS - t0))s; files in $out: $(ls "$out" | tr '\n' ' ')"
sed -n '/^\[reproduce\] summary:/,$p' "$out/gpu.log"
