"""A fitted CALM layer as a ``torch.nn.Module`` (torch is imported only here).

The module computes what the library's features do (``crates/calm-gpu/src/cpu/fast.rs``):
the model's whitening filter (zero padding, same size), ``L = conv2d(pad(x, p), W) + b`` with
the prior's effective weights and bias, then the encoding pooled over each of ``G x G``
regions (rows ``a * Ho // G`` to ``(a + 1) * Ho // G``, columns alike), laid out
``(k, a, b)``:

- ``lse``: the log-sum-exp of ``L[k]`` over the region;
- ``triangle``: with ``d_k(u) = sqrt(max(0, ||x_u||^2 - 2 L[k, u]))``, the sum over the
  region of ``max(0, mean_j d_j(u) - d_k(u))``.

A model with contrast-normalised patches (``patch_norm`` eps) sees each patch ``x_u`` as
``z_u = (x_u - m_u) / s_u``, its mean ``m_u`` and ``s_u = sqrt(var_u + eps)`` over its
``C w w`` values: ``L = (conv2d(x, W) - m_u sum(W_k)) / s_u + b`` and
``||z_u||^2 = C w w var_u / s_u^2``, the moments summed by convolutions in float64.
"""

from __future__ import annotations

import numpy as np


def module(layer):
    """The ``torch.nn.Module`` of a native layer."""
    import torch
    import torch.nn.functional as F

    weight, bias, whiten = layer.conv_parts()
    meta = layer.meta()

    class CALMFeatures(torch.nn.Module):
        """CALM features: ``forward(x)`` of images ``(N, C, H, W)``, preprocessed as the
        training images were, is ``(N, K * G * G)``."""

        def __init__(self):
            super().__init__()
            self.pad = int(meta["pad"])
            self.grid = int(meta.get("pool") or 1)
            self.encode = meta.get("encode") or "lse"
            self.patch_norm = meta.get("patch_norm")
            self.register_buffer("weight", torch.from_numpy(np.array(weight)))
            self.register_buffer("bias", torch.from_numpy(np.array(bias)))
            if whiten is not None:
                self.register_buffer("whiten", torch.from_numpy(np.array(whiten)))
            else:
                self.whiten = None

        def extra_repr(self):
            k, c, w, _ = self.weight.shape
            return (
                f"kernels={k}, channels={c}, width={w}, pad={self.pad}, "
                f"grid={self.grid}, encode={self.encode!r}, whiten={self.whiten is not None}, "
                f"patch_norm={self.patch_norm}"
            )

        def forward(self, x):
            if x.dim() == 3:
                x = x.unsqueeze(1)
            x = x.to(self.weight.dtype)
            if self.whiten is not None:
                ww = self.whiten.shape[-1]
                lo, hi = ww // 2, ww - 1 - ww // 2
                x = F.conv2d(F.pad(x, (lo, hi, lo, hi)), self.whiten)
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            c, w = self.weight.shape[1], self.weight.shape[-1]
            ones = torch.ones((1, c, w, w), dtype=xp.dtype, device=xp.device)
            bias = self.bias[None, :, None, None]
            big_l = F.conv2d(xp, self.weight)
            if self.patch_norm is not None:
                r = float(c * w * w)
                xd = xp.double()
                mean = F.conv2d(xd, ones.double()) / r
                var = torch.clamp(F.conv2d(xd * xd, ones.double()) / r - mean * mean, min=0.0)
                inv_s = 1.0 / torch.sqrt(var + float(self.patch_norm))
                ksum = self.weight.double().sum(dim=(1, 2, 3))[None, :, None, None]
                big_l = ((big_l.double() - mean * ksum) * inv_s).to(xp.dtype) + bias
                norm = (r * var * inv_s * inv_s).to(xp.dtype)
            else:
                big_l = big_l + bias
                norm = F.conv2d(xp * xp, ones)
            if self.encode == "triangle":
                d = torch.sqrt(torch.clamp(norm - 2.0 * big_l, min=0.0))
                enc = torch.relu(d.mean(dim=1, keepdim=True) - d)
            else:
                enc = big_l
            ho, wo = big_l.shape[-2:]
            g = self.grid
            cells = []
            for a in range(g):
                for b in range(g):
                    r = enc[..., a * ho // g : (a + 1) * ho // g, b * wo // g : (b + 1) * wo // g]
                    r = r.flatten(-2)
                    if self.encode == "triangle":
                        cells.append(r.sum(dim=-1))
                    else:
                        cells.append(torch.logsumexp(r, dim=-1))
            # (N, K, G * G) -> (N, K * G * G), the layout (k, a, b).
            return torch.stack(cells, dim=-1).flatten(1)

    return CALMFeatures()
