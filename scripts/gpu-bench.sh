#!/usr/bin/env bash
# The one script to run on the lent GPU machine (see README "Performance"): our benchmarks and the
# PyTorch + diffusers baseline in the same call, so that every ratio compares one machine with itself.
#
#   scripts/gpu-bench.sh OUTDIR [BINARY]
#
# BINARY defaults to .bin/rfstudio.xz (a stripped, xz-compressed `cargo build --release --features
# vulkan` binary carried to the machine: CUDA, wgpu and burn's Vulkan backend). The baselines are
# read from .bin/gpu_baseline.py and .bin/gpu_score_baseline.py, diffusers from the wheels in .whl/,
# the Vulkan loader from the .deb packages in .gl/ (the machine has no network). Carry all four:
#   run(carry=[".bin", ".whl", ".gl", ".kcache"], timeout_s=580, command="bash scripts/gpu-bench.sh $OUT")
# Writes OUTDIR/gpu-bench.json (everything, with ratios) and one log per step.
#
# Device time is short (one call of at most 10 minutes), so:
# - RF_BENCH_BUDGET (seconds, default 540) bounds the whole script: every step's time limit is cut
#   to what is left, keeping RF_BENCH_TORCH_RESERVE seconds (default 200) for the PyTorch baseline
#   until it has run; steps that no longer fit are skipped and say so in steps.txt.
# - RF_BENCH_STEPS picks and orders the steps (default: the ones the README's performance targets need first).
# - The first run on a machine spends minutes compiling (NVRTC) and autotuning kernels. The kernel
#   and autotune cache (and the CUDA driver's own cache of machine code) is kept in /tmp/rf-kernels
#   and written back as OUTDIR/kernels.tar.xz (or kernels.tar.xz.00, .01, ... when over 15 MiB);
#   carry them in .kcache/ on the next call (even in a later session: the same binary on the same
#   GPU) and that call starts with every kernel compiled and tuned.
set -uo pipefail
OUT=${1:?usage: scripts/gpu-bench.sh OUTDIR [BINARY]}
BIN=${2:-}
STEPS=${RF_BENCH_STEPS:-ops,flash4,torch,generate4,generate1,score,rfft,dp,profile,profilerfft,fused,vulkan,ops32,tunefull}
BUDGET=${RF_BENCH_BUDGET:-540}
RESERVE=${RF_BENCH_TORCH_RESERVE:-200}
START=$(date +%s)
TORCH_DONE=0
[[ ",$STEPS," == *",torch,"* ]] || TORCH_DONE=1
mkdir -p "$OUT"
export RFSTUDIO_KERNEL_CACHE=/tmp/rf-kernels
mkdir -p "$RFSTUDIO_KERNEL_CACHE"
# cubecl caches the PTX it compiled (NVRTC); the driver then compiles PTX to sm_90 machine code
# when a module loads, and keeps that in its own cache: keep it next to ours so it travels too.
export CUDA_CACHE_PATH=$RFSTUDIO_KERNEL_CACHE/nv CUDA_CACHE_MAXSIZE=4294967296
# Every autotuned shape as a line of the step's log (see step()).
export RFSTUDIO_AUTOTUNE_LOG=${RFSTUDIO_AUTOTUNE_LOG:-stderr}
# The cache travels as kernels.tar.xz, or in parts kernels.tar.xz.00, .01, ... (see the end).
KCACHE=$( [ -f .kcache/kernels.tar.xz ] && echo .kcache/kernels.tar.xz || ls .kcache/kernels.tar.xz.[0-9]* 2>/dev/null | sort)
if [ -n "$KCACHE" ]; then
  cat $KCACHE | tar -xJf - -C "$RFSTUDIO_KERNEL_CACHE" &&
    echo "kernel cache restored: $(du -sh "$RFSTUDIO_KERNEL_CACHE" | cut -f1)" | tee -a "$OUT/steps.txt"
