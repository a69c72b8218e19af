#!/usr/bin/env python3
"""PyTorch baseline for calm-gpu: batch EM of one CALM layer, the paper's way and PyTorch's fastest.

This is the peer the project's benchmarks compare against (see SPEC.md for the math, PERF.md for
what is known about speed). By default (--formulation paper) it is deliberately written the way
the paper's own code works:

  E-step  L     = F.conv2d(X, theta, bias=-0.5*||theta_k||^2, padding=p)      (Nb, K, Ho, Wo)
          logp  = logsumexp(L over (k, h, w))                                  (Nb,)
          gamma = L - logp
  M-step  T     = grouped conv3d, one group per image, each image's posterior maps exp(gamma)
                  used as its filters:  input  Xpad -> (1, Nb, C, Hp, Wp)
                                        weight exp(gamma) -> (Nb*K, 1, 1, Ho, Wo), groups=Nb
                                        output (1, Nb*K, C, w, w), summed over the Nb images
          B     = sum over (n, h, w) of exp(gamma);   LL = sum of logp

The other formulations compute the same E-step and M-step the way a user after PyTorch's fastest
EM would (T[k,c,i,j] = sum_n sum_{h,w} post[n,k,h,w] * Xpad[n,c,h+i,w+j], post = exp(gamma)):

  conv2d  E-step as paper.  M-step as ONE plain conv2d over the whole batch, the batch being the
          reduction ("channel") axis:  input  Xpad^T  (C, Nb, Hp, Wp)
                                       weight post^T  (K, Nb, Ho, Wo)
                                       output         (C, K, w, w) -> permute to (K, C, w, w)
          (out[c,k,i,j] = sum_n sum_{h,w} Xpad[n,c,i+h,j+w] * post[n,k,h,w] = T[k,c,i,j])
  wgrad   E-step as paper.  M-step as the weight gradient of the E-step's convolution, which is
          what T is:  T = torch.nn.grad.conv2d_weight(X, (K,C,w,w), post, padding=p)
          (aten.convolution_backward: cuDNN's backward-filter kernels, built for this shape)
  unfold  im2col, then both steps as one big GEMM each:
          patches = Xpad.unfold(2,w,1).unfold(3,w,1) gathered once as (C*w*w, Nb*Ho*Wo)
                    (F.unfold's patches, in the (c,i,j) x (n,h,w) order the GEMMs want)
          E-step  L = addmm(bias, theta (K, C*w*w), patches) -> (K, Nb, Ho*Wo),
                  logp = logsumexp over (k, h, w), gamma = L - logp
          M-step  T = post (K, Nb*Ho*Wo) @ patches^T -> (K, C*w*w),  B = row sums of post

Knobs for every formulation, none on by default: --channels-last (NHWC operands; for conv2d's
M-step the batch becomes the innermost axis), --tf32 on, --cudnn-benchmark, --autocast bf16|fp16
(only the convolutions/GEMMs run in the low type; the bias, logsumexp, exp and every accumulation
stay float32), --compile (torch.compile of the per-batch step, compiled in the warm-up).

theta is fixed for the whole epoch ("batch EM"); the statistics are summed over all batches in
float64 (the per-batch math runs in float32) and theta is updated at the end of the epoch:
S = sum B, B' = (B + 1/S) * S / (S + 1), theta = T / B'.

LL agreement: whenever the run is not the paper's float32 formulation (another formulation,
TF32, autocast, channels-last or compile; --ll-reference on forces it), the paper formulation is
also run in float32 with TF32 off, in the same process, on the same data from the same initial
theta, for as many epochs, after the timed epochs and untimed. Each epoch reports
rel = |LL - LL_ref| / |LL_ref|; the run agrees when rel <= 1e-5 (--ll-tol) in every epoch, the
contract the project sets for a tensor-core path.

Only torch, numpy and the standard library are used.

Examples
  python3 benches/torch_baseline.py --check-golden ../shared/golden/tiny --formulation unfold
  python3 benches/torch_baseline.py --protocol mnist \
      --data assets/digits-train-images-idx3-ubyte.gz --epochs 2 --threads 2 --warmup
  python3 benches/torch_baseline.py --protocol mnist --data train-images-idx3-ubyte.gz \
      --device cuda --tf32 off --warmup --epochs 3 --json torch_mnist.json
  python3 benches/torch_baseline.py --protocol mnist --data train-images-idx3-ubyte.gz \
      --device cuda --formulation wgrad --tf32 on --cudnn-benchmark --channels-last --warmup
  python3 benches/torch_baseline.py --protocol stl10 --shape 3 96 96 --images 2000 --device cuda

Speed is reported as GFLOP/s by SPEC.md's count: each of the E-step and M-step costs
2*N*K*Ho*Wo*C*w*w floating point operations, so an epoch costs twice that, whatever the
formulation.
"""
import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOLS = {
    # name: (kernels K, width w, pad p, batch)
    "mnist": (64, 20, 2, 1000),
    "stl10": (200, 15, 0, 200),
}

IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------
# data


def read_idx(path):
    """Reads an IDX file (MNIST's format), gzipped or raw, into a numpy array of its own type."""
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[code])
    count = int(np.prod(dims)) if ndim else 1
    start = 4 + 4 * ndim
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file ({len(data) - start} bytes for {dims})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(dims)


def load_images(args):
    """Returns (float32 numpy array (N, C, H, W), description)."""
    if args.data:
        path = args.data
        if path.endswith(".npy"):
            arr = np.load(path, mmap_mode="r")
            if args.images:
                arr = arr[: args.images]
            arr = np.array(arr, dtype=np.float32, copy=True)  # writable, out of the memmap
            desc = f"{path} (npy)"
        else:
            raw = read_idx(path)
            if args.images:
                raw = raw[: args.images]
            arr = raw.astype(np.float32)
            if raw.dtype == np.uint8:
                arr /= 255.0
                desc = f"{path} (IDX, pixels/255)"
            else:
                desc = f"{path} (IDX)"
        if arr.ndim == 3:
            arr = arr[:, None, :, :]
        if arr.ndim != 4:
            raise ValueError(f"{path}: expected (N,C,H,W) or (N,H,W), got shape {arr.shape}")
        if args.images and arr.shape[0] < args.images:
            raise ValueError(f"{path}: holds {arr.shape[0]} images, {args.images} requested")
        return np.ascontiguousarray(arr), desc
    c, h, w = args.shape
    n = args.images or 1000
    g = torch.Generator().manual_seed(args.seed + 1)
    arr = torch.rand((n, c, h, w), generator=g, dtype=torch.float32).numpy()
    return arr, f"random uniform [0,1) images, seed {args.seed + 1}"


# --------------------------------------------------------------------------------------------
# the EM steps; these same functions run the golden check in float64

FORMULATIONS = {
    "paper": "pytorch (paper's way: conv2d E-step, grouped conv3d M-step)",
    "conv2d": "pytorch (conv2d E-step, M-step as one conv2d over the batch)",
    "wgrad": "pytorch (conv2d E-step, M-step as conv2d's weight gradient, convolution_backward)",
    "unfold": "pytorch (unfold, E-step and M-step as one GEMM each)",
}
AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def e_step(xb, theta, p):
    """The paper's E-step: L (Nb,K,Ho,Wo), logp (Nb,), gamma (Nb,K,Ho,Wo)."""
    bias = -0.5 * (theta ** 2).sum((1, 2, 3))
    L = F.conv2d(xb, theta, bias=bias, padding=p)
    logp = torch.logsumexp(L.flatten(1), 1)
    gamma = L - logp[:, None, None, None]
    return L, logp, gamma


def m_step(xb, gamma, p, w):
    """The paper's M-step: T (K,C,w,w) and B (K,) for one batch, grouped conv3d, one group per image."""
    nb, c, h, wd = xb.shape
    k, ho, wo = gamma.shape[1], gamma.shape[2], gamma.shape[3]
    post = torch.exp(gamma)
    xpad = F.pad(xb, (p, p, p, p)) if p > 0 else xb
    hp, wp = h + 2 * p, wd + 2 * p
    inp = xpad.reshape(1, nb, c, hp, wp)
    weight = post.reshape(nb * k, 1, 1, ho, wo)
    out = F.conv3d(inp, weight, groups=nb)  # (1, nb*k, c, w, w)
    T = out.reshape(nb, k, c, w, w).sum(0)
    B = post.sum((0, 2, 3))
    return T, B


