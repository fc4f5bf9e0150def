#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): build, GPU tests, the suite at bf16, a short training run.
#
#   LORA_FUSED_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh     # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                                          # here, on CPU, tiny shapes
#
# Options: --dry-run (same as --device cpu: CPU, tiny shapes, no build), --no-build, --no-tests, --no-train.
# Stage time limits (seconds, env): GC_BUILD_S=240 GC_TEST_S=90 GC_SUITE_S=210 GC_TRAIN_S=45 (worst case 9.8 min;
# expected well under that on an H100). Each stage may fail or time out: the script logs it and goes on.
#
# CUTLASS on the GPU machines (no package registry there): the build needs the nvidia-cutlass headers. Carry the
# wheel (pure Python, ~6 MB) from here:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0
# and name ".whl" in the device call's `carry`. Stage 1 unzips .whl/nvidia_cutlass-*.whl into a temporary folder
# and points LORA_FUSED_CUTLASS_DIR at it (nothing is installed); an installed nvidia-cutlass or a
# LORA_FUSED_CUTLASS_DIR set by the caller (a CUTLASS checkout) is used as it is.
#
# Stages:
#   1. build the CUDA extension: LORA_FUSED_FORCE_CUDA=1 LORA_FUSED_CUDA_ARCHS=90a pip install --no-build-isolation
#      --no-deps -e .   (no package registry on the GPU machines, hence --no-deps; a failure is tolerated)
#   2. python -m lora_fused.info  -> info.txt
#   3. python -m pytest -m gpu -q  (skip-safe where no GPU)
#   4. python -m benchmarks at bf16, the headline settings: M=16384 K=N=4096 (llm_16k), ViT-B qkv, SAM ViT-H qkv;
#      r=16; p 0 and 0.1; fwd and fwd+bwd; every lora_fused backend that runs there (torch, triton, cuda).
#      PEFT rows run when peft imports (the workplace's GPU image has peft); otherwise the suite leaves them out
#      and says so in its notes — nothing is installed.
#   5. benchmarks/train_vit.py --steps 30 (PEFT vs lora_fused on a ViT-Tiny, q/v adapters, peak memory).
# Everything lands in benchmarks/results/<device-name>-<date>/ and, when $OUT is set (the device tool), is copied
# to $OUT/ too. The last lines printed are the suite's markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0; BUILD=1; TESTS=1; TRAIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --device) shift; [ "${1:-}" = "cpu" ] && DRY=1 ;;
    --device=cpu) DRY=1 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-train) TRAIN=0 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
GC_BUILD_S=${GC_BUILD_S:-240}
GC_TEST_S=${GC_TEST_S:-90}
GC_SUITE_S=${GC_SUITE_S:-210}
GC_TRAIN_S=${GC_TRAIN_S:-45}

if [ "$DRY" = 1 ]; then
  BUILD=0
  DEVICE=cpu
  TAG="cpu-dryrun"
  SUITE_ARGS=(--device cpu --dtype fp32 --shapes tiny --quick --rank 16 --dropout 0,0.1 --modes fwd,fwd+bwd)
  TRAIN_ARGS=(--device cpu --steps 3 --batch 2 --image-size 32 --model mini)
