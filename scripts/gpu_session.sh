#!/usr/bin/env bash
# One device command per step of the GPU session (lent H100 or H200, CUDA vLLM 0.26.0; issues 34 and 35).
#
#   bash scripts/gpu_session.sh STEP [STEP ...]        run from the repository root on the device machine
#
# Steps (each ends in < 9 min: a `timeout` around every script, and each script has its own time budget and
# rewrites its JSON as it goes; logs and results go to $OUT, at most 8 files):
#   parts          copy the carried vLLM pieces (.device/vllm/part*) to /root/vparts (one piece per call: the
#                  working tree plus a piece must stay under 64 MiB; ../shared/tools/device-vllm/README.md)
#   setup          parts, then unpack vLLM into /root/site (once per machine), install this repo's entry point
#                  into /root/plug (pip --no-deps --target, no network), print versions and the GPU  (< 1 min)
#   smem           Triton fallback kernels: shared memory per program compiled for this GPU's arch
#                  (scripts/check_triton_smem.py) and live checks against the naive references at fp32 and
#                  bf16 (scripts/bench_triton_gpu.py --checks-only)                                    (1-3 min)
#   mtp            scripts/check_mtp_gpu.py: greedy tokens with == without MTP speculation, acceptance rate,
#                  all-F, vLLM alone (the control), FSFS (6 engines; MTP_BUDGET=560 for all six: run it as
#                  bg-mtp then, a foreground step must end inside one 600 s device call: MTP_BUDGET <= 500)
#   search         scripts/search_gpu.py: 61 layers of V3.2 geometry to 1/4 through vLLM's native kernels,
#                  budget 440 s from the script's start; seconds per evaluation, projected total      (7.5-8.5 min)
#   search-triton  the same on the plugin's Triton fallback (VLLM_INDEXCACHE_KERNELS=triton), budget 360 s
#   v4parts        copy the carried V4 extras piece(s) (.device/v4extras/part*: TileLang, CUTLASS DSL, quack, ...;
#                  scripts/pack_v4_device_extras.py) to /root/v4parts and, once all three are there, unpack them
#                  into /root/site
#   bg-v4          start scripts/bench_v4_gpu.py in the background (setsid; log and results in /root/res/v4,
#                  engine logs in /tmp/bench-v4-logs); V4_ARGS adds arguments, V4_BUDGET (default 900) its budget
#   bg-mtp         start the mtp step in the background (log and JSON in /root/res/mtp); MTP_ARGS adds arguments
#   poll           tail of the background logs; copies /root/res and the engine logs to $OUT as one .tgz
#
# Environment: OUT (default ./out), PYTHON (default python3), SEARCH_BUDGET / MTP_BUDGET (seconds) override the
# budgets. Code runs from this working tree (PYTHONPATH=$PWD first); /root/plug only supplies the plugin's entry
# point (vllm.general_plugins) to vLLM's processes.
set -uo pipefail

