#!/usr/bin/env python3
"""The first N records of an IDX file (MNIST's format, gzipped or not), written gzipped.

    python3 scripts/idx_head.py SRC.gz N DST.gz

For instance the Fashion-MNIST subsets of docs/results.md ("Deep networks"):
    python3 scripts/idx_head.py /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz 12000 x12k.gz
    python3 scripts/idx_head.py /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz 12000 y12k.gz
"""
import gzip
import struct
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    nd = magic & 0xFF
    dims = list(struct.unpack(">" + "I" * nd, data[4 : 4 + 4 * nd]))
    if n > dims[0]:
        sys.exit(f"error: {src} holds {dims[0]} records, fewer than {n}")
    per = 1
    for d in dims[1:]:
        per *= d
    size = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[(magic >> 8) & 0xFF]
    head = 4 + 4 * nd
    body = data[head : head + n * per * size]
    dims[0] = n
    with gzip.open(dst, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(">" + "I" * nd, *dims) + body)


if __name__ == "__main__":
    main()