class Step:
    """One formulation's per-batch E-step and M-step, with the knobs (autocast, channels-last).

    e(xb, theta) -> (L, logp, gamma, aux) in the formulation's own layout (canon() turns L and
    gamma into (Nb, K, Ho, Wo)); m(xb, gamma, aux) -> (T (K,C,w,w), B (K,)); batch() does both
    and is what --compile compiles. With autocast off and channels-last off, "paper" runs exactly
    e_step and m_step above.
    """

    def __init__(self, form, p, w, device_type, autocast=None, channels_last=False):
        self.form, self.p, self.w = form, p, w
        self.dev, self.ac, self.cl = device_type, autocast, channels_last
        self.run = self.batch
        self.compiled = False

    def compile(self, mode):
        self.compiled = True
        self.run = torch.compile(self.batch, mode=None if mode == "default" else mode,
                                 dynamic=False)

    def prep(self, x):
        """The data's layout, set once before timing (host data stays pinned)."""
        if not self.cl:
            return x
        y = x.contiguous(memory_format=torch.channels_last)
        return y.pin_memory() if x.is_pinned() and not y.is_pinned() else y

    def _low(self):
        """The region that runs in the autocast type: convolutions and GEMMs only."""
        if self.ac is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dev, dtype=self.ac)

    def _fmt(self, t, dims=4):
        if not self.cl:
            return t.contiguous()
        return t.contiguous(memory_format=torch.channels_last if dims == 4 else torch.channels_last_3d)

    def _pad(self, xb):
        p = self.p
        return F.pad(xb, (p, p, p, p)) if p > 0 else xb

    # ---- E-step

    def e(self, xb, theta):
        if self.form == "unfold":
            return self._e_unfold(xb, theta)
        if self.ac is None and not self.cl:
            L, logp, gamma = e_step(xb, theta, self.p)
            return L, logp, gamma, None
        bias = -0.5 * (theta ** 2).sum((1, 2, 3))
        th = self._fmt(theta) if self.cl else theta
        if self.ac is None:
            L = F.conv2d(xb, th, bias=bias, padding=self.p)
        else:
            with self._low():
                L = F.conv2d(xb, th, padding=self.p)
            L = L.to(bias.dtype) + bias[:, None, None]
        logp = torch.logsumexp(L.flatten(1), 1)
        gamma = L - logp[:, None, None, None]
        return L, logp, gamma, None

    def _e_unfold(self, xb, theta):
        nb, c = xb.shape[0], xb.shape[1]
        k, w = theta.shape[0], self.w
        xpad = self._pad(xb)
        if self.cl:
            xpad = self._fmt(xpad)
        if self.ac is not None:  # cast once; autocast would cast the patches for each GEMM
            xpad = xpad.to(self.ac)
        cols = xpad.unfold(2, w, 1).unfold(3, w, 1)  # (Nb, C, Ho, Wo, w, w), a view
        ho, wo = cols.shape[2], cols.shape[3]
        patches = cols.permute(1, 4, 5, 0, 2, 3).reshape(c * w * w, nb * ho * wo)  # one gather
        bias = -0.5 * (theta ** 2).sum((1, 2, 3))
        th = theta.reshape(k, c * w * w)
        if self.ac is None:
            L = torch.addmm(bias[:, None], th, patches)
        else:
            with self._low():
                L = th @ patches
            L = L.to(bias.dtype) + bias[:, None]
        L = L.view(k, nb, ho * wo)
        logp = torch.logsumexp(L, dim=(0, 2))
        gamma = L - logp[None, :, None]
        return L, logp, gamma, (patches, ho, wo)

    def canon(self, t, aux):
        """L or gamma in (Nb, K, Ho, Wo)."""
        if self.form != "unfold":
            return t
        _, ho, wo = aux
        k, nb = t.shape[0], t.shape[1]
        return t.permute(1, 0, 2).reshape(nb, k, ho, wo)

    # ---- M-step

    def m(self, xb, gamma, aux):
        f = self.form
        if f == "paper" and self.ac is None and not self.cl:
            return m_step(xb, gamma, self.p, self.w)
        post = torch.exp(gamma)
        dt = post.dtype
        if f == "unfold":
            patches = aux[0]
            k = post.shape[0]
            post = post.reshape(k, -1)
            with self._low():
                T = post @ patches.t()  # (K, C*w*w)
            T = T.to(dt).reshape(k, xb.shape[1], self.w, self.w)
            return T, post.sum(1)
        B = post.sum((0, 2, 3))
        nb, c, h, wd = xb.shape
        k, ho, wo = post.shape[1], post.shape[2], post.shape[3]
        w = self.w
        if f == "paper":
            xpad = self._pad(xb)
            inp = self._fmt(xpad.reshape(1, nb, c, h + 2 * self.p, wd + 2 * self.p), 5)
            weight = self._fmt(post.reshape(nb * k, 1, 1, ho, wo), 5)
            with self._low():
                out = F.conv3d(inp, weight, groups=nb)  # (1, nb*k, c, w, w)
            T = out.to(dt).reshape(nb, k, c, w, w).sum(0)
        elif f == "conv2d":
            xt = self._fmt(self._pad(xb).transpose(0, 1))  # (C, Nb, Hp, Wp)
            pt = self._fmt(post.transpose(0, 1))  # (K, Nb, Ho, Wo)
            with self._low():
                out = F.conv2d(xt, pt)  # (C, K, w, w)
            T = out.to(dt).permute(1, 0, 2, 3)
        elif f == "wgrad":
            xin, g = xb, post
            if self.cl:
                xin, g = self._fmt(xin), self._fmt(g)
            if self.ac is not None:  # autocast has no rule for convolution_backward: cast by hand
                xin, g = xin.to(self.ac), g.to(self.ac)
            T = torch.nn.grad.conv2d_weight(xin, (k, c, w, w), g, padding=self.p).to(dt)
        else:
            raise ValueError(f"unknown formulation {f}")
        return T, B

    def batch(self, xb, theta):
        """One batch: T, B, logp (per image)."""
        L, logp, gamma, aux = self.e(xb, theta)
        del L
        T, B = self.m(xb, gamma, aux)
        return T, B, logp


