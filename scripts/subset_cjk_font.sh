#!/usr/bin/env bash
# Rebuild ui-assets/wqy-microhei-gb2312.ttf: WenQuanYi Micro Hei (Debian fonts-wqy-microhei,
# Apache-2.0) subset to ASCII/Latin, punctuation, CJK symbols, full-width forms and GB2312 hanzi.
# Needs: apt-get install fonts-wqy-microhei; pip install fonttools.
set -euo pipefail
cd "$(dirname "$0")/.."
src=/usr/share/fonts/truetype/wqy/wqy-microhei.ttc
chars=$(mktemp)
python3 - > "$chars" <<'PY'
import sys
chars = set()
for hi in range(0xA1, 0xF8):
    for lo in range(0xA1, 0xFF):
        try:
            chars.add(bytes([hi, lo]).decode("gb2312"))
        except UnicodeDecodeError:
            pass
for lo, hi in [(0x20, 0x250), (0x2000, 0x2070), (0x3000, 0x3040), (0xFF00, 0xFFF0)]:
    chars.update(chr(c) for c in range(lo, hi))
sys.stdout.write("".join(sorted(chars)))
PY
pyftsubset "$src" --font-number=0 --text-file="$chars" --layout-features='*' --no-hinting \
    --output-file=ui-assets/wqy-microhei-gb2312.ttf
rm -f "$chars"
ls -l ui-assets/wqy-microhei-gb2312.ttf
