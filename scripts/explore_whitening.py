#!/usr/bin/env python3
"""The screen that found patch whitening for issue 6 (PyTorch + scikit-learn, CPU): whitens
Fashion-MNIST's training images with the centre row of a ZCA matrix fitted on W x W patches
(eps absolute, on pixels / 255), saves them as .npy for `calm-gpu train --data`, and, given a
model trained on them, scores triangle features pooled over G x G regions with scikit-learn's
LogisticRegression (C = 1, standardised, 500 iterations) on the split of `eval --val-split 0.2`.

    python3 scripts/explore_whitening.py whiten 7 0.01 white7.npy
    calm-gpu train --backend cpu --data white7.npy --kernels 128 --width 8 --pad 0 --epochs 10 \
        --init-method patches --out w.safetensors
    python3 scripts/explore_whitening.py score white7.npy w.safetensors 0 4

`calm-gpu train --whiten 7` does the whitening itself (eps a tenth of the mean eigenvalue,
about 0.012 here) and is what docs/results.md reports; this script is the quick screen."""
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from explore_features import FASHION, idx

torch.set_num_threads(2)


def whiten(width, eps, out):
    x = idx(FASHION + "train-images-idx3-ubyte.gz")
    rng = np.random.default_rng(0)
    n, h, v = (rng.integers(0, hi, 200000) for hi in (len(x), 28 - width + 1, 28 - width + 1))
    p = np.stack([x[a, 0, b:b + width, c:c + width].ravel() for a, b, c in zip(n, h, v)]).astype(np.float64)
    p -= p.mean(0, keepdims=True)
    d, u = np.linalg.eigh(p.T @ p / len(p))
    z = u @ np.diag(1 / np.sqrt(d + eps)) @ u.T
    f = z[(width * width) // 2].reshape(1, 1, width, width).astype(np.float32)
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(f), padding=width // 2).numpy()
    np.save(out, (y / y.std()).astype(np.float32))


def score(images, model, pad, grid):
    x = np.load(images)
    y = idx(FASHION + "train-labels-idx1-ubyte.gz")
    theta = torch.from_numpy(load_file(model)["theta"])
    k, c, w, _ = theta.shape
    feats = []
    for i in range(0, len(x), 1000):
        xb = torch.from_numpy(x[i:i + 1000])
        l = torch.nn.functional.conv2d(xb, theta, bias=-0.5 * (theta ** 2).sum((1, 2, 3)), padding=pad)
        norm = torch.nn.functional.conv2d(xb * xb, torch.ones(1, c, w, w), padding=pad)
        d = torch.sqrt(torch.clamp(norm - 2 * l, min=0))
        r = torch.relu(d.mean(1, keepdim=True) - d)
        ho, wo = r.shape[2], r.shape[3]
        cols = [r[:, :, a * ho // grid:(a + 1) * ho // grid, b * wo // grid:(b + 1) * wo // grid].sum((2, 3))
                for a in range(grid) for b in range(grid)]
        feats.append(torch.stack(cols, 2).reshape(len(xb), -1).numpy())
    f = np.concatenate(feats)
    t, fit = time.time(), 48000
    sc = StandardScaler().fit(f[:fit])
    clf = LogisticRegression(C=1.0, max_iter=500).fit(sc.transform(f[:fit]), y[:fit])
    print(f"{model} triangle {grid}x{grid} dims {f.shape[1]} train {100 * clf.score(sc.transform(f[:fit]), y[:fit]):.2f} "
          f"val {100 * clf.score(sc.transform(f[fit:]), y[fit:]):.2f} {time.time() - t:.0f} s")


if __name__ == "__main__":
    if sys.argv[1] == "whiten":
        whiten(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        score(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
