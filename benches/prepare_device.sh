#!/usr/bin/env bash
# Prepares the real-GPU check for a lent NVIDIA machine (the device tool's README): builds the
# release binary here, strips it into .dev/calm-gpu, downloads the Vulkan/EGL loader packages
# into .gl/ (the machine's image has the driver but not the loaders), keeps both out of git, and
# prints the one call to make. From the repository root:
#
#   bash benches/prepare_device.sh
#
# Then the device tool's `run` with the printed command, carry [".gl", ".dev"] and timeout_s 600;
# benches/device_check.sh fits itself into DEADLINE (540 s) and writes what it measured to $OUT.
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
echo "carried: $(du -shc .gl .dev | tail -1 | cut -f1) of the tool's 64 MiB"
echo
echo "run: BIN=.dev/calm-gpu OUT=\$OUT bash benches/device_check.sh"
echo "carry: [\".gl\", \".dev\"]   timeout_s: 600"
