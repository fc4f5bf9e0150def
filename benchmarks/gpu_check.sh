#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): build, smoke-check each backend, the suite at bf16, the GPU tests, a
# short training run, inside one time budget.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run        # here, on CPU, tiny shapes, no build
#
# Options: --dry-run (same as --device cpu), --no-build, --no-tests, --no-train.
# Time: GC_TOTAL_S=500 is the whole script's budget (seconds); each stage gets at most its own limit and what is
# left of the budget, and a stage with under 20 s left is skipped and says so. Stage limits (env):
# GC_BUILD_S=150 GC_SMOKE_S=120 (per backend) GC_SUITE_S=210 GC_TEST_S=150 GC_TRAIN_S=45.
#
# Packages the GPU machines may lack (no package registry there): put wheels in .whl/ (ignored by git) and name
# ".whl" in the device call's `carry`:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl nvidia-cutlass==4.2.0.0 setuptools pytest pluggy iniconfig \
#         pygments hypothesis sortedcontainers peft
# Stage 0 installs (into a temporary --target folder on PYTHONPATH) only the carried wheels whose module does not
# import already; the nvidia-cutlass wheel is unzipped instead and LORA_FUSED_CUTLASS_DIR points at it.
#
# Stages:
#   1. build the CUDA extension in place, in the background: LORA_FUSED_FORCE_CUDA=1 LORA_FUSED_CUDA_ARCHS=90a
#      setup.py build_ext --inplace (a failure is tolerated: the CUDA rows are then absent and the summary says why)
#   2. benchmarks/gpu_smoke.py per backend (Triton during the build, CUDA after it), each in its own process under
#      a limit: bf16 outputs and gradients vs float64; only backends that pass are timed and tested (a kernel that
#      hangs costs GC_SMOKE_S, not the run); then python -m lora_fused.info -> info.txt
#   3. python -m benchmarks at bf16, the headline settings: llm_16k (16384x4096->4096), ViT-B qkv, SAM ViT-H qkv;
#      r=16; p 0 and 0.1; fwd and fwd+bwd; floor, plain, PEFT (when it imports) and each passing backend; the
#      host-overhead table (5 rounds x 200 calls). Partial results are written after each shape.
#      then benchmarks/host_profile.py: cProfile of a tiny training step per backend (where host time goes) and
#      benchmarks/kernel_times.py: the GPU kernels of a headline training step per method (where GPU time goes)
#   4. python -m pytest -m gpu, one process per test file under the time left (the CUDA backend's tests only when
#      its smoke check passed); each failure's traceback is printed as it happens
#   5. benchmarks/train_vit.py --steps 30 (PEFT vs lora_fused on a ViT-Tiny, q/v adapters, peak memory)
# Everything lands in benchmarks/results/<device-name>-<date>/; when $OUT is set (the device tool) the folder is
# packed into $OUT/gpu_check.tar.gz, with results.md and gpu_check.log beside it. The last lines printed are the
# stage summary and the suite's markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0; BUILD=1; TESTS=1; TRAIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --device) shift; [ "${1:-}" = "cpu" ] && DRY=1 ;;
    --device=cpu) DRY=1 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-train) TRAIN=0 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
GC_TOTAL_S=${GC_TOTAL_S:-500}
GC_BUILD_S=${GC_BUILD_S:-150}
GC_SMOKE_S=${GC_SMOKE_S:-120}
GC_SUITE_S=${GC_SUITE_S:-210}
GC_TEST_S=${GC_TEST_S:-150}
GC_TRAIN_S=${GC_TRAIN_S:-45}
T0=$(date +%s)
DEADLINE=$(( T0 + GC_TOTAL_S ))
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  BUILD=0
  DEVICE=cpu
  TAG="cpu-dryrun"
  SMOKE_BACKENDS=(torch)
  SMOKE_ARGS=(--device cpu --tiny)
  SUITE_ARGS=(--device cpu --dtype fp32 --shapes tiny --quick --rank 16 --dropout 0,0.1 --modes fwd,fwd+bwd
              --host-overhead --host-rounds 2 --host-calls 20)
  TRAIN_ARGS=(--device cpu --steps 3 --batch 2 --image-size 32 --model mini)
