#!/usr/bin/env bash
# Rebuild ui-assets/wqy-microhei.ttf: WenQuanYi Micro Hei (Debian fonts-wqy-microhei,
# Apache-2.0), face 0, with every character it has: Latin, punctuation, CJK symbols, all 20,902
# CJK Unified Ideographs (simplified and traditional), Hangul, kana, full-width and CJK
# compatibility forms (e.g. ㎏). Hinting is dropped (egui does not use it).
# Needs: apt-get install fonts-wqy-microhei; pip install fonttools.
set -euo pipefail
cd "$(dirname "$0")/.."
src=/usr/share/fonts/truetype/wqy/wqy-microhei.ttc
pyftsubset "$src" --font-number=0 --unicodes='*' --layout-features='*' --no-hinting \
    --output-file=ui-assets/wqy-microhei.ttf
rm -f ui-assets/wqy-microhei-gb2312.ttf
ls -l ui-assets/wqy-microhei.ttf