def update(T, B):
    """theta = T / B' with B' = (B + 1/S) * S / (S + 1), S = sum B. Returns (theta, B')."""
    S = B.sum()
    counts = (B + 1.0 / S) * S / (S + 1.0)
    return T / counts[:, None, None, None], counts


def features(x, theta, step, batch):
    """f[n,k] = logsumexp over (h,w) of L[n,k,h,w]."""
    out = []
    for s in range(0, x.shape[0], batch):
        L, _, _, aux = step.e(x[s:s + batch], theta)
        out.append(torch.logsumexp(step.canon(L, aux).flatten(2), 2))
    return torch.cat(out, 0)


# --------------------------------------------------------------------------------------------
# timing helpers


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def run_epoch(x_all, theta, step, batch, device, acc_dtype, clock, split, on_device):
    """One pass over the data with theta fixed. Returns T, B, LL (acc_dtype) and the time split."""
    k, c, w = theta.shape[0], theta.shape[1], theta.shape[2]
    T_acc = torch.zeros((k, c, w, w), dtype=acc_dtype, device=device)
    B_acc = torch.zeros((k,), dtype=acc_dtype, device=device)
    LL_acc = torch.zeros((), dtype=acc_dtype, device=device)
    t_e = t_m = t_h2d = 0.0
    n = x_all.shape[0]
    for s in range(0, n, batch):
        if split:
            t0 = clock.now()
        xb = x_all[s:s + batch]
        if not on_device:
            xb = xb.to(device, non_blocking=True)
            if split:
                t1 = clock.now()
                t_h2d += t1 - t0
                t0 = t1
        if split:
            L, logp, gamma, aux = step.e(xb, theta)
            del L
            t1 = clock.now()
            t_e += t1 - t0
            t0 = t1
            T, B = step.m(xb, gamma, aux)
            del gamma, aux
        else:
            T, B, logp = step.run(xb, theta)
        T_acc += T.to(acc_dtype)
        B_acc += B.to(acc_dtype)
        LL_acc += logp.to(acc_dtype).sum()
        del T, B, logp
        if split:
            t1 = clock.now()
            t_m += t1 - t0
    return T_acc, B_acc, LL_acc, (t_e, t_m, t_h2d)


