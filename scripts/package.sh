#!/usr/bin/env bash
# scripts/package.sh [OUTDIR] — build rfstudio's Linux packages into OUTDIR (default
# target/packages):
#   rfstudio_<version>_<arch>.deb             install with: sudo apt install ./rfstudio_*.deb
#   rfstudio-<version>-linux-<arch>.tar.xz    portable: unpack anywhere, run bin/rfstudio
# Both hold the binary, the desktop entry and icon, the tiny demo models, the sample products and
# the model instructions, laid out as <prefix>/bin/rfstudio + <prefix>/share/rfstudio/..., which
# is where the binary looks for them. Nothing is written beside the binary at run time: settings
# go to ~/.config/rfstudio, caches to ~/.cache/rfstudio, models, outputs, datasets and runs to
# ~/.local/share/rfstudio (created on first start).
#
# Environment:
#   RFSTUDIO_PROFILE   cargo profile: release (default) or dev (quicker to build, for checks)
#   RFSTUDIO_FEATURES  cargo feature flags (default: the crate's defaults: cuda, wgpu, gui)
# Needs dpkg-deb (Debian's dpkg) and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/packages}
profile=${RFSTUDIO_PROFILE:-release}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
command -v dpkg-deb >/dev/null || { echo "dpkg-deb not found: apt-get install -y dpkg" >&2; exit 2; }

# shellcheck disable=SC2086
cargo build --locked --profile "$profile" ${RFSTUDIO_FEATURES:-}
case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
bin=${CARGO_TARGET_DIR:-target}/$dir/rfstudio

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The installed layout under a prefix (/usr for the .deb, the archive's top folder).
lay_out() {
    local prefix=$1 share=$1/share/rfstudio
    install -Dm755 "$bin" "$prefix/bin/rfstudio"
    strip "$prefix/bin/rfstudio" 2>/dev/null || true
    mkdir -p "$share/models"
    cp -r models/tiny "$share/models/"
    cp models/README.md models/models.toml "$share/models/"
    cp -r sample-data examples "$share/"
    install -Dm644 packaging/rfstudio.desktop "$prefix/share/applications/rfstudio.desktop"
    install -Dm644 ui-assets/rfstudio-256.png "$prefix/share/icons/hicolor/256x256/apps/rfstudio.png"
    install -Dm644 ui-assets/rfstudio-48.png "$prefix/share/icons/hicolor/48x48/apps/rfstudio.png"
    install -Dm644 README.md "$prefix/share/doc/rfstudio/README.md"
    install -Dm644 packaging/copyright "$prefix/share/doc/rfstudio/copyright"
}

# 1. the .deb
deb=$stage/deb
lay_out "$deb/usr"
mkdir -p "$deb/DEBIAN"
size=$(du -sk "$deb/usr" | cut -f1)
cat >"$deb/DEBIAN/control" <<CONTROL
Package: rfstudio
Version: $version
Architecture: $arch
Maintainer: rfstudio developers <rfstudio@localhost>
Installed-Size: $size
Section: graphics
Priority: optional
Depends: libc6 (>= 2.31), libgcc-s1, libxkbcommon0
Recommends: libvulkan1, mesa-vulkan-drivers, libegl1, libx11-6, libxcursor1, libxi6, libxrandr2, libxkbcommon-x11-0, libwayland-client0, xdg-desktop-portal
Description: reliable advertising-image generation studio
 Generates product advertising images with Stable Diffusion 1.5 and ControlNet (canny),
 scores each with RFNet (Available, Space Mismatch, Size Mismatch, Indistinctiveness,
 Shape Hallucination) and regenerates unusable ones; labels images for RFNet and
 fine-tunes the ControlNet with RFFT. Opens in demo mode on tiny random-weight models
 until real weights are put in ~/.local/share/rfstudio/models.
CONTROL
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$deb" "$out/rfstudio_${version}_${arch}.deb" >/dev/null

# 2. the portable archive
top=rfstudio-$version
lay_out "$stage/portable/$top"
cat >"$stage/portable/$top/install-desktop-entry.sh" <<'ENTRY'
#!/bin/sh
# Add rfstudio (this unpacked folder) to the desktop's application menu for this user.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
apps=${XDG_DATA_HOME:-$HOME/.local/share}/applications
icons=${XDG_DATA_HOME:-$HOME/.local/share}/icons/hicolor/256x256/apps
mkdir -p "$apps" "$icons"
cp "$here/share/icons/hicolor/256x256/apps/rfstudio.png" "$icons/rfstudio.png"
sed "s|^Exec=rfstudio|Exec=\"$here/bin/rfstudio\"|" "$here/share/applications/rfstudio.desktop" >"$apps/rfstudio.desktop"
echo "added $apps/rfstudio.desktop"
ENTRY
chmod 755 "$stage/portable/$top/install-desktop-entry.sh"
tar -C "$stage/portable" -cJf "$out/rfstudio-$version-linux-$arch.tar.xz" "$top"
ls -l "$out"
