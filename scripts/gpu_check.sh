#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (issue "GPU pass"): build for sm_90, run
# the GPU tests, the kernel and end-to-end benchmarks, keep every log in one
# tarball under $OUT and print a short table last.
#
#   bash scripts/gpu_check.sh              # everything, sized to end inside ~9.5 min
#   E2E_SKIP=compile,autotune bash ...     # row families to leave out of bench e2e (default below)
#
# Every step has its own timeout so the whole run fits one 600 s device command;
# a step that times out is reported and the next one still runs.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
LOG=$(mktemp -d)/gpu-logs   # logs land here; $OUT gets one tarball + the summary (few files come back)
mkdir -p "$OUT" "$LOG"
trap 'tar czf "$OUT/gpu-logs.tgz" -C "$(dirname "$LOG")" gpu-logs' EXIT
export PYTHONUNBUFFERED=1 DEVIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# torch.compile baselines of ViT-L take minutes; ANCHORS.md has them measured.
export DEVIT_E2E_SKIP=${E2E_SKIP:-compile,autotune} DEVIT_E2E_BATCHES=${E2E_BATCHES:-1,64,256}
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG/gpu.txt"

step "build (sm_90; nvcc resource report in build.log)"
DEVIT_CUDA=1 DEVIT_CUDA_ARCHS=90 MAX_JOBS=16 CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-Xptxas=-v" \
  timeout 150 python3 -m pip install -v --no-build-isolation --no-deps . >"$LOG/build.log" 2>&1 \
  || { tail -40 "$LOG/build.log"; exit 1; }
# -P: do not put the checkout first on sys.path, import the installed package
python3 -P -c "import devit_ext, json; print(json.dumps(devit_ext.build_info()))" | tee "$LOG/build_info.json"
so=$(python3 -P -c "import devit_ext._C as c; print(c.__file__)")
cuobjdump -res-usage "$so" >"$LOG/res_usage.txt" 2>&1 || true

step "GPU tests (cuda + triton markers, compiled Triton)"
timeout 170 python3 -P -m pytest python_tests -q -m "cuda or triton" -p no:cacheprovider 2>&1 \
  | tee "$LOG/tests_gpu.log" | tail -15

step "bench static (sm_90, quick: the launchers' picks compiled by this machine's Triton; checks in static.log)"
# The full run (every shape and dtype, both archs) is the CI/CPU one; here the device's own Triton and
# ptxas confirm the quick picks. rc 1 = a check failed (listed at the end of static.log), 124 = timeout.
env -u TRITON_INTERPRET timeout 45 devit-ext bench static --arch 90 --quick --json "$LOG/static.json" \
  >"$LOG/static.log" 2>&1; echo "rc=$?"; grep -E "^(checks|CHECKS|  [a-z_]+: )" "$LOG/static.log" | tail -8

step "bench host (the sender's host path per block on this server's CPU; target 30 us at zero rows)"
timeout 25 devit-ext bench host --out "$LOG/bench" >"$LOG/bench_host.log" 2>&1; echo "rc=$?"
grep -E "yardstick|per block" "$LOG/bench_host.log" | sed 's/   */ | /g'

step "bench kernels"
timeout 130 devit-ext bench kernels --device cuda --out "$LOG/bench" >"$LOG/bench_kernels.log" 2>&1; echo "rc=$?"
step "bench e2e (skip: $DEVIT_E2E_SKIP, batches $DEVIT_E2E_BATCHES)"
timeout 170 devit-ext bench e2e --device cuda --out "$LOG/bench" >"$LOG/bench_e2e.log" 2>&1; echo "rc=$?"

step "summary"
python3 -P scripts/summarize_bench.py "$LOG/bench" 2>&1 | tee "$OUT/summary.txt"
step "done"
