#!/usr/bin/env bash
# Issue 6's ablation: each training option and feature choice against SPEC's protocol, three
# seeds, on the shipped digits (8,000 / 2,000) and Fashion-MNIST (60,000 / 10,000). Settings are
# compared on a validation split (the last 20% of the training images, `eval --val-split 0.2`);
# the test set is used only for the final rows (the paper's protocol and the chosen one).
#
#   BIN=target/release/calm-gpu OUT=ablation bash scripts/ablation.sh
#   python3 scripts/ablation_table.py ablation > ablation.md
set -euo pipefail
BIN=${BIN:-target/release/calm-gpu}
OUT=${OUT:-ablation}
BACKEND=${BACKEND:-auto}
SEEDS=${SEEDS:-"0 1 2"}
# DATASETS="digits" or "fashion" runs one of them.
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"

run() { # dataset config seed train-options...
  local ds=$1 cfg=$2 seed=$3; shift 3
  local m="$OUT/$ds-$cfg-$seed.safetensors"
  local data=()
  [ "$ds" = fashion ] && data=(--data "$FASHION/train-images-idx3-ubyte.gz")
  if [ ! -f "$m" ]; then
    local t0=$(date +%s.%N)
    "$BIN" train --backend "$BACKEND" "${data[@]}" --seed "$seed" --out "$m" --quiet "$@" > /dev/null
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "{\"train_seconds\": %.2f}\n", b - a }' > "$OUT/$ds-$cfg-$seed.time.json"
  fi
  "$BIN" info --model "$m" --json > "$OUT/$ds-$cfg-$seed.info.json"
  "$BIN" info --model "$m" | grep -E "unused|distinct" > "$OUT/$ds-$cfg-$seed.use.txt"
}

probe() { # dataset config seed tag eval-options...
  local ds=$1 cfg=$2 seed=$3 tag=$4; shift 4
  local m="$OUT/$ds-$cfg-$seed.safetensors"
  local j="$OUT/$ds-$cfg-$seed-$tag.json"
  [ -f "$j" ] && return
  local sets=()
  if [ "$ds" = fashion ]; then
    sets=(--train "$FASHION/train-images-idx3-ubyte.gz" --train-labels "$FASHION/train-labels-idx1-ubyte.gz"
          --test "$FASHION/t10k-images-idx3-ubyte.gz" --test-labels "$FASHION/t10k-labels-idx1-ubyte.gz")
  fi
  "$BIN" eval --backend "$BACKEND" --model "$m" "${sets[@]}" --json "$j" "$@" > /dev/null
}

has() { [[ " $PARTS " == *" $1 "* ]]; }
# PARTS picks groups of rows: "base" (SPEC, data-patch init, revival, pooling, triangle),
# "prior" (learned variance and weights), "white" (whitening, no revival), "preset"
# (`--preset recommended`, the documented configuration).
PARTS=${PARTS:-"base prior white preset"}

for ds in ${DATASETS:-digits fashion}; do
  for seed in $SEEDS; do
    if has base; then
      run "$ds" paper "$seed" --protocol paper
      run "$ds" patches "$seed" --init-method patches
      run "$ds" patches-revive "$seed" --init-method patches --revive
      for cfg in paper patches patches-revive; do
        probe "$ds" "$cfg" "$seed" val-pool1 --val-split 0.2
        probe "$ds" "$cfg" "$seed" val-pool3 --val-split 0.2 --pool 3
        probe "$ds" "$cfg" "$seed" val-pool3-std --val-split 0.2 --pool 3 --standardize
      done
      probe "$ds" paper "$seed" val-pool2-std --val-split 0.2 --pool 2 --standardize
      probe "$ds" patches "$seed" val-pool2-std --val-split 0.2 --pool 2 --standardize
      # Test-set rows: the paper's protocol and the candidates.
      probe "$ds" paper "$seed" test-pool1 --baseline raw --baseline random
      probe "$ds" patches "$seed" test-pool3-std --pool 3 --standardize
      probe "$ds" patches "$seed" test-pool3 --pool 3
      # The triangle encoding (eval --encode triangle), pooled over 4x4 and 6x6 regions.
      probe "$ds" patches "$seed" val-tri4-std --val-split 0.2 --pool 4 --standardize --encode triangle
      probe "$ds" patches "$seed" val-tri6-std --val-split 0.2 --pool 6 --standardize --encode triangle
      probe "$ds" patches "$seed" test-tri6-std --pool 6 --standardize --encode triangle
    fi
    if has prior; then
      # Learned variance, and learned variance with mixing weights (train --learn-*).
      run "$ds" patches-variance "$seed" --init-method patches --learn-variance
      run "$ds" patches-prior "$seed" --init-method patches --learn-variance --learn-weights
      for cfg in patches-variance patches-prior; do
        probe "$ds" "$cfg" "$seed" val-pool3-std --val-split 0.2 --pool 3 --standardize
        probe "$ds" "$cfg" "$seed" val-tri6-std --val-split 0.2 --pool 6 --standardize --encode triangle
      done
    fi
    if has white; then
      # Whitened images (train --whiten 7): K 128 kernels of 8 x 8, no padding, 10 epochs,
      # triangle features on 4 x 4 regions; no revival.
      run "$ds" white "$seed" --init-method patches --whiten 7 --kernels 128 --width 8 --pad 0 --epochs 10
      probe "$ds" white "$seed" val-tri4-std --val-split 0.2 --pool 4 --standardize --encode triangle
      probe "$ds" white "$seed" test-tri4-std --pool 4 --standardize --encode triangle
    fi
    if has preset; then
      # The recommended configuration: the whitened layer with revival, triangle 4 x 4 features.
      run "$ds" white-revive "$seed" --preset recommended
      probe "$ds" white-revive "$seed" val-tri4-std --val-split 0.2 --preset recommended
      probe "$ds" white-revive "$seed" test-tri4-std --preset recommended
    fi
  done
done
echo "done: $OUT"
