#!/usr/bin/env bash
# scripts/check_package.sh DEB [ARCHIVE] — install the built .deb as a user would and check
# that the installed rfstudio works with no checkout and a fresh home folder:
#   1. dpkg -i; `rfstudio info` from an empty folder: exits 0, creates the user's models folder
#      (~/.local/share/rfstudio/models with models.toml and README.md);
#   2. the studio under Xvfb (when xvfb-run is there) starts in demo mode on the installed tiny
#      models, runs a generation and writes its outputs under ~/.local/share/rfstudio/out;
#   3. nothing was written under /usr/share/rfstudio or beside the binary;
#   4. dpkg -r removes the binary, the share folder and the desktop entry.
# The portable archive, when given, is unpacked and `bin/rfstudio info` run from it the same way.
# Needs root (dpkg -i). Leaves the system as it found it.
set -euo pipefail
deb=$(realpath "${1:?usage: scripts/check_package.sh DEB [ARCHIVE]}")
archive=${2:+$(realpath "$2")}
[ "$(id -u)" = 0 ] || { echo "needs root (dpkg -i)" >&2; exit 2; }
if dpkg -s rfstudio >/dev/null 2>&1; then
    echo "rfstudio is already installed here: remove it first (dpkg -r rfstudio)" >&2
    exit 2
fi
scratch=$(mktemp -d)
cleanup() {
    dpkg -r rfstudio >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT
fresh_home() {
    local h=$scratch/home-$1
    mkdir -p "$h"
    echo "$h"
}
run_as_user() { # HOME=$1, in an empty folder, no rfstudio variables
    local h=$1
    shift
    (cd "$scratch/empty" && env -u RFSTUDIO_MODELS -u RFSTUDIO_DEVICE -u XDG_DATA_HOME -u XDG_CONFIG_HOME \
        -u XDG_CACHE_HOME HOME="$h" "$@")
}
mkdir -p "$scratch/empty"
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== dpkg -i"
dpkg -i "$deb" >/dev/null
command -v rfstudio >/dev/null || fail "rfstudio is not on PATH after dpkg -i"
[ -f /usr/share/applications/rfstudio.desktop ] || fail "no desktop entry"
[ -f /usr/share/icons/hicolor/256x256/apps/rfstudio.png ] || fail "no icon"
[ -f /usr/share/rfstudio/models/tiny/models.toml ] || fail "no tiny demo models"
before=$(find /usr/share/rfstudio /usr/bin/rfstudio | sort | sha256sum)

echo "== rfstudio info (fresh home, no checkout)"
h=$(fresh_home info)
run_as_user "$h" rfstudio --device cpu info >"$scratch/info.txt" 2>&1 || { cat "$scratch/info.txt"; fail "info failed"; }
grep -q "demo mode" "$scratch/info.txt" || { cat "$scratch/info.txt"; fail "info does not say the studio runs in demo mode"; }
[ -f "$h/.local/share/rfstudio/models/models.toml" ] || fail "the user's models folder was not created"
[ -f "$h/.local/share/rfstudio/models/README.md" ] || fail "the model instructions were not put in the user's models folder"
sed -n '1,12p' "$scratch/info.txt"

if command -v xvfb-run >/dev/null; then
    echo "== the studio under Xvfb (demo mode, one tiny generation)"
    h=$(fresh_home studio)
    run_as_user "$h" xvfb-run -a -s "-screen 0 1400x900x24" rfstudio --device cpu studio \
        --product /usr/share/rfstudio/sample-data/kettle.png --steps 2 --size 128 \
        --screenshot-tab generate --screenshot-out "$scratch/generate.png" >"$scratch/studio.txt" 2>&1 ||
        { cat "$scratch/studio.txt"; fail "the studio did not run"; }
    [ -s "$scratch/generate.png" ] || { cat "$scratch/studio.txt"; fail "no screenshot"; }
    ls "$h/.local/share/rfstudio/out"/*/run.json >/dev/null 2>&1 || fail "no run under ~/.local/share/rfstudio/out"
    [ -f "$h/.config/rfstudio/studio.ron" ] && fail "a screenshot run must not store settings"
    echo "studio ok: $(ls "$h/.local/share/rfstudio/out")"
else
    echo "== xvfb-run not found: the studio check is skipped (apt-get install -y xvfb mesa-vulkan-drivers)"
fi

after=$(find /usr/share/rfstudio /usr/bin/rfstudio | sort | sha256sum)
[ "$before" = "$after" ] || fail "files were written under /usr/share/rfstudio or /usr/bin"

echo "== dpkg -r"
dpkg -r rfstudio >/dev/null
[ ! -e /usr/bin/rfstudio ] || fail "/usr/bin/rfstudio left after dpkg -r"
[ ! -e /usr/share/rfstudio ] || fail "/usr/share/rfstudio left after dpkg -r"
[ ! -e /usr/share/applications/rfstudio.desktop ] || fail "desktop entry left after dpkg -r"

if [ -n "$archive" ]; then
    echo "== portable archive"
    mkdir -p "$scratch/portable"
    tar -C "$scratch/portable" -xJf "$archive"
    bin=$(echo "$scratch"/portable/rfstudio-*/bin/rfstudio)
    h=$(fresh_home portable)
    run_as_user "$h" "$bin" --device cpu info >"$scratch/pinfo.txt" 2>&1 || { cat "$scratch/pinfo.txt"; fail "portable info failed"; }
    grep -q "demo mode" "$scratch/pinfo.txt" || fail "portable: info does not say demo mode"
fi
echo "package check passed"
