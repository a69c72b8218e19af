#!/usr/bin/env python3
"""Summarises scripts/ablation.sh's output directory as Markdown tables (mean and spread over
seeds): validation accuracy per training option and feature choice, kernel use, train time, and
the test-set rows."""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(out, "*-*.json")):
    m = re.match(r"(digits|fashion)-(paper|patches-revive|patches-variance|patches-prior|patches|white-revive|white)-(\d+)-(.+)\.json$", os.path.basename(f))
    if not m:
        continue
    ds, cfg, seed, tag = m.groups()
    j = json.load(open(f))
    for r in j["results"]:
        key = (ds, cfg, tag, r["features"].split(" (")[0])
        rows.setdefault(key, []).append(100 * r["test_acc"])

def fmt(v):
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f} (1 seed)"
    return f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f} ({min(v):.2f}-{max(v):.2f}, {len(v)} seeds)"

use = {}
times = {}
for f in glob.glob(os.path.join(out, "*.use.txt")):
    m = re.match(r"(digits|fashion)-(paper|patches-revive|patches-variance|patches-prior|patches|white-revive|white)-(\d+)\.use\.txt$", os.path.basename(f))
    ds, cfg, seed = m.groups()
    txt = open(f).read()
    unused = int(re.search(r"count < 1\): (\d+)", txt).group(1))
    distinct = int(re.search(r"another\): (\d+)", txt).group(1))
    use.setdefault((ds, cfg), []).append((unused, distinct))
    t = os.path.join(out, f"{ds}-{cfg}-{seed}.time.json")
    if os.path.exists(t):
        times.setdefault((ds, cfg), []).append(json.load(open(t))["train_seconds"])

names = {"paper": "SPEC / paper (N(0,1) init)", "patches": "data-patch init", "patches-revive": "data-patch init + revival",
         "patches-variance": "data-patch init + learned variance",
         "patches-prior": "data-patch init + learned variance and weights",
         "white": "whitened 7x7, K 128, w 8, p 0, 10 epochs, data-patch init",
         "white-revive": "the same + revival (--preset recommended)"}
for ds in ("digits", "fashion"):
    print(f"\n### {ds}: validation accuracy (%), last 20% of the training images held out\n")
    tags = ["val-pool1", "val-pool2-std", "val-pool3", "val-pool3-std", "val-tri4-std", "val-tri6-std"]
    print("| training | " + " | ".join(tags) + " | unused / distinct kernels | train s |")
    print("|---|" + "---|" * (len(tags) + 2))
    for cfg in names:
        if not any(k[:2] == (ds, cfg) for k in rows):
            continue
        u = use.get((ds, cfg), [])
        us = ", ".join(f"{a}/{b}" for a, b in u) or "-"
        t = times.get((ds, cfg), [])
        ts = f"{statistics.mean(t):.1f}" if t else "-"
        print(f"| {names[cfg]} | " + " | ".join(fmt(rows.get((ds, cfg, tag, 'calm'), [])) for tag in tags) + f" | {us} | {ts} |")
    print(f"\n### {ds}: test accuracy (%)\n")
    print("| features | test accuracy |\n|---|---|")
    for (cfg, tag, feat, label) in [
        ("paper", "test-pool1", "raw pixels", "raw pixels"),
        ("paper", "test-pool1", "random kernels", "random kernels (K=64)"),
        ("paper", "test-pool1", "calm", "CALM, SPEC / paper protocol"),
        ("patches", "test-pool3", "calm", "CALM, data-patch init, 3x3 pooling"),
        ("patches", "test-pool3-std", "calm", "CALM, data-patch init, 3x3 pooling, standardised"),
        ("patches", "test-tri6-std", "calm", "CALM, data-patch init, triangle encoding, 6x6 pooling, standardised"),
        ("white", "test-tri4-std", "calm", "CALM, whitened 7x7, K 128, w 8, triangle encoding, 4x4 pooling, standardised"),
        ("white-revive", "test-tri4-std", "calm", "the same + revival (--preset recommended)"),
    ]:
        print(f"| {label} | {fmt(rows.get((ds, cfg, tag, feat), []))} |")