if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then   # the header comment above, before $OUT is made
  sed -n '2,/^set -uo pipefail$/p' "$0" | sed '$d'
  [ $# -eq 0 ] && exit 2 || exit 0
fi
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/root/site:/root/plug${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export VLLM_ALLOW_INSECURE_SERIALIZATION=1   # LLM.apply_model / collective_rpc with functions (search, MTP)

log() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }

parts() {
  mkdir -p /root/vparts
  local n=0
  for p in .device/vllm/part*; do
    [ -f "$p" ] || continue
    cp "$p" /root/vparts/ && n=$((n + 1))
  done
  log "carried pieces copied: $n; /root/vparts now holds: $(ls /root/vparts 2>/dev/null | tr '\n' ' ')"
}

setup() {
  parts
  if [ ! -f /root/site/vllm/__init__.py ]; then
    if ! ls /root/vparts/part* >/dev/null 2>&1; then
      log "no vLLM: carry .device/vllm/part0, part1, part2 in three calls of 'parts' (and 'setup' in the last)"
      return 2
    fi
    log "unpacking vLLM into /root/site"
    mkdir -p /root/site && cat /root/vparts/part* | xz -d -T0 | tar -x -C /root/site || return 2
  fi
  if ! ls -d /root/plug/vllm_indexcache*.dist-info >/dev/null 2>&1; then
    log "installing the plugin's entry point into /root/plug"
    $PY -m pip install -q --no-deps --no-build-isolation --no-index --target /root/plug . || return 2
  fi
  $PY - <<'EOF'
import importlib.metadata as md, torch, triton, transformers, vllm
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
print(f"vllm {vllm.__version__} ({vllm.__file__}), torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}; plugins {eps}")
print("GPU:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import vllm_indexcache
print("vllm_indexcache from", vllm_indexcache.__file__)
EOF
}

smem() {
  local arch limit
  arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(0); print(c[0] * 10 + c[1])")
  limit=$($PY -c "
import triton
try:
    print(triton.runtime.driver.active.utils.get_device_properties(0)['max_shared_mem'])
except Exception:
    print(232448)")
  log "check_triton_smem: sm_$arch, limit $limit B (from the driver)"
  timeout -k 10 300 $PY scripts/check_triton_smem.py --arch "$arch" --limit "$limit" --also-bf16-tile
  log "check_triton_smem rc=$?"
  timeout -k 10 200 $PY scripts/bench_triton_gpu.py --checks-only --out "$OUT"
  log "bench_triton_gpu --checks-only rc=$?"
}

mtp() {
  local budget=${MTP_BUDGET:-440}
  # shellcheck disable=SC2086  # MTP_ARGS is a list of arguments
  timeout -k 15 $((budget + 80)) $PY scripts/check_mtp_gpu.py --out "$OUT/check_mtp_gpu.json" --budget "$budget" \
    --timeout 300 ${MTP_ARGS:-}
  log "check_mtp_gpu rc=$?"
}

search() {
  timeout -k 20 520 $PY scripts/search_gpu.py --out "$OUT" --kernels "${1:-auto}" --budget "${SEARCH_BUDGET:-${2:-440}}"
  log "search_gpu (${1:-auto}) rc=$?"
}

v4parts() {
  mkdir -p /root/v4parts
  cp .device/v4extras/part* /root/v4parts/ 2>/dev/null
  log "/root/v4parts holds: $(ls /root/v4parts | tr '\n' ' ')"
  if [ "$(ls /root/v4parts | wc -l)" -ge 3 ] && [ ! -f /root/v4parts/.unpacked ]; then
    mkdir -p /root/site && cat /root/v4parts/part* | xz -d -T0 | tar -x -C /root/site && touch /root/v4parts/.unpacked
    log "V4 extras unpacked into /root/site"
  fi
}

bg_v4() {
  mkdir -p /root/res/v4
  # shellcheck disable=SC2086
  PYTHONPATH="$PYTHONPATH:/root/site/nvidia_cutlass_dsl/dsl_packages" setsid nohup timeout -k 20 \
    $((${V4_BUDGET:-900} + 120)) $PY scripts/bench_v4_gpu.py --out /root/res/v4 --budget-s "${V4_BUDGET:-900}" \
    ${V4_ARGS:-} > /root/res/v4/bench.log 2>&1 < /dev/null &
  log "bench_v4_gpu started in the background (pid $!)"
}

bg_mtp() {
  mkdir -p /root/res/mtp
  OUT=/root/res/mtp setsid nohup bash "$0" mtp > /root/res/mtp/run.log 2>&1 < /dev/null &
  log "check_mtp_gpu started in the background (pid $!)"
}

poll() {
  for f in /root/res/v4/bench.log /root/res/mtp/run.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n "${POLL_LINES:-15}" "$f"; }
  done
  ls -t /tmp/bench-v4-logs/*.log 2>/dev/null | head -1 | while read -r f; do
    echo "== $f"; tail -n 4 "$f" | cut -c1-300
  done
  tar -czf "$OUT/res.tgz" -C / root/res $(cd / && ls -d tmp/bench-v4-logs 2>/dev/null) 2>/dev/null
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}

for step in "$@"; do
  log "step $step (OUT=$OUT)"
  case "$step" in
    parts) parts ;;
    setup) setup || exit $? ;;
    smem) smem 2>&1 | tee "$OUT/smem.log" ;;
    mtp) mtp 2>&1 | tee "$OUT/mtp.log" ;;
    search) search auto 2>&1 | tee "$OUT/search.log" ;;
    search-triton) search triton 360 2>&1 | tee "$OUT/search-triton.log" ;;
    v4parts) v4parts ;;
    bg-v4) bg_v4 ;;
    bg-mtp) bg_mtp ;;
    poll) poll ;;
    *) echo "unknown step '$step' (parts, setup, smem, mtp, search, search-triton, v4parts, bg-v4, bg-mtp, poll)"
       exit 2 ;;
  esac
done