def reference_lls(x_all, theta0, p, w, batch, device, clock, on_device, epochs):
    """The LL of each epoch of the paper formulation in float32, TF32 off (untimed).

    Returns (list of LL, seconds)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        t0 = clock.now()
        step = Step("paper", p, w, device.type)
        theta = theta0.clone()
        lls = []
        for _ in range(epochs):
            T, B, LL, _ = run_epoch(x_all, theta, step, batch, device, torch.float64, clock,
                                    False, on_device)
            lls.append(float(LL))
            new_theta, _ = update(T, B)
            if not bool(torch.isfinite(new_theta).all()):
                break
            theta = new_theta.to(torch.float32)
        return lls, clock.now() - t0
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def make_step(args, p, w, device, float64=False):
    """The configured Step; float64 (the golden check) leaves autocast and compile out."""
    step = Step(args.formulation, p, w, device.type,
                None if float64 else AUTOCAST[args.autocast], args.channels_last)
    if args.compile and not float64:
        step.compile(args.compile)
    return step


def knobs(args):
    """The knobs in words, for the printed lines: "" when none is on."""
    on = []
    if args.autocast != "off":
        on.append(f"autocast {args.autocast}")
    if args.channels_last:
        on.append("channels-last")
    if args.compile:
        on.append(f"torch.compile {args.compile}")
    return f" ({', '.join(on)})" if on else ""


def warm(step, xb, theta, what):
    """Runs one batch through step.run; a failure of torch.compile ends the program in one line."""
    try:
        step.run(xb, theta)
    except Exception as e:  # noqa: BLE001: any compile failure, said in one line
        if not step.compiled:
            raise
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        sys.exit(f"--compile: torch.compile failed on this machine ({what}): "
                 f"{type(e).__name__}: {msg}")


# --------------------------------------------------------------------------------------------
# golden check


def check_golden(args, device):
    d = args.check_golden
    g = {name[:-4]: np.load(os.path.join(d, name)) for name in os.listdir(d) if name.endswith(".npy")}
    need = ["X", "theta0", "L", "logp", "gamma", "B", "T", "LL", "counts", "theta1",
            "features_init", "features"]
    missing = [n for n in need if n not in g]
    if missing:
        print(f"FAIL: {d} lacks {missing}")
        return 1
    X = torch.from_numpy(g["X"]).to(device, torch.float64)
    theta0 = torch.from_numpy(g["theta0"]).to(device, torch.float64)
    n, c, h, _ = X.shape
    k, _, w, _ = theta0.shape
    ho = g["L"].shape[2]
    p = (ho - h + w - 1) // 2
    print(f"golden {d}: N={n} C={c} H={h} K={k} w={w} p={p} (Ho={ho}), float64 on {device}, "
          f"formulation {args.formulation}{', channels-last' if args.channels_last else ''}")
    tol = args.golden_tol
    ok = True

    def cmp(name, got, ref):
        nonlocal ok
        got = np.asarray(got.detach().cpu().numpy() if torch.is_tensor(got) else got, np.float64)
        ref = np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            print(f"  {name:14s} shape {got.shape} != {ref.shape}  FAIL")
            ok = False
            return
        scale = max(float(np.max(np.abs(ref))), 1e-300)
        err = float(np.max(np.abs(got - ref))) if got.size else 0.0
        rel = err / scale
        # element-wise relative error, for information (entries far below the array's scale,
        # e.g. a kernel with almost no mass, are judged by the scale of their array)
        elem = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300))) if got.size else 0.0
        good = bool(np.all(np.isfinite(got))) and rel <= tol
        ok = ok and good
        print(f"  {name:18s} max|err|/max|ref| = {rel:.3e}   max elementwise rel = {elem:.3e}"
              f"  {'ok' if good else 'FAIL'}")

    # The single-batch pass, exactly as a training epoch runs it, in the chosen formulation
    # (autocast and compile do not apply to float64; the float32 line below has them).
    step = make_step(args, p, w, device, float64=True)
    X = step.prep(X)
    L, logp, gamma, aux = step.e(X, theta0)
    cmp("L", step.canon(L, aux), g["L"])
    cmp("logp", logp, g["logp"])
    cmp("gamma", step.canon(gamma, aux), g["gamma"])
    clock = Clock(device)
    for batch in sorted({n, args.golden_batch}):
        T, B, LL, _ = run_epoch(X, theta0, step, batch, device, torch.float64, clock, False, True)
        theta1, counts = update(T, B)
        tag = f"[batch {batch}]"
        cmp(f"B {tag}", B, g["B"])
        cmp(f"T {tag}", T, g["T"])
        cmp(f"LL {tag}", LL, g["LL"])
        cmp(f"counts {tag}", counts, g["counts"])
        cmp(f"theta1 {tag}", theta1, g["theta1"])
    cmp("features_init", features(X, theta0, step, n), g["features_init"])
    cmp("features", features(X, theta1, step, n), g["features"])
    # For information only: the float32 benchmark path (float64 accumulation), as timed runs use,
    # with every knob given (autocast, channels-last, compile).
    step32 = make_step(args, p, w, device)
    X32, th32 = step32.prep(X.float()), theta0.float()
    if step32.compiled:
        for s in range(0, n, args.golden_batch):
            warm(step32, X32[s:s + args.golden_batch], th32, "golden case")
    T, B, LL, _ = run_epoch(X32, th32, step32, args.golden_batch, device, torch.float64, clock,
                            False, True)
    theta1_32, _ = update(T, B)
    rel = float((theta1_32 - torch.from_numpy(g["theta1"]).to(device)).abs().max()
                / np.abs(g["theta1"]).max())
    print(f"  (info) float32 path{knobs(args)}, batch {args.golden_batch}: theta1 max|err|/max|ref| = {rel:.3e}"
          f", LL rel err = {abs(float(LL) - float(g['LL'])) / abs(float(g['LL'])):.3e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------


def set_tf32(on):
    # The classic flags (what the paper's era of code sees); torch 2.9+ maps them onto its
    # fp32_precision settings, which are read back and reported too.
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    info = {
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    try:
        info["cudnn.conv.fp32_precision"] = str(torch.backends.cudnn.conv.fp32_precision)
        info["cuda.matmul.fp32_precision"] = str(torch.backends.cuda.matmul.fp32_precision)
    except Exception:  # older torch: no fp32_precision API
        pass
    return info


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="IDX (.gz or raw, MNIST format, uint8 scaled /255) or .npy "
                    "float32 (N,C,H,W) / (N,H,W); omitted: random uniform [0,1) images of --shape")
    ap.add_argument("--images", type=int, default=0,
                    help="take the first N images (random data: how many; default 1000)")
    ap.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"),
                    help="shape of the random images when --data is omitted (default 1 28 28)")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS),
                    help="sets K, w, p, batch: mnist 64,20,2,1000; stl10 200,15,0,200 "
                    "(explicit --kernels/--width/--pad/--batch override it)")
    ap.add_argument("--kernels", type=int, help="K (default 64)")
    ap.add_argument("--width", type=int, help="kernel width w (default 20)")
    ap.add_argument("--pad", type=int, help="zero padding p (default 2)")
    ap.add_argument("--batch", type=int, help="images per mini-batch (default 1000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed for theta ~ N(0,1) (torch.Generator)")
    ap.add_argument("--init", help="initial theta from a .npy (K,C,w,w)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--tf32", choices=["on", "off"], default="off",
                    help="allow TF32 in cuDNN convolutions and cuBLAS matmuls (default off; "
                    "PyTorch's own default allows it for cuDNN)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="set torch.backends.cudnn.benchmark (default off, as the paper's code)")
    ap.add_argument("--formulation", choices=list(FORMULATIONS), default="paper",
                    help="how the E-step and M-step are computed (the module's header has the "
                    "math): paper (default: conv2d E-step, grouped conv3d M-step, as the paper's "
                    "code), conv2d (M-step as one conv2d over the batch), wgrad (M-step as "
                    "conv2d's weight gradient, aten.convolution_backward), unfold (im2col, both "
                    "steps as one GEMM each)")
    ap.add_argument("--channels-last", action="store_true",
                    help="channels-last (NHWC; conv3d: NDHWC) operands for the convolutions; "
                    "the data is converted once, untimed (for unfold it only changes the layout "
                    "the patches are gathered from)")
    ap.add_argument("--autocast", choices=list(AUTOCAST), default="off",
                    help="run the convolutions/GEMMs only under torch.autocast in bf16 or fp16 "
                    "(wgrad: its operands cast by hand, autocast having no rule for "
                    "convolution_backward; unfold: the patches cast once); the bias, logsumexp, "
                    "exp and every accumulation stay float32 (default off)")
    ap.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                    choices=["default", "reduce-overhead", "max-autotune",
                             "max-autotune-no-cudagraphs"],
                    help="torch.compile the per-batch step (E-step and M-step as one function, "
                    "dynamic=False) in MODE: default (--compile alone), reduce-overhead, max-autotune or "
                    "max-autotune-no-cudagraphs; the warm-up runs it on "
                    "every batch shape of the epoch first, untimed, so compile time is never "
                    "timed; implies --warmup and --no-split; a compile failure ends the run with "
                    "a one-line message")
    ap.add_argument("--ll-reference", choices=["auto", "on", "off"], default="auto",
                    help="after the timed epochs, run the paper formulation in float32, TF32 off, "
                    "untimed, on the same data from the same theta for as many epochs, and report "
                    "each epoch's |LL - LL_ref| / |LL_ref| (auto, the default: on unless the run "
                    "is the paper formulation in float32 with no knob on)")
    ap.add_argument("--ll-tol", type=float, default=1e-5,
                    help="the run agrees with the reference when the relative LL difference is "
                    "at most this in every epoch (default 1e-5, the contract for a tensor-core "
                    "path)")
    ap.add_argument("--warmup", action="store_true", help="run one untimed batch first")
    ap.add_argument("--no-split", action="store_true",
                    help="no synchronised E/M timers inside the epoch (pure wall clock)")
    ap.add_argument("--host-data", action="store_true",
                    help="keep the images on the host (pinned) and copy each batch (timed); by "
                    "default they are moved to the device once, before timing, if they take "
                    "under half its free memory")
    ap.add_argument("--out-theta", help="write the final theta (float32 .npy)")
    ap.add_argument("--json", help="write per-epoch results to this JSON file")
    ap.add_argument("--check-golden", metavar="DIR",
                    help="run one float64 EM iteration on the golden case in DIR, compare, exit")
    ap.add_argument("--golden-tol", type=float, default=1e-10)
    ap.add_argument("--golden-batch", type=int, default=4,
                    help="also check accumulation across batches of this size (default 4)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch.cuda.is_available() is False")
    tf32 = set_tf32(args.tf32 == "on")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)

    if args.check_golden:
        sys.exit(check_golden(args, device))

    k, w, p, batch = PROTOCOLS.get(args.protocol, (64, 20, 2, 1000))
    k = args.kernels or k
    w = args.width or w
    p = args.pad if args.pad is not None else p
    batch = args.batch or batch

    x_np, desc = load_images(args)
    n, c, h, wd = x_np.shape
    ho, wo = h + 2 * p - w + 1, wd + 2 * p - w + 1
    if ho < 1 or wo < 1:
        sys.exit(f"kernel {w} with pad {p} does not fit {h}x{wd} images")

    if args.init:
        theta0 = np.load(args.init).astype(np.float32)
        if theta0.shape != (k, c, w, w):
            sys.exit(f"--init {args.init}: shape {theta0.shape}, expected {(k, c, w, w)}")
        theta = torch.from_numpy(theta0).to(device)
        init_desc = args.init
    else:
        gen = torch.Generator().manual_seed(args.seed)
        theta = torch.randn((k, c, w, w), generator=gen, dtype=torch.float32).to(device)
        init_desc = f"N(0,1), torch.Generator seed {args.seed}"

    x_cpu = torch.from_numpy(x_np)
    if device.type == "cpu":
        on_device = True
    elif args.host_data:
        on_device = False
    else:  # the whole data set on the device (untimed upload) when it takes under half its free memory
        on_device = x_np.nbytes <= 0.5 * torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        x_all = x_cpu
    elif on_device:
        x_all = x_cpu.to(device)
    else:
        x_all = x_cpu.pin_memory()
    x_ref = x_all  # the reference run's data, in the default layout
    theta_init = theta.clone()

    step = make_step(args, p, w, device)
    x_all = step.prep(x_all)
    plain = args.formulation == "paper" and knobs(args) == "" and args.tf32 == "off"
    do_ref = args.ll_reference == "on" or (args.ll_reference == "auto" and not plain)

    flops_step = 2.0 * n * k * ho * wo * c * w * w
    dev_name = device_name(device)
    print(f"torch {torch.__version__}, numpy {np.__version__}, device {device}: {dev_name}")
    if device.type == "cuda":
        print(f"TF32 {args.tf32}: {tf32}; cudnn.benchmark {torch.backends.cudnn.benchmark}")
    else:
        print(f"CPU threads {torch.get_num_threads()}; TF32 flag {args.tf32} (no effect on CPU)")
    print(f"data: {desc}: N={n} C={c} H={h} W={wd}"
          f"{'' if device.type == 'cpu' else (', on device' if on_device else ', host-pinned, copied per batch')}")
    print(f"layer: K={k} w={w} p={p} -> Ho={ho} Wo={wo}; batch {batch}; init {init_desc}")
    print(f"cost: {flops_step / 1e9:.1f} GFLOP per step, {2 * flops_step / 1e9:.1f} per epoch")
    print(f"formulation {args.formulation}: {FORMULATIONS[args.formulation]}{knobs(args)}; "
          f"LL reference {'on' if do_ref else 'off'}")

    clock = Clock(device)
    if args.warmup or step.compiled:
        # compiled: every batch shape of the epoch (a short last batch is a second graph)
        sizes = [min(batch, n)]
        if step.compiled and n > batch and n % batch:
            sizes.append(n % batch)
        for nb in sizes:
            t0 = clock.now()
            xb = x_all[:nb].to(device)
            warm(step, xb, theta, f"batch of {nb}")
            del xb
            what = f"warm-up batch{' (compile)' if step.compiled else ''}"
            print(f"{what}: {clock.now() - t0:.3f} s (untimed){'' if len(sizes) == 1 else f', {nb} images'}")

    split = not args.no_split and not step.compiled
    hdr = f"{'epoch':>5} {'LL':>16} {'LL/image':>12} {'seconds':>9} {'GFLOP/s':>9}"
    if split:
        hdr += f" {'E s':>8} {'E GF/s':>8} {'M s':>8} {'M GF/s':>8}"
        if not on_device:
            hdr += f" {'h2d s':>7}"
    print(hdr)
    epochs = []
    status = "ok"
    prev_ll = None
    for e in range(1, args.epochs + 1):
        t0 = clock.now()
        T, B, LL, (te, tm, th) = run_epoch(x_all, theta, step, batch, device, torch.float64,
                                           clock, split, on_device)
        new_theta, counts = update(T, B)
        finite = bool(torch.isfinite(T).all() and torch.isfinite(B).all()
                      and torch.isfinite(LL) and torch.isfinite(new_theta).all())
        if finite:
            theta = new_theta.to(torch.float32)
        secs = clock.now() - t0
        ll = float(LL)
        gfs = 2 * flops_step / secs / 1e9
        rec = {"epoch": e, "loglik": ll, "loglik_per_image": ll / n, "seconds": secs,
               "gflops": gfs, "finite": finite}
        line = f"{e:>5} {ll:>16.6f} {ll / n:>12.6f} {secs:>9.3f} {gfs:>9.1f}"
        if split:
            rec.update({"estep_seconds": te, "mstep_seconds": tm,
                        "estep_gflops": flops_step / te / 1e9 if te > 0 else None,
                        "mstep_gflops": flops_step / tm / 1e9 if tm > 0 else None})
            line += f" {te:>8.3f} {flops_step / te / 1e9:>8.1f} {tm:>8.3f} {flops_step / tm / 1e9:>8.1f}"
            if not on_device:
                rec["h2d_seconds"] = th
                line += f" {th:>7.3f}"
        if prev_ll is not None and math.isfinite(ll) and ll < prev_ll - 1e-6 * abs(prev_ll):
            rec["ll_decreased"] = True
            line += "  (LL decreased)"
        print(line, flush=True)
        epochs.append(rec)
        if not finite:
            status = f"numerical precision limit reached at epoch {e}"
            print(f"{status}; keeping the theta of the last finite epoch")
            break
        prev_ll = ll

    # LL agreement with the paper formulation in float32 (untimed: after the timed epochs).
    ref = None
    if do_ref and epochs:
        lls, ref_s = reference_lls(x_ref, theta_init, p, w, batch, device, clock, on_device,
                                   len(epochs))
        print(f"LL reference: paper formulation, float32, TF32 off, same data and initial theta "
              f"({ref_s:.3f} s, untimed); it agrees when |LL - LL_ref| / |LL_ref| <= {args.ll_tol:g} in "
              f"every epoch")
        print(f"{'epoch':>5} {'LL':>16} {'LL_ref':>16} {'rel diff':>10}")
        worst = 0.0
        agree = len(lls) == len(epochs)
        for rec, ll_ref in zip(epochs, lls):
            ll = rec["loglik"]
            rel = abs(ll - ll_ref) / abs(ll_ref) if ll_ref != 0 else (0.0 if ll == 0 else math.inf)
            if not math.isfinite(rel):
                rel = math.inf
            ok = rel <= args.ll_tol
            rec.update({"loglik_ref": ll_ref, "loglik_rel_diff": rel, "ll_agrees": ok})
            worst = max(worst, rel)
            agree = agree and ok
            print(f"{rec['epoch']:>5} {ll:>16.6f} {ll_ref:>16.6f} {rel:>10.2e}"
                  f"{'' if ok else '  (disagrees)'}")
        ref = {"ll_reference": "paper formulation, float32, TF32 off, no autocast, same data and "
                               "initial theta, untimed",
               "ll_criterion": f"|LL - LL_ref| / |LL_ref| <= {args.ll_tol:g} in every epoch",
               "ll_tol": args.ll_tol, "ll_max_rel_diff": worst, "ll_agrees": bool(agree),
               "reference_seconds": ref_s, "reference_epochs": len(lls)}
    if ref is not None or not plain:
        best = min(epochs, key=lambda r: r["seconds"]) if epochs else None
        agreement = ("" if ref is None else
                     f"; LL max rel diff {ref['ll_max_rel_diff']:.2e}: "
                     f"{'agrees' if ref['ll_agrees'] else 'DOES NOT agree'} (<= {args.ll_tol:g})")
        print(f"summary: {args.formulation}{knobs(args)}, TF32 {args.tf32}, cudnn.benchmark "
              f"{torch.backends.cudnn.benchmark}: "
              + (f"best {best['seconds']:.4f} s/epoch, {best['gflops']:.1f} GFLOP/s"
                 if best else "no epoch") + agreement)

    if args.out_theta:
        np.save(args.out_theta, theta.detach().cpu().numpy().astype(np.float32))
    if args.json:
        secs = [r["seconds"] for r in epochs]
        out = {
            "implementation": FORMULATIONS[args.formulation] + knobs(args),
            "formulation": args.formulation, "autocast": args.autocast,
            "channels_last": bool(args.channels_last), "compile": args.compile,
            "torch": torch.__version__, "numpy": np.__version__,
            "device": str(device), "device_name": dev_name,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "tf32": args.tf32, "tf32_flags": tf32 if device.type == "cuda" else None,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "data": desc, "N": n, "C": c, "H": h, "W": wd, "K": k, "w": w, "p": p,
            "Ho": ho, "Wo": wo, "batch": batch, "init": init_desc, "warmup": bool(args.warmup),
            "data_on_device": bool(on_device), "split_timers": split,
            "flops_per_step": flops_step, "flops_per_epoch": 2 * flops_step,
            "status": status, "epochs": epochs,
            "best_seconds": min(secs) if secs else None,
            "best_gflops": max(r["gflops"] for r in epochs) if epochs else None,
            "argv": sys.argv[1:],
        }
        out.update(ref or {"ll_reference": None})
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
