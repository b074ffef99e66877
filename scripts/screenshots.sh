#!/usr/bin/env bash
# scripts/screenshots.sh OUTDIR — run the real studio under Xvfb, drive it to each tab and save
# PNGs: OUTDIR/{generate,annotate,finetune,models}.png, plus generate-progress.png (a run in
# progress with its phase and time left, a Traditional-Chinese title), generate-compare.png (two
# candidates side by side with the depth overlay), annotate-grid.png (the grid view) and
# finetune-compare.png (two RFFT runs overlaid), {generate,annotate,finetune,models}-zh.png (each
# tab in Simplified Chinese); generate.frame-times.json holds the UI frame
# times measured while the tiny generation of generate.png ran.
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

# 1. something for each tab to show: generated images in a dataset (titles in Traditional
#    Chinese, as a Taiwan / Hong Kong catalogue writes them), an RFNet and two RFFT runs
tiny=(--models models/tiny --device cpu)
gen() { # product title attempts out
    "$bin" "${tiny[@]}" generate --product "sample-data/$1.png" --prompt "a $1 on a wooden table, soft light" \
        --title "$2" --steps 3 --size 128 --seed 3 --attempts "$3" --out "$4" >/dev/null 2>&1 ||
        test $? -eq 4 # exit 4: no attempt reached the threshold (expected with random weights)
}
gen kettle "不鏽鋼電熱水壺 1.7L 快煮壺" 1 "$work/gen/kettle"
gen shoe "男款藍色透氣跑步鞋 運動系列" 1 "$work/gen/shoe"
gen lamp "北歐風檯燈 設計師 喆 玥 垚" 1 "$work/gen/lamp"
gen phone "蘋果手機 專業版 6.7吋 256GB" 1 "$work/gen/phone"
gen bottle "運動水壺 750ml ㎏ 輕量" 1 "$work/gen/bottle"
gen bag "真皮托特包 大容量" 1 "$work/gen/bag"
# a run with two candidates for the side-by-side view (in the studio's output folder)
gen phone "蘋果手機 專業版 6.7吋 256GB" 2 "$work/studio-out/phone-compare"
"$bin" dataset init "$work/ds" >/dev/null
"$bin" dataset import "$work/ds" --from "$work/gen" --kind ours >/dev/null
"$bin" synth --n 60 --size 32 --out "$work/synth" >/dev/null
"$bin" "${tiny[@]}" rfnet train --data "$work/synth" --out "$work/runs/rfnet-synth" --tiny \
    --scratch-image-encoder --epochs 2 --lr 1e-3 >/dev/null 2>&1
# two tiny RFFT runs (examples/rfft-tiny.toml, about a minute each), the second with a lower
# learning rate and another seed, for the overlaid curves; the newest is shown first
sed -e "s|\"sample-data/|\"$PWD/sample-data/|" -e 's/^lr = .*/lr = 3e-4/' -e 's/^seed = .*/seed = 11/' \
    examples/rfft-tiny.toml >"$work/rfft-lr3e-4.toml"
"$bin" "${tiny[@]}" rfft --config "$work/rfft-lr3e-4.toml" --run "$work/runs/rfft-tiny-lr3e-4" >/dev/null 2>&1
"$bin" "${tiny[@]}" rfft --config examples/rfft-tiny.toml --run "$work/runs/rfft-tiny" >/dev/null 2>&1

# 2. the screenshots (a fresh HOME: no stored settings are read or written)
shot() { # name tab scene extra-args...
    local name=$1 tab=$2 scene=$3
    shift 3
    xvfb-run -a -s "-screen 0 1400x900x24" "$bin" --device cpu studio \
        --dataset "$work/ds" --runs "$work/runs" --out "$work/studio-out" \
        --screenshot-tab "$tab" --screenshot-scene "$scene" --screenshot-out "$out/$name.png" "$@"
}
shot generate generate plain --product sample-data/kettle.png --steps 8 --size 256
shot generate-progress generate progress --product sample-data/phone.png --steps 60 --size 256 \
    --title "蘋果手機 專業版 6.7吋 256GB"
shot generate-compare generate compare
shot annotate annotate plain
shot annotate-grid annotate grid
shot finetune finetune plain
shot finetune-compare finetune compare
shot models models plain
# the interface in Simplified Chinese (a Simplified-Chinese title, as a mainland catalogue writes it)
shot generate-zh generate plain --lang zh-CN --product sample-data/kettle.png --steps 8 --size 256 \
    --title "不锈钢电热水壶 1.7L 快煮壶"
shot annotate-zh annotate plain --lang zh-CN
shot finetune-zh finetune plain --lang zh-CN
shot models-zh models plain --lang zh-CN
ls -l "$out"
