#!/usr/bin/env python3
"""Fast exploration of feature encodings for issue 6 (PyTorch + scikit-learn, CPU): loads a
calm-gpu model, computes L on Fashion-MNIST's training images with conv2d, encodes and pools it,
and fits scikit-learn's LogisticRegression (C = 1, standardised features) on the first 48,000
images, scoring the last 12,000 (the split of `calm-gpu eval --val-split 0.2`).

    python3 scripts/explore_features.py MODEL PAD ENCODINGS GRIDS [MAX_ITER]
    python3 scripts/explore_features.py k64.safetensors 2 tri,lse 4,6 500

ENCODINGS: lse (SPEC's log-sum-exp, as `eval`), tri (triangle, as `eval --encode triangle`).
Used to choose what to build and measure with calm-gpu itself; docs/results.md says which
numbers came from here (scikit-learn stops at MAX_ITER, 500 by default, not at convergence)."""
import gzip
import struct
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

torch.set_num_threads(2)
FASHION = "/usr/share/datasets/fashion-mnist/"


def idx(path):
    with gzip.open(path) as f:
        d = f.read()
    if d[3] == 3:
        n, h, w = struct.unpack(">III", d[4:16])
        return np.frombuffer(d, np.uint8, offset=16).reshape(n, 1, h, w).astype(np.float32) / 255
    return np.frombuffer(d, np.uint8, offset=8)


def features(x, theta, pad, kind, grid):
    k, c, w, _ = theta.shape
    out = []
    for i in range(0, len(x), 2000):
        xb = torch.from_numpy(x[i:i + 2000])
        l = torch.nn.functional.conv2d(xb, theta, bias=-0.5 * (theta**2).sum((1, 2, 3)), padding=pad)
        ho, wo = l.shape[2], l.shape[3]
        if kind == "tri":
            norm = torch.nn.functional.conv2d(xb * xb, torch.ones(1, c, w, w), padding=pad)
            d = torch.sqrt(torch.clamp(norm - 2 * l, min=0))
            r = torch.relu(d.mean(1, keepdim=True) - d)
        else:
            r = l
        cols = []
        for a in range(grid):
            for b in range(grid):
                reg = r[:, :, a * ho // grid:(a + 1) * ho // grid, b * wo // grid:(b + 1) * wo // grid]
                reg = reg.reshape(r.shape[0], k, -1)
                cols.append(torch.logsumexp(reg, 2) if kind == "lse" else reg.sum(2))
        out.append(torch.stack(cols, 2).reshape(r.shape[0], -1).numpy())
    return np.concatenate(out)


def main():
    model, pad, kinds, grids = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
    max_iter = int(sys.argv[5]) if len(sys.argv) > 5 else 500
    x = idx(FASHION + "train-images-idx3-ubyte.gz")
    y = idx(FASHION + "train-labels-idx1-ubyte.gz")
    theta = torch.from_numpy(load_file(model)["theta"])
    fit = 48000
    for kind in kinds:
        for grid in map(int, grids):
            t = time.time()
            f = features(x, theta, pad, kind, grid)
            sc = StandardScaler().fit(f[:fit])
            clf = LogisticRegression(C=1.0, max_iter=max_iter).fit(sc.transform(f[:fit]), y[:fit])
            print(f"{model} {kind} grid {grid} dims {f.shape[1]} train {100 * clf.score(sc.transform(f[:fit]), y[:fit]):.2f} "
                  f"val {100 * clf.score(sc.transform(f[fit:]), y[fit:]):.2f} iterations {clf.n_iter_[0]} {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
