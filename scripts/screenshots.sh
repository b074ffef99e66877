#!/usr/bin/env bash
# scripts/screenshots.sh OUTDIR — run the real studio under Xvfb, drive it to each tab and save
# one PNG per tab: OUTDIR/{generate,annotate,finetune,models}.png (+ generate.frame-times.json,
# the UI frame times measured while the tiny generation ran).
#
# Needs Xvfb and a software renderer: apt-get install -y xvfb mesa-vulkan-drivers libgl1-mesa-dri libegl1
# The studio runs in demo mode (nothing installed in models/: the tiny random-weight models).
set -euo pipefail
out=${1:?usage: scripts/screenshots.sh OUTDIR}
cd "$(dirname "$0")/.."
command -v xvfb-run >/dev/null || {
    echo "xvfb-run not found: apt-get install -y xvfb mesa-vulkan-drivers libgl1-mesa-dri libegl1" >&2
    exit 2
}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# shellcheck disable=SC2086
cargo build ${RFSTUDIO_FEATURES:---no-default-features --features gui}
bin=$PWD/target/debug/rfstudio
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HOME=$work/home XDG_DATA_HOME=$work/home/.local/share XDG_CONFIG_HOME=$work/home/.config
mkdir -p "$HOME"

# 1. something for each tab to show: generated images in a dataset, an RFNet and an RFFT run
tiny=(--models models/tiny --device cpu)
for p in kettle shoe lamp; do
    "$bin" "${tiny[@]}" generate --product "sample-data/$p.png" --prompt "a $p on a wooden table, soft light" \
        --title "$p" --steps 3 --size 128 --seed 3 --attempts 1 --out "$work/gen/$p" >/dev/null 2>&1 ||
        test $? -eq 4 # exit 4: no attempt reached the threshold (expected with random weights)
done
"$bin" dataset init "$work/ds" >/dev/null
"$bin" dataset import "$work/ds" --from "$work/gen" --kind ours >/dev/null
"$bin" synth --n 60 --size 32 --out "$work/synth" >/dev/null
"$bin" "${tiny[@]}" rfnet train --data "$work/synth" --out "$work/runs/rfnet-synth" --tiny \
    --scratch-image-encoder --epochs 2 --lr 1e-3 >/dev/null 2>&1
# the newest run is shown first: a tiny RFFT run (examples/rfft-tiny.toml, about a minute)
"$bin" "${tiny[@]}" rfft --config examples/rfft-tiny.toml --run "$work/runs/rfft-tiny" >/dev/null 2>&1

# 2. one screenshot per tab (a fresh HOME: no stored settings are read or written)
for tab in generate annotate finetune models; do
    xvfb-run -a -s "-screen 0 1400x900x24" "$bin" --device cpu studio \
        --dataset "$work/ds" --runs "$work/runs" --out "$work/studio-out" \
        --product sample-data/kettle.png --steps 8 --size 256 \
        --screenshot-tab "$tab" --screenshot-out "$out/$tab.png"
done
ls -l "$out"
