#!/usr/bin/env bash
# Prepares benches/device_check.sh for a Linux machine with an NVIDIA card whose image has the
# driver but not the Vulkan/EGL loaders: builds the release binary on this machine, strips it
# into .dev/calm-gpu, downloads the loader packages into .gl/, keeps both out of git, and prints
# the one command to run there. From the repository root:
#
#   bash benches/prepare_device.sh
#
# Then run the printed command on the GPU machine, from a copy of the checkout that includes .gl/
# and .dev/, allowing it 600 s; benches/device_check.sh fits itself into DEADLINE (540 s) and
# writes what it measured to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.gl/ /.dev/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done

cargo build --release --locked
mkdir -p .dev
strip -o .dev/calm-gpu target/release/calm-gpu
echo "binary: .dev/calm-gpu, $(du -h .dev/calm-gpu | cut -f1) ($(git rev-parse --short HEAD)$(git diff --quiet || echo ', uncommitted changes'))"

if ! ls .gl/libvulkan1_*.deb > /dev/null 2>&1; then
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update -q
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
echo "loaders: $(ls .gl | tr '\n' ' ')"
echo "to copy along: $(du -shc .gl .dev | tail -1 | cut -f1) (.gl and .dev)"
echo
echo "run: BIN=.dev/calm-gpu OUT=\$OUT bash benches/device_check.sh"
echo "with: .gl/ and .dev/ copied along with the checkout; allow 600 s"
