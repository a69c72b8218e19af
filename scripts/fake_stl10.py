#!/usr/bin/env python3
"""Writes a small dataset in STL-10's exact binary layout, to run the STL-10 protocol end to end
where the real files cannot be downloaded:

    python3 scripts/fake_stl10.py DIR [--train 500] [--test 200] [--unlabeled 1000] [--seed 0]

Layout (as published): uint8, each image 3 x 96 x 96 stored channel by channel, column-major
within a channel (the byte at c*9216 + x*96 + y is pixel (row y, column x) of channel c); labels
are bytes 1..10. The images are noise with a class-coloured, class-shaped blob at a random place,
so a probe has something to find; they are not STL-10 and say nothing about its accuracy.
"""
import argparse
import os

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--train", type=int, default=500)
ap.add_argument("--test", type=int, default=200)
ap.add_argument("--unlabeled", type=int, default=1000)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
rng = np.random.default_rng(a.seed)
colours = rng.integers(40, 216, size=(10, 3))
yy, xx = np.mgrid[0:96, 0:96]


def images(n, labels):
    out = rng.integers(0, 80, size=(n, 3, 96, 96)).astype(np.int32)
    for i, c in enumerate(labels):
        cy, cx = rng.integers(24, 72, size=2)
        r = 10 + 2 * (c % 5)
        mask = (np.abs(yy - cy) + np.abs(xx - cx) < r) if c < 5 else ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        for ch in range(3):
            out[i, ch][mask] = colours[c, ch] + rng.integers(-20, 20, size=mask.sum())
    out = np.clip(out, 0, 255).astype(np.uint8)
    # (n, c, row y, col x) -> column-major within each channel: (n, c, x, y)
    return np.ascontiguousarray(out.transpose(0, 1, 3, 2))


os.makedirs(a.dir, exist_ok=True)
for split, n in (("train", a.train), ("test", a.test)):
    y = rng.integers(0, 10, size=n)
    images(n, y).tofile(os.path.join(a.dir, f"{split}_X.bin"))
    (y + 1).astype(np.uint8).tofile(os.path.join(a.dir, f"{split}_y.bin"))
if a.unlabeled:
    images(a.unlabeled, rng.integers(0, 10, size=a.unlabeled)).tofile(os.path.join(a.dir, "unlabeled_X.bin"))
print(f"wrote {a.train} train, {a.test} test, {a.unlabeled} unlabeled images to {a.dir}")