else
  DEVICE=cuda
  TAG=$($PY -c "import torch,re; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-') if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown-device)
  SMOKE_BACKENDS=(triton cuda)
  SMOKE_ARGS=()
  SUITE_ARGS=(--device cuda --dtype bf16 --shapes headline --rank 16 --dropout 0,0.1 --modes fwd,fwd+bwd
              --host-overhead --host-rounds 5 --host-calls 200)
  TRAIN_ARGS=(--device cuda --steps 30 --batch 64 --image-size 224)
fi
STAMP=$(date -u +%Y-%m-%d-%H%M)
RES="benchmarks/results/${TAG}-${STAMP}"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
STATUS=()
# limit_for STAGE_LIMIT: seconds this stage may run (its limit, or what is left of the budget less 10 s).
limit_for() {
  local left=$(( DEADLINE - $(date +%s) - 10 ))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

log "device=$DEVICE tag=$TAG dry_run=$DRY python=$($PY -c 'import sys; print(sys.executable)') results=$RES budget=${GC_TOTAL_S}s"
{ date -u; uname -a; nproc; } > "$RES/machine.txt" 2>&1
command -v nvidia-smi >/dev/null && nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
if [ -z "${LORA_FUSED_COMMIT:-}" ]; then
  LORA_FUSED_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  export LORA_FUSED_COMMIT
fi
log "commit $LORA_FUSED_COMMIT"

# 0. carried wheels -----------------------------------------------------------------------------------------------
SITE=""
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  NEED=()
  for w in .whl/*.whl; do
    dist=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    case "$dist" in nvidia_cutlass) continue ;; esac
    $PY -c "import $dist" 2>/dev/null || NEED+=("$w")
  done
  if [ ${#NEED[@]} -gt 0 ]; then
    SITE=$(mktemp -d)
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${NEED[@]}" \
         >> "$LOG" 2>&1; then
      log "installed from .whl into $SITE: $(for w in "${NEED[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    else
      log "pip could not install the carried wheels (see the log above)"
    fi
  fi
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# 1. build --------------------------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  if [ -z "${LORA_FUSED_CUTLASS_DIR:-}" ] && \
     ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
    CUTLASS_WHEEL=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
    if [ -n "$CUTLASS_WHEEL" ]; then
      CUTLASS_TMP=$(mktemp -d)
      if $PY -m zipfile -e "$CUTLASS_WHEEL" "$CUTLASS_TMP"; then
        export LORA_FUSED_CUTLASS_DIR="$CUTLASS_TMP"
        log "CUTLASS headers from the carried wheel $CUTLASS_WHEEL"
      else
        log "could not unzip $CUTLASS_WHEEL"
      fi
    else
      log "no CUTLASS headers here: carry the nvidia-cutlass wheel in .whl/ (see the top of this script)"
    fi
  fi
  L=$(limit_for "$GC_BUILD_S")
  log "building the CUDA extension in place, in the background (limit ${L}s)"
  TB=$(date +%s)
  timeout "$L" env LORA_FUSED_FORCE_CUDA=1 LORA_FUSED_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace > "$RES/build.log" 2>&1 &
  BUILD_PID=$!
fi

# 2a. smoke checks: Triton's while the extension builds -----------------------------------------------------------
BACKENDS=(torch)
CUDA_OK=0
smoke() {  # smoke BACKEND: gpu_smoke.py in its own process under a limit; a pass adds BACKEND to the timed ones
  local b=$1 L rc
  L=$(limit_for "$GC_SMOKE_S")
  if [ "$L" -lt 20 ]; then STATUS+=("smoke $b: skipped (time)"); return; fi
  log "smoke check: $b (limit ${L}s)"
  timeout "$L" $PY benchmarks/gpu_smoke.py --backend "$b" "${SMOKE_ARGS[@]}" > "$RES/smoke_$b.log" 2>&1
  rc=$?
  tee -a "$LOG" < "$RES/smoke_$b.log" | grep -E "FAIL|PASS|unavailable" || true
  if [ $rc -eq 0 ]; then
    [ "$b" != torch ] && BACKENDS+=("$b")
    [ "$b" = cuda ] && CUDA_OK=1
    STATUS+=("smoke $b: pass")
  else
    STATUS+=("smoke $b: rc=$rc ($(tail -n 1 "$RES/smoke_$b.log"))")
  fi
}
for b in "${SMOKE_BACKENDS[@]}"; do
  [ "$b" != cuda ] && smoke "$b"
done

if [ "$BUILD" = 1 ]; then
  wait "$BUILD_PID"
  rc=$?
  if [ $rc -eq 0 ]; then
    STATUS+=("build: ok in $(( $(date +%s) - TB ))s")
    log "build ok"
  else
    log "build failed or timed out (rc=$rc); continuing without it (tail of build.log follows)"
    tail -n 15 "$RES/build.log" | tee -a "$LOG"
    STATUS+=("build: FAILED rc=$rc after $(( $(date +%s) - TB ))s (see build.log)")
  fi
else
  STATUS+=("build: skipped")
fi

# 2b. info, then the CUDA extension's smoke check ----------------------------------------------------------------
timeout 60 $PY -m lora_fused.info > "$RES/info.txt" 2>&1 || log "lora_fused.info failed"
tee -a "$LOG" < "$RES/info.txt"

for b in "${SMOKE_BACKENDS[@]}"; do
  [ "$b" = cuda ] && smoke "$b"
done
BACKEND_LIST=$(IFS=,; echo "${BACKENDS[*]}")

# 3. the suite ----------------------------------------------------------------------------------------------------
L=$(limit_for "$GC_SUITE_S")
if [ "$L" -ge 20 ]; then
  log "benchmark suite: ${SUITE_ARGS[*]} --backends $BACKEND_LIST (limit ${L}s)"
  timeout "$L" $PY -m benchmarks "${SUITE_ARGS[@]}" --backends "$BACKEND_LIST" --out "$RES/suite" --no-progress \
    > "$RES/suite.log" 2>&1
  rc=$?
  STATUS+=("suite: rc=$rc ($(grep -c '^\[benchmarks\]' "$RES/suite.log") stages done)")
  [ $rc -ne 0 ] && { log "suite failed (rc=$rc); tail:"; tail -n 25 "$RES/suite.log" | tee -a "$LOG"; }
else
  STATUS+=("suite: skipped (time)")
fi

# 3b. where a tiny step's host time goes, per backend (cProfile) ----------------------------------------------------
L=$(limit_for 60)
if [ "$L" -ge 20 ]; then
  timeout "$L" $PY -m benchmarks.host_profile --device "$DEVICE" --backends "$BACKEND_LIST" --steps 300 \
    --out "$RES/host_profile" > "$RES/host_profile.log" 2>&1
  STATUS+=("host_profile: rc=$? ($(grep -h '^## backend' "$RES"/host_profile/*.txt 2>/dev/null | sed 's/^## backend //' | tr '\n' ';'))")
fi

# 3c. which kernels hold a headline step's time, per method (torch.profiler) ---------------------------------------
L=$(limit_for 90)
KT_BACKENDS=$(IFS=,; echo "${BACKENDS[*]:1}")
if [ "$L" -ge 20 ] && { [ -n "$KT_BACKENDS" ] || [ "$DRY" = 1 ]; }; then
  KT_ARGS=(--shape 16384x4096x4096 --backends "$KT_BACKENDS")
  [ "$DRY" = 1 ] && KT_ARGS=(--device cpu --shape 64x32x48 --backends torch)
  timeout "$L" $PY -m benchmarks.kernel_times "${KT_ARGS[@]}" --p 0.1 --out "$RES/kernel_times" \
    > "$RES/kernel_times.log" 2>&1
  STATUS+=("kernel_times: rc=$? ($(grep -h '^## ' "$RES"/kernel_times/kernel_times.md 2>/dev/null | sed 's/^## //; s/ of kernel time per step//' | tr '\n' ';'))")
fi

# 4. GPU tests ----------------------------------------------------------------------------------------------------
# One pytest process per file (each under its share of what is left), quickest and most telling first, each
# failure's traceback printed as it happens (LORA_FUSED_PRINT_FAILURES): a cut run still says what failed and why.
run_pytest() {  # run_pytest NAME LIMIT ARGS...
  local name=$1 cap=$2; shift 2
  local L; L=$(limit_for "$cap")
  if [ "$L" -lt 15 ]; then STATUS+=("pytest $name: skipped (time)"); return; fi
  timeout "$L" env LORA_FUSED_PRINT_FAILURES=1 $PY -m pytest -p no:cacheprovider -q -rfE --tb=short "$@" \
    > "$RES/pytest_$name.log" 2>&1
  local rc=$?
  grep -E "^=== FAILED" "$RES/pytest_$name.log" | head -n 20 | tee -a "$LOG"
  STATUS+=("pytest $name: rc=$rc$([ $rc -eq 124 ] && echo ' (time limit)') ($(tail -n 1 "$RES/pytest_$name.log"))")
}
if [ "$TESTS" = 1 ]; then
  TEST_END=$(( $(date +%s) + GC_TEST_S ))
  log "pytest -m gpu, file by file (limit ${GC_TEST_S}s in all)"
  NOCUDA=()
  [ "$CUDA_OK" = 1 ] || NOCUDA=(-k "not cuda-cuda and not -cuda]")  # the extension failed its smoke check
  for f in tests/test_cuda_graphs.py tests/test_model_peft.py tests/test_modules.py tests/test_hardening.py \
           tests/test_triton_gpu.py tests/test_cuda_backend.py tests/test_saved_memory_backends.py; do
    name=$(basename "$f" .py); name=${name#test_}
    if [ "$name" = cuda_backend ] && [ "$CUDA_OK" != 1 ]; then
      STATUS+=("pytest cuda_backend: skipped (no passing CUDA extension)"); continue
    fi
    left=$(( TEST_END - $(date +%s) ))
    run_pytest "$name" "$left" -m gpu "$f" "${NOCUDA[@]}"
  done
else
  STATUS+=("pytest: skipped")
fi

# 5. training example ---------------------------------------------------------------------------------------------
L=$(limit_for "$GC_TRAIN_S")
if [ "$TRAIN" = 1 ] && [ "$L" -ge 30 ]; then
  log "train_vit: ${TRAIN_ARGS[*]} (limit ${L}s)"
  timeout "$L" $PY benchmarks/train_vit.py "${TRAIN_ARGS[@]}" --out "$RES/train" > "$RES/train.log" 2>&1
  rc=$?
  STATUS+=("train_vit: rc=$rc")
  tail -n 8 "$RES/train.log" | tee -a "$LOG"
else
  STATUS+=("train_vit: skipped")
fi

# summary ---------------------------------------------------------------------------------------------------------
log "done in $(( $(date +%s) - T0 ))s; results in $RES"
printf '  %s\n' "${STATUS[@]}" | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  tar czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" && cp "$LOG" "$OUT/"
  [ -f "$RES/suite/results.md" ] && cp "$RES/suite/results.md" "$OUT/"
fi
if [ -f "$RES/suite/results.md" ]; then
  echo
  grep -v '^$' "$RES/suite/results.md"
fi
exit 0