fi
# For the Vulkan step: the loader packages carried in .gl (see the device tool's README).
if ls .gl/*.deb > /dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
if [ -z "$BIN" ]; then
  BIN=/tmp/rfstudio
  python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.bin/rfstudio.xz'),open('$BIN','wb'))" && chmod +x "$BIN"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
# Device memory in use, sampled every 100 ms, with the step that was running.
echo idle > /tmp/rf-step
( while true; do echo "$(cat /tmp/rf-step),$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null)"; sleep 0.1; done ) > "$OUT/mem.csv" &
MEMPID=$!
left() { echo $(( BUDGET - ($(date +%s) - START) - (TORCH_DONE ? 0 : RESERVE) )); }
step() { # name timeout command...
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 30 ]; then
    echo "$name skipped (budget: ${l}s left)" | tee -a "$OUT/steps.txt"
    return
  fi
  echo "$name" > /tmp/rf-step
  local s=$(date +%s.%N)
  # stderr with seconds since the step began on every line (the autotune lines among them).
  { timeout "$limit" "$@" 2>&1 1> "$OUT/$name.json" | python3 -u -c '
import sys, time
t = time.time()
for line in sys.stdin:
    sys.stdout.write(f"{time.time() - t:8.2f} {line}")' > "$OUT/$name.log"; }
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N)-$s,1))") s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}
G="--device cuda --json"
# The fastest cubek flash-attention kernel that `bench ops` (f16) found correct here ("" if none):
# the flash4 step generates with it, and the RFFT and profile steps run with it when it is set.
best_flash() {
  python3 -c "
import json, sys
try:
    lines = [l for l in open('$OUT/ops_f16.json') if l.strip().startswith('{')]
    print(json.loads(lines[-1]).get('flash_best') or '')
except Exception:
    print('')" 2>/dev/null
}
# RFSTUDIO_ATTENTION for a step: the best flash kernel when there is one, else the default (auto).
attn() { local b; b=$(best_flash); [ -n "$b" ] && echo "flash:$b" || echo auto; }
GEN="bench generate $G --dtype f16 --size sd15 --random-weights"
profile_step() { # name title timeout command...
  local name=$1 title=$2; shift 2
  RFSTUDIO_PROFILE_LOG="$OUT/$name.log.raw" step "${name}_run" "$@"
  if [ -f "$OUT/$name.log.raw" ]; then
    { echo "GPU time by kernel, $title, profiled:"; echo; echo '```'
      python3 "$(dirname "$0")/profile_summary.py" "$OUT/$name.log.raw"; echo '```'; } > "$OUT/$name.txt"
    mv "$OUT/$name.log.raw" "$OUT/$name.log" && xz -T4 -f "$OUT/$name.log"
  fi
}
torch_step() {
  echo torch > /tmp/rf-step
  TORCH_DONE=1
  local l; l=$(left)
  SITE=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .whl/*.whl > "$OUT/pip.log" 2>&1
  local t=$(( l < 300 ? l : 300 ))
  OUT="$OUT" PYTHONPATH=$SITE PYTHONUNBUFFERED=1 timeout "$t" python3 .bin/gpu_baseline.py > "$OUT/torch.log" 2>&1; echo "torch rc=$? (limit ${t}s)" | tee -a "$OUT/steps.txt"
  l=$(left)
  if [ "$l" -gt 60 ]; then
    OUT="$OUT" PYTHONPATH=$SITE PYTHONUNBUFFERED=1 timeout $(( l < 180 ? l : 180 )) python3 .bin/gpu_score_baseline.py > "$OUT/torch_score.log" 2>&1; echo "torch_score rc=$?" | tee -a "$OUT/steps.txt"
  fi
}
for s in ${STEPS//,/ }; do
  case $s in
    # 180 s: besides the kernels of the table, nine flash-attention kernels to compile and time.
    ops) step ops_f16 180 "$BIN" bench ops $G --dtype f16 ;;
    ops32) step ops_f32 120 "$BIN" bench ops $G --dtype f32 ;;
    # burn's Vulkan backend (SPIR-V) on the same GPU, for README's table of backends; needs a
    # binary built with `--features vulkan` and the .gl loader packages.
    vulkan) step ops_f16_vulkan 150 "$BIN" bench ops --device vulkan --json --dtype f16 ;;
    # Does a wider autotune search (more matmul/conv kernels benchmarked) find faster kernels?
    tunefull) CUBECL_AUTOTUNE_LEVEL=full step ops_f16_tunefull 180 "$BIN" bench ops $G --dtype f16 ;;
    generate4) RFSTUDIO_ATTENTION=auto step generate_f16_auto 330 "$BIN" $GEN --batches 4 ;;
    # Generation with the flash kernel the ops step found fastest (needs the ops step first).
    flash4)
      if [ -n "$(best_flash)" ]; then
        echo "flash4: RFSTUDIO_ATTENTION=$(attn)" | tee -a "$OUT/steps.txt"
        RFSTUDIO_ATTENTION=$(attn) step generate_f16_flash 330 "$BIN" $GEN --batches 4
      else
        echo "flash4 skipped: no flash kernel ran correctly in ops_f16 (or no ops step)" | tee -a "$OUT/steps.txt"
      fi ;;
    generate1) step generate_f16_auto_b1 240 "$BIN" $GEN --batches 1 ;;
    # `auto` uses the matmul form for long self-attention on CUDA; this runs the padded flash
    # kernel there instead (sdpa_fused), end to end.
    fused) RFSTUDIO_ATTENTION=fused step generate_f16_fused 240 "$BIN" $GEN --batches 4 ;;
    score) step score_f16 180 "$BIN" bench score $G --dtype f16 --u2net ;;
    rfft) RFSTUDIO_ATTENTION=$(attn) step rfft_bf16 300 "$BIN" bench rfft $G --dtype bf16 --size sd15 --random-weights --reg cc --iters 3 ;;
    # Per-kernel times (cubecl's profiler syncs after every kernel), summed by kernel into
    # profile*.txt and shown under the table: a short batch-4 generation, and one RFFT iteration
    # (the backward kernels).
    profile) RFSTUDIO_ATTENTION=$(attn) profile_step profile "batch-4 generation (bench generate, 2 steps, attention $(attn))" 180 "$BIN" $GEN --batches 4 --steps 2 --iters 1 ;;
    profilerfft) RFSTUDIO_ATTENTION=$(attn) profile_step profile_rfft "one RFFT iteration (bench rfft, bf16, cc, attention $(attn))" 180 "$BIN" bench rfft $G --dtype bf16 --size sd15 --random-weights --reg cc --iters 1 ;;
    # Data-parallel RFFT through NCCL on every visible GPU (one GPU: an NCCL group of one),
    # against one device with the same run.toml: tiny models, 3 steps, one micro-batch per GPU
    # (two on one GPU); dp.txt compares the step metrics.
    dp)
      NG=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$NG" -ge 1 ] || NG=1
      DEVS=$(seq -s, -f 'cuda:%g' 0 $((NG - 1)))
      GA=$(( NG > 1 ? NG : 2 ))
      sed -e "s/^batch = 2/batch = 1/; s/^grad_accum = 1/grad_accum = $GA/; s/^steps = 30/steps = 3/" examples/rfft-tiny.toml > /tmp/dp.toml
      rm -rf /tmp/dp-one /tmp/dp-many
      step dp_one 150 "$BIN" --models models/tiny --device cuda --json rfft --config /tmp/dp.toml --run /tmp/dp-one
      step dp_many 150 "$BIN" --models models/tiny --json rfft --config /tmp/dp.toml --run /tmp/dp-many --devices "$DEVS"
      python3 - "$OUT/dp_one.json" "$OUT/dp_many.json" "$DEVS" > "$OUT/dp.txt" 2>&1 <<'PY'
import json, sys
rows = lambda f: [json.loads(l) for l in open(f) if l.startswith('{') and '"kind":"step"' in l]
one, many = rows(sys.argv[1]), rows(sys.argv[2])
print(f"devices {sys.argv[3]}: {len(many)} steps (one device: {len(one)})")
for a, b in zip(one, many):
    print(a["step"], {k: (a[k], b[k], abs(a[k] - b[k])) for k in ("f_ac", "total", "grad_norm")}, "s/step", a["step_time_s"], b["step_time_s"])
PY
      cat "$OUT/dp.txt" ;;
    torch) torch_step ;;
    *) echo "unknown step $s" | tee -a "$OUT/steps.txt" ;;
  esac
done
kill $MEMPID 2>/dev/null
# The compiled kernels and autotune results, for the next call (see the header). The device tool
# brings back files of at most 16 MiB, 8 files in all: the cache goes in 15 MiB parts, 3 at most
# (5 other files come back). If it is larger, the driver's machine-code cache goes first (the
# driver recompiles cached PTX quickly), then cubecl's PTX (autotune results alone still save the
# benchmarking of every candidate kernel).
save_cache() {
  rm -f "$OUT"/kernels.tar.xz*
  # cubecl's PTX cache is cuda/<version>/ptx.json.log, its autotune results autotune/..., the
  # driver's cache nv/.
  local what
  for what in "everything" "all but the driver's cache" "the autotune results alone"; do
    case $what in
      everything) tar -cf - -C "$RFSTUDIO_KERNEL_CACHE" . ;;
      all*) tar -cf - --exclude=./nv -C "$RFSTUDIO_KERNEL_CACHE" . ;;
      *) tar -cf - -C "$RFSTUDIO_KERNEL_CACHE" ./autotune ;;
    esac 2>/dev/null | xz -T0 -6 > /tmp/kernels.tar.xz || continue
    local size; size=$(stat -c %s /tmp/kernels.tar.xz)
    if [ "$size" -le $(( 45 * 1024 * 1024 )) ]; then
      if [ "$size" -le $(( 15 * 1024 * 1024 )) ]; then
        mv /tmp/kernels.tar.xz "$OUT/kernels.tar.xz"
      else
        split -b 15M -d -a 2 /tmp/kernels.tar.xz "$OUT/kernels.tar.xz." && rm -f /tmp/kernels.tar.xz
      fi
      echo "kernel cache saved ($what): $(( size / 1024 / 1024 )) MiB in $(ls "$OUT"/kernels.tar.xz* | wc -l) file(s); carry them in .kcache/" | tee -a "$OUT/steps.txt"
      return
    fi
    echo "kernel cache, $what: $(( size / 1024 / 1024 )) MiB, too large" | tee -a "$OUT/steps.txt"
  done
}
save_cache
du -sh "$RFSTUDIO_KERNEL_CACHE"/* 2>/dev/null | tee -a "$OUT/steps.txt"
python3 "$(dirname "$0")/gpu_bench_report.py" "$OUT" | tee "$OUT/table.md"
for f in "$OUT/profile.txt" "$OUT/profile_rfft.txt"; do
  [ -f "$f" ] && { echo; cat "$f"; } | tee -a "$OUT/table.md"
done
# The device tool brings back at most 8 files: keep the table, the combined JSON, steps.txt, the
# kernel cache and the profile; everything else goes into logs.tar.xz.
( cd "$OUT" && ls | grep -v -x -E 'table.md|gpu-bench.json|steps.txt|kernels.tar.xz(.[0-9]+)?|profile.log.xz|logs.tar.xz' > /tmp/rf-logs.txt
  tar -cJf logs.tar.xz -T /tmp/rf-logs.txt && xargs rm -rf < /tmp/rf-logs.txt )
