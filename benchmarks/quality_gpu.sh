#!/usr/bin/env bash
# One GPU call of benchmarks/quality.py: install the carried wheels, build the corpus on the machine if it is not
# there yet, run PRESET for BUDGET seconds, and pack the results into $OUT. Call it again on the same warm machine
# to continue the runs (runs/ and .data/ stay there between calls). From the repository root, .whl carried:
#
#     GIT_COMMIT=<hash> bash benchmarks/quality_gpu.sh 60m 540
#     QUALITY_ONLY=adamw-lr2e-3,galore GIT_COMMIT=<hash> bash benchmarks/quality_gpu.sh 60m 540   # some configurations
#
# $OUT receives quality.log, results.tar.gz (benchmarks/results/quality_<preset>.* and the run directories
# without checkpoints: untar it in the repository root) and the markdown report.
set -uo pipefail
preset=${1:?usage: quality_gpu.sh PRESET [BUDGET_S]}
budget=${2:-540}
out=${OUT:-/tmp/quality-out}
t0=$SECONDS
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
source benchmarks/gpu_packages.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers, galore_torch, torchao; print('torch', torch.__version__, '| transformers', transformers.__version__, '| torchao', torchao.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | tail -1
} 2>&1 | tee -a "$out/quality.log"
if [ ! -f .data/python-sources/manifest.json ]; then
  python3 benchmarks/reproduce/build_corpus.py --source python-sources 2>&1 | tee -a "$out/quality.log"
fi
left=$(( budget - (SECONDS - t0) - 25 ))  # 25 s kept for the report and packing
python3 benchmarks/quality.py --preset "$preset" --time_budget "$left" ${QUALITY_ONLY:+--only "$QUALITY_ONLY"} 2>&1 | tee -a "$out/quality.log"
stem=quality_${preset//-/_}
tar czf "$out/results.tar.gz" --exclude=checkpoints "benchmarks/results/$stem".* "runs/quality/$preset" .data/python-sources/manifest.json 2>>"$out/quality.log"
cp "benchmarks/results/$stem.md" "$out/" 2>/dev/null
echo "[quality_gpu.sh] $((SECONDS - t0))s; files in $out: $(ls "$out" | tr '\n' ' ')"