else
  DEVICE=cuda
  TAG=$($PY -c "import torch,re; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-') if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown-device)
  SUITE_ARGS=(--device cuda --dtype bf16 --shapes headline --rank 16 --dropout 0,0.1 --modes fwd,fwd+bwd)
  TRAIN_ARGS=(--device cuda --steps 30 --batch 64 --image-size 224)
fi
STAMP=$(date -u +%Y-%m-%d-%H%M)
RES="benchmarks/results/${TAG}-${STAMP}"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
STATUS=()

log "device=$DEVICE tag=$TAG dry_run=$DRY python=$($PY -c 'import sys; print(sys.executable)') results=$RES"
{ date -u; uname -a; } > "$RES/machine.txt" 2>&1
command -v nvidia-smi >/dev/null && nvidia-smi > "$RES/nvidia-smi.txt" 2>&1
if [ -z "${LORA_FUSED_COMMIT:-}" ]; then
  LORA_FUSED_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  export LORA_FUSED_COMMIT
fi
log "commit $LORA_FUSED_COMMIT"

# 1. build --------------------------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  if [ -z "${LORA_FUSED_CUTLASS_DIR:-}" ] && \
     ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
    CUTLASS_WHEEL=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
    if [ -n "$CUTLASS_WHEEL" ]; then
      CUTLASS_TMP=$(mktemp -d)
      if $PY -m zipfile -e "$CUTLASS_WHEEL" "$CUTLASS_TMP"; then
        export LORA_FUSED_CUTLASS_DIR="$CUTLASS_TMP"
        log "CUTLASS headers from the carried wheel $CUTLASS_WHEEL (LORA_FUSED_CUTLASS_DIR=$CUTLASS_TMP)"
      else
        log "could not unzip $CUTLASS_WHEEL"
      fi
    else
      log "no CUTLASS headers here: carry the nvidia-cutlass wheel in .whl/ (see the top of this script)"
    fi
  fi
  log "building the CUDA extension (limit ${GC_BUILD_S}s)"
  TB=$(date +%s)
  if timeout "$GC_BUILD_S" env LORA_FUSED_FORCE_CUDA=1 LORA_FUSED_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-16} \
       $PY -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1; then
    STATUS+=("build: ok (pip install -e .)")
  elif [ $(( $(date +%s) - TB )) -lt 30 ] && ! grep -q "nvcc" "$RES/build.log"; then
    # pip gave up before compiling anything (e.g. no PEP 660 editable support): build in place instead.
    log "pip install failed before compiling; trying setup.py build_ext --inplace"
    if timeout "$GC_BUILD_S" env LORA_FUSED_FORCE_CUDA=1 LORA_FUSED_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-16} \
         $PY setup.py build_ext --inplace >> "$RES/build.log" 2>&1; then
      STATUS+=("build: ok (setup.py build_ext --inplace)")
    else
      rc=$?
      log "build failed (rc=$rc); continuing without it"
      tail -n 15 "$RES/build.log" | tee -a "$LOG"
      STATUS+=("build: FAILED rc=$rc (see build.log)")
    fi
  else
    rc=$?
    log "build failed or timed out (rc=$rc); continuing without it (tail of build.log follows)"
    tail -n 15 "$RES/build.log" | tee -a "$LOG"
    STATUS+=("build: FAILED rc=$rc (see build.log)")
  fi
else
  STATUS+=("build: skipped")
fi

# 2. info ---------------------------------------------------------------------------------------------------------
$PY -m lora_fused.info > "$RES/info.txt" 2>&1 || log "lora_fused.info failed"
cat "$RES/info.txt" | tee -a "$LOG"

# 3. GPU tests ----------------------------------------------------------------------------------------------------
if [ "$TESTS" = 1 ]; then
  log "pytest -m gpu (limit ${GC_TEST_S}s)"
  timeout "$GC_TEST_S" $PY -m pytest -m gpu -q -p no:cacheprovider > "$RES/pytest_gpu.log" 2>&1
  rc=$?
  tail -n 5 "$RES/pytest_gpu.log" | tee -a "$LOG"
  # rc 5: no tests collected (fine); 124: timed out.
  STATUS+=("pytest -m gpu: rc=$rc ($(tail -n 1 "$RES/pytest_gpu.log"))")
else
  STATUS+=("pytest -m gpu: skipped")
fi

# 4. the suite ----------------------------------------------------------------------------------------------------
log "benchmark suite: ${SUITE_ARGS[*]} (limit ${GC_SUITE_S}s)"
timeout "$GC_SUITE_S" $PY -m benchmarks "${SUITE_ARGS[@]}" --out "$RES/suite" --no-progress > "$RES/suite.log" 2>&1
rc=$?
STATUS+=("suite: rc=$rc")
[ $rc -ne 0 ] && { log "suite failed (rc=$rc); tail:"; tail -n 25 "$RES/suite.log" | tee -a "$LOG"; }

# 5. training example ---------------------------------------------------------------------------------------------
if [ "$TRAIN" = 1 ]; then
  log "train_vit: ${TRAIN_ARGS[*]} (limit ${GC_TRAIN_S}s)"
  timeout "$GC_TRAIN_S" $PY benchmarks/train_vit.py "${TRAIN_ARGS[@]}" --out "$RES/train" > "$RES/train.log" 2>&1
  rc=$?
  STATUS+=("train_vit: rc=$rc")
  tail -n 8 "$RES/train.log" | tee -a "$LOG"
else
  STATUS+=("train_vit: skipped")
fi

# summary ---------------------------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp -r "$RES" "$OUT/" && log "copied to $OUT/$(basename "$RES")"
fi
log "done in $(( $(date +%s) - T0 ))s; results in $RES"
printf '  %s\n' "${STATUS[@]}" | tee -a "$LOG"
if [ -f "$RES/suite/results.md" ]; then
  echo
  grep -v '^$' "$RES/suite/results.md"
fi
exit 0
