#!/usr/bin/env bash
# The tensor-core check on a hardware GPU, short (about 4 minutes), for the first runs of the
# tensor-core E-step (shaders/estep_coop.wgsl) on a card: what the adapter offers (cooperative
# matrices, subgroups), `validate` (the FP32 kernels, then the tensor-core ones: the E-step
# against its CPU twin and the f64 reference, the rest of the epoch on it), the same epoch with
# the FP32 and the tensor-core E-step (MNIST protocol, 60,000 images; STL-10 protocol, a subset),
# and the PyTorch rows (the paper's formulation and the strongest ones, each with its LL agreement)
# on the same card. Made ready like benches/device_check.sh (`bash benches/prepare_device.sh`):
#
#   BIN=.dev/calm-gpu OUT=/tmp/out bash benches/device_tensor.sh
#
# Every step has its own timeout and the whole fits DEADLINE (300 s unless set).
set -u
BIN=${BIN:-.dev/calm-gpu}
OUT=${OUT:-/tmp/calm-out}
MNIST_IMAGES=${MNIST_IMAGES:-60000}
STL_IMAGES=${STL_IMAGES:-1000}
TORCH_DEVICE=${TORCH_DEVICE:-cuda}
DEADLINE=${DEADLINE:-300}
mkdir -p "$OUT"
RESERVE=10
. "$(dirname "$0")/within.sh"
exec > >(tee "$OUT/tensor_log.txt") 2>&1
if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
"$BIN" devices > "$OUT/devices.txt" 2>&1
if ! grep -qi nvidia "$OUT/devices.txt"; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
cat "$OUT/devices.txt"
export WGPU_ADAPTER_NAME=${WGPU_ADAPTER_NAME:-nvidia}
export CALM_TUNE_FILE=/tmp/tuned.json
rm -f "$CALM_TUNE_FILE"
export PYTHONUNBUFFERED=1

echo "== validate (vulkan): the FP32 kernels, then the tensor-core ones"
within 120 "$BIN" validate --backend vulkan > "$OUT/validate.txt" 2>&1
echo "validate rc=$?"
grep -E "adapter|subgroups|kernels:|FAIL|coop twin|checks|error" "$OUT/validate.txt" | head -40

# The tensor-core E-step's shapes (src/gpu/tune.rs COOP_SHAPES) beside the built-in staged
# M-step of each protocol, each checked against the CPU reference, then timed (calm-gpu tune).
COOP_SHAPES="2x2x16@2x2 2x2x32@2x2 4x2x16@2x2 2x4x16@2x2 4x2x32@2x2 2x4x32@2x2 2x2x32@4x2 4x2x16@2x4 4x2x32@2x4"
coop_candidates() { for c in $COOP_SHAPES; do printf -- "--candidate coop:%s,c=%s " "$1" "$c"; done; }
echo "== tune mnist protocol, $MNIST_IMAGES images: the built-in FP32 kernels and the tensor-core shapes"
within 90 "$BIN" tune --backend vulkan --protocol mnist --images "$MNIST_IMAGES" --epochs 3 --candidate staged:e=8x8x16@32su,m=4x4x16@16u $(coop_candidates e=8x8x16@32su,m=4x4x16@16u) 2>&1 | tee "$OUT/tune_mnist.txt" | tail -18
echo "== tune stl10 protocol, $STL_IMAGES images"
within 90 "$BIN" tune --backend vulkan --protocol stl10 --images "$STL_IMAGES" --epochs 2 --candidate staged:e=8x8x16@16x25s,m=4x8x16@17x50s $(coop_candidates e=8x8x16@16x25s,m=4x8x16@17x50s) 2>&1 | tee "$OUT/tune_stl10.txt" | tail -18

echo "== bench with tune's choices (the tuning file), MNIST then STL-10"
within 40 "$BIN" bench --backend vulkan --protocol mnist --images "$MNIST_IMAGES" --epochs 3 2>&1 | tail -2
within 40 "$BIN" bench --backend vulkan --protocol stl10 --images "$STL_IMAGES" --epochs 1 2>&1 | tail -2
cp "$CALM_TUNE_FILE" "$OUT/" 2>/dev/null

echo "== bench a deep network per layer (8,000 images)"
within 40 "$BIN" bench --backend vulkan --images 8000 --epochs 2 --net "64x5p2 | tri max4s2p1 norm | 256x3p1 | tri avg4s3" 2>&1 | tail -6
echo "== the same model with either E-step: LL per epoch on the embedded digits (15 epochs)"
within 40 "$BIN" train --backend vulkan --epochs 15 --out /tmp/fp32.safetensors --force 2>&1 | grep -iE "epoch +1[45]|^ *1[45] |LL" | tail -3
CALM_KERNELS=coop within 40 "$BIN" train --backend vulkan --epochs 15 --out /tmp/coop.safetensors --force 2>&1 | grep -iE "epoch +1[45]|^ *1[45] |LL" | tail -3

echo "== PyTorch on the same card, MNIST protocol (each row with its LL agreement with FP32)"
T="python3 benches/torch_baseline.py --protocol mnist --images $MNIST_IMAGES --device $TORCH_DEVICE --warmup --epochs 3 --no-split"
within 45 $T 2>&1 | tail -2
within 45 $T --formulation conv2d --cudnn-benchmark 2>&1 | tail -1
within 45 $T --formulation wgrad --cudnn-benchmark --channels-last 2>&1 | tail -1
within 45 $T --formulation wgrad --tf32 on --cudnn-benchmark --channels-last 2>&1 | tail -1
within 45 $T --formulation unfold --autocast bf16 2>&1 | tail -1
echo "== done (${SECONDS} s)"
