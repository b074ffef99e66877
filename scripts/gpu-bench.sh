#!/usr/bin/env bash
# The one script to run on the lent GPU machine (see README "Performance"): our benchmarks and the
# PyTorch + diffusers baseline in the same call, so that every ratio compares one machine with itself.
#
#   scripts/gpu-bench.sh OUTDIR [BINARY]
#
# BINARY defaults to .bin/rfstudio.xz (a stripped, xz-compressed `cargo build --release --features cuda`
# binary carried to the machine). The baselines are read from .bin/gpu_baseline.py and
# .bin/gpu_score_baseline.py, diffusers from the wheels in .whl/ (the machine has no network).
# Writes OUTDIR/gpu-bench.json (everything, with ratios) and one log per step.
set -uo pipefail
OUT=${1:?usage: scripts/gpu-bench.sh OUTDIR [BINARY]}
BIN=${2:-}
STEPS=${RF_BENCH_STEPS:-ops,generate,score,rfft,profile,torch}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
if [ -z "$BIN" ]; then
  BIN=/tmp/rfstudio
  python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.bin/rfstudio.xz'),open('$BIN','wb'))" && chmod +x "$BIN"
fi
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
# Device memory in use, sampled every 100 ms, with the step that was running.
echo idle > /tmp/rf-step
( while true; do echo "$(cat /tmp/rf-step),$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null)"; sleep 0.1; done ) > "$OUT/mem.csv" &
MEMPID=$!
step() { # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "$name" > /tmp/rf-step
  local s=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N)-$s,1))") s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}
G="--device cuda --json"
if has ops; then
  step ops_f16 120 "$BIN" bench ops $G --dtype f16
  step ops_f32 120 "$BIN" bench ops $G --dtype f32
  # Does a wider autotune search (more matmul/conv kernels benchmarked) find faster kernels?
  CUBECL_AUTOTUNE_LEVEL=full step ops_f16_tunefull 180 "$BIN" bench ops $G --dtype f16
fi
if has generate; then
  step generate_f16_fused 240 "$BIN" bench generate $G --dtype f16 --size sd15 --random-weights --batches 1,4
  RFSTUDIO_ATTENTION=matmul step generate_f16_matmul 240 "$BIN" bench generate $G --dtype f16 --size sd15 --random-weights --batches 1,4
fi
if has score; then
  step score_f16 180 "$BIN" bench score $G --dtype f16 --u2net
fi
if has rfft && "$BIN" bench rfft --help > /dev/null 2>&1; then
  step rfft_bf16 300 "$BIN" bench rfft $G --dtype bf16 --size sd15 --random-weights --reg cc --iters 3
fi
if has profile; then
  # Per-kernel times of a short generation (cubecl's profiler syncs after every kernel).
  CUBECL_DEBUG_LOG="$OUT/profile.log" CUBECL_DEBUG_OPTION=profile \
    step profile_f16 180 "$BIN" bench generate $G --dtype f16 --size sd15 --random-weights --batches 1 --steps 2 --iters 1
  [ -f "$OUT/profile.log" ] && xz -T4 -f "$OUT/profile.log"
fi
if has torch; then
  echo torch > /tmp/rf-step
  SITE=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .whl/*.whl > "$OUT/pip.log" 2>&1
  OUT="$OUT" PYTHONPATH=$SITE PYTHONUNBUFFERED=1 timeout 300 python3 .bin/gpu_baseline.py > "$OUT/torch.log" 2>&1; echo "torch rc=$?" | tee -a "$OUT/steps.txt"
  OUT="$OUT" PYTHONPATH=$SITE PYTHONUNBUFFERED=1 timeout 180 python3 .bin/gpu_score_baseline.py > "$OUT/torch_score.log" 2>&1; echo "torch_score rc=$?" | tee -a "$OUT/steps.txt"
fi
kill $MEMPID 2>/dev/null
python3 "$(dirname "$0")/gpu_bench_report.py" "$OUT" | tee "$OUT/table.md"
