# Sourced by the GPU scripts (quality_gpu.sh, trainer_1b_gpu.sh), from the repository root: the GPU machine has no
# network, so the packages travel as wheels in .whl/ (../shared/device/wheels.sh fills it) and are installed
# once per machine into /tmp/site; the checkout itself goes on PYTHONPATH (blockllm_scale's links to baselines/
# and benchmarks/ make the namespaced imports work without installing it).
if [ ! -d /tmp/site ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_packages.sh: installing .whl/ failed" >&2; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
