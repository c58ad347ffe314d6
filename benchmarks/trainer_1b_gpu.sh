#!/usr/bin/env bash
# One GPU call of benchmarks/trainer_1b.py: LLaMA-1B through the HF Trainer, bf16, gradient checkpointing, under
# ZeRO-2 and FSDP2, AdamW and BlockLLM s=0.9, every visible GPU per run. From the repository root (.whl carried
# when the machine lacks the packages):
#
#     GIT_COMMIT=<hash> bash benchmarks/trainer_1b_gpu.sh [extra trainer_1b.py flags, e.g. --steps 100]
#
# $OUT receives trainer_1b.log, the report trainer_1b_zero2_fsdp2.{json,md,png} (rewritten after every run, so a
# call cut short keeps the runs it finished: copy them to benchmarks/results/) and the per-run logs in
# trainer_1b_zero2_fsdp2.runs/.
set -uo pipefail
out=${OUT:-/tmp/trainer-1b-out}
t0=$SECONDS
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
source benchmarks/gpu_packages.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 benchmarks/trainer_1b.py --stem "$out/trainer_1b_zero2_fsdp2" "$@"
} 2>&1 | tee -a "$out/trainer_1b.log"
rm -rf "$out"/trainer_1b_zero2_fsdp2.runs/*/  # the Trainer's output folders (save_strategy="no": nothing to keep)
echo "[trainer_1b_gpu.sh] $((SECONDS - t0))s; files in $out: $(ls "$out" | tr '\n' ' ')"
