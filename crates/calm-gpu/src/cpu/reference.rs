//! The CPU reference: SPEC.md's formulas as plain loops, in f64. Each function is the twin of one
//! GPU kernel (named in its doc) and is what `validate` and the tests compare the GPU against.
//! It is written for clarity, not speed; [`super::fast`] is the CPU engine users run.

use crate::geometry::Geometry;
use crate::prior::Prior;

/// Twin of `shaders/estep.wgsl`:
/// `L[n,k,h,w] = sum_{c,i,j} theta[k,c,i,j] Xpad[n,c,h+i,w+j] + bias[k]`, laid out
/// `(n, k, h, w)`.
///
/// With [`Geometry::patch_norm`] the patch `x_u` is `(x_u - m_u) / s_u` (its mean `m_u`, and
/// `s_u = sqrt(var_u + eps)`, from [`patch_moments`]): computed here the other way round from
/// the engines, which normalise each patch before the product, as
/// `(theta_k . x_u - m_u sum(theta_k)) / s_u + bias[k]`.
pub fn estep(g: &Geometry, xpad: &[f32], n: usize, theta: &[f32]) -> Vec<f64> {
    let b = g.bias(theta);
    let (k_, kw, p_) = (g.k, g.kw, g.positions());
    let mut l = vec![0f64; n * k_ * p_];
    for img in 0..n {
        for k in 0..k_ {
            for h in 0..g.ho {
                for w in 0..g.wo {
                    let mut acc = b[k];
                    for c in 0..g.c {
                        for i in 0..kw {
                            for j in 0..kw {
                                let t = theta[((k * g.c + c) * kw + i) * kw + j] as f64;
                                let x =
                                    xpad[((img * g.c + c) * g.hp + h + i) * g.wp + w + j] as f64;
                                acc += t * x;
                            }
                        }
                    }
                    l[(img * k_ + k) * p_ + h * g.wo + w] = acc;
                }
            }
        }
    }
    if let Some(mom) = patch_moments(g, xpad, n) {
        let r = g.r();
        for img in 0..n {
            for k in 0..k_ {
                let sum: f64 = theta[k * r..(k + 1) * r].iter().map(|&t| t as f64).sum();
                for u in 0..p_ {
                    let (m, sd) = mom[img * p_ + u];
                    let v = &mut l[(img * k_ + k) * p_ + u];
                    *v = (*v - b[k] - m * sum) / sd + b[k];
                }
            }
        }
    }
    l
}

/// The mean `m_u` and `s_u = sqrt(var_u + eps)` of every patch, `(n, P)`, in f64, when the
/// layer contrast-normalises its patches ([`Geometry::patch_norm`]); `None` otherwise.
pub fn patch_moments(g: &Geometry, xpad: &[f32], n: usize) -> Option<Vec<(f64, f64)>> {
    let eps = g.patch_norm? as f64;
    let r = g.r() as f64;
    let mut out = Vec::with_capacity(n * g.positions());
    for img in 0..n {
        let x = &xpad[img * g.padded_len()..(img + 1) * g.padded_len()];
        for h in 0..g.ho {
            for w in 0..g.wo {
                let vals: Vec<f64> = g
                    .patch_offsets()
                    .map(|o| x[h * g.wp + w + o] as f64)
                    .collect();
                let m = vals.iter().sum::<f64>() / r;
                let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / r;
                out.push((m, (var + eps).sqrt()));
            }
        }
    }
    Some(out)
}

/// Numerically stable `log(sum(exp(v)))`.
pub fn logsumexp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Twin of `shaders/logsumexp.wgsl`: `logp[n] = logsumexp over (k,h,w) of L[n,k,h,w]`.
pub fn logp(g: &Geometry, l: &[f64], n: usize) -> Vec<f64> {
    let per = g.k * g.positions();
    (0..n)
        .map(|img| logsumexp(l[img * per..(img + 1) * per].iter().copied()))
        .collect()
}

/// [`logp`] for [`crate::engine::Posterior::Patch`]: `logp[n,u] = logsumexp over k of
/// L[n,k,u]`, laid out `(n, u)` (the CPU engine's twin; no GPU kernel has it yet).
pub fn logp_patches(g: &Geometry, l: &[f64], n: usize) -> Vec<f64> {
    let (k_, p_) = (g.k, g.positions());
    (0..n * p_)
        .map(|nu| {
            let (img, u) = (nu / p_, nu % p_);
            logsumexp((0..k_).map(move |k| l[(img * k_ + k) * p_ + u]))
        })
        .collect()
}

/// [`accumulate`] for [`crate::engine::Posterior::Patch`], with `logp` of [`logp_patches`]:
/// `gamma[n,k,u] = exp(L[n,k,u] - logp[n,u])`, `LL += sum_{n,u} logp[n,u]`.
pub fn accumulate_patches(
    g: &Geometry,
    xpad: &[f32],
    n: usize,
    l: &[f64],
    logp: &[f64],
    stats: &mut Stats,
) {
    let p_ = g.positions();
    stats.ll += logp[..n * p_].iter().sum::<f64>();
    accumulate_with(g, xpad, n, l, |img, u| logp[img * p_ + u], stats);
}

/// Twin of `shaders/features.wgsl`: `f[n,k] = logsumexp over (h,w) of L[n,k,h,w]`, laid out
/// `(n, k)`.
pub fn features(g: &Geometry, l: &[f64], n: usize) -> Vec<f64> {
    let p = g.positions();
    (0..n * g.k)
        .map(|nk| logsumexp(l[nk * p..(nk + 1) * p].iter().copied()))
        .collect()
}

/// Twin of `shaders/features.wgsl` with pooling: the log-sum-exp of `L` over each of
/// `grid x grid` regions (rows `[a Ho / grid, (a+1) Ho / grid)`, likewise columns), laid out
/// `(n, k, a, b)`. `grid = 1` is [`features`].
pub fn features_grid(g: &Geometry, l: &[f64], n: usize, grid: usize) -> Vec<f64> {
    let p = g.positions();
    let mut out = Vec::with_capacity(n * g.k * grid * grid);
    for nk in 0..n * g.k {
        let map = &l[nk * p..(nk + 1) * p];
        for a in 0..grid {
            for b in 0..grid {
                let (h0, h1) = (a * g.ho / grid, (a + 1) * g.ho / grid);
                let (w0, w1) = (b * g.wo / grid, (b + 1) * g.wo / grid);
                let vals = (h0..h1).flat_map(|h| (w0..w1).map(move |w| map[h * g.wo + w]));
                out.push(logsumexp(vals));
            }
        }
    }
    out
}

/// `||x_u||^2` of every patch, `(n, P)`: the squared norm of the padded image's `C x w x w`
/// window at each position (twin of `shaders/tri_mean.wgsl`'s first loop); of the normalised
/// patch, `R var_u / (var_u + eps)`, with [`Geometry::patch_norm`].
pub fn patch_norms(g: &Geometry, xpad: &[f32], n: usize) -> Vec<f64> {
    if let Some(mom) = patch_moments(g, xpad, n) {
        let eps = g.patch_norm.expect("moments need it") as f64;
        let r = g.r() as f64;
        return mom
            .iter()
            .map(|&(_, sd)| r * (sd * sd - eps) / (sd * sd))
            .collect();
    }
    let mut out = Vec::with_capacity(n * g.positions());
    for img in 0..n {
        let x = &xpad[img * g.padded_len()..(img + 1) * g.padded_len()];
        for h in 0..g.ho {
            for w in 0..g.wo {
                let mut s = 0f64;
                for c in 0..g.c {
                    for i in 0..g.kw {
                        for j in 0..g.kw {
                            let v = x[(c * g.hp + h + i) * g.wp + w + j] as f64;
                            s += v * v;
                        }
                    }
                }
                out.push(s);
            }
        }
    }
    out
}

/// Twin of `shaders/tri_mean.wgsl` and `shaders/features_tri.wgsl`: the triangle encoding
/// (Coates, Lee & Ng 2011) of the model's per-patch likelihoods, pooled by sums over the same
/// `grid x grid` regions as [`features_grid`], laid out `(n, k, a, b)`.
///
/// `d_k(u) = sqrt(||x_u||^2 - 2 L_k(u)) = ||x_u - theta_k||` is the distance of patch `u` to
/// kernel `k` (`-0.5 d^2` is the patch's log likelihood under kernel `k`, up to a constant),
/// and `t_k(u) = max(0, mean_j d_j(u) - d_k(u))` is how much closer than average it is.
pub fn features_triangle(
    g: &Geometry,
    l: &[f64],
    norms: &[f64],
    n: usize,
    grid: usize,
) -> Vec<f64> {
    let (k, p) = (g.k, g.positions());
    // t laid out like L, (n, k, P), then summed over regions as features_grid sums exp(L).
    let mut t = vec![0f64; n * k * p];
    for img in 0..n {
        for u in 0..p {
            let d: Vec<f64> = (0..k)
                .map(|kk| {
                    (norms[img * p + u] - 2.0 * l[(img * k + kk) * p + u])
                        .max(0.0)
                        .sqrt()
                })
                .collect();
            let mean = d.iter().sum::<f64>() / k as f64;
            for (kk, dk) in d.iter().enumerate() {
                t[(img * k + kk) * p + u] = (mean - dk).max(0.0);
            }
        }
    }
    let mut out = Vec::with_capacity(n * k * grid * grid);
    for map in t.chunks_exact(p) {
        for a in 0..grid {
            for b in 0..grid {
                let (h0, h1) = (a * g.ho / grid, (a + 1) * g.ho / grid);
                let (w0, w1) = (b * g.wo / grid, (b + 1) * g.wo / grid);
                out.push(
                    (h0..h1)
                        .flat_map(|h| (w0..w1).map(move |w| map[h * g.wo + w]))
                        .sum(),
                );
            }
        }
    }
    out
}

/// Sufficient statistics of one EM epoch, accumulated in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Counts `B[k] = sum_{n,h,w} exp(gamma[n,k,h,w])`.
    pub b: Vec<f64>,
    /// `T[k,c,i,j] = sum_{n,h,w} exp(gamma[n,k,h,w]) Xpad[n,c,h+i,w+j]`, laid out `(k, c, i, j)`.
    pub t: Vec<f64>,
    /// `LL = sum_n logp[n]`.
    pub ll: f64,
}

impl Stats {
    /// All-zero statistics for `g`: `B` of length K, `T` of `K * R`, `LL = 0`.
    pub fn zeros(g: &Geometry) -> Self {
        Self {
            b: vec![0.0; g.k],
            t: vec![0.0; g.k * g.r()],
            ll: 0.0,
        }
    }
}

/// Twin of `shaders/mstep.wgsl` + `shaders/reduce_stats.wgsl`: adds one batch's `B`, `T` and `LL`
/// into `stats`, given the batch's `L` and `logp`.
pub fn accumulate(
    g: &Geometry,
    xpad: &[f32],
    n: usize,
    l: &[f64],
    logp: &[f64],
    stats: &mut Stats,
) {
    // One image at a time into LL, in image order (as the loops always added it).
    logp[..n].iter().for_each(|v| stats.ll += v);
    accumulate_with(g, xpad, n, l, |img, _| logp[img], stats);
}

/// `B` and `T` of one batch under the posteriors `gamma[n,k,u] = exp(L[n,k,u] - logp(n, u))`
/// (`u = h Wo + w`), shared by both normalisations ([`accumulate`], [`accumulate_patches`]).
fn accumulate_with(
    g: &Geometry,
    xpad: &[f32],
    n: usize,
    l: &[f64],
    logp: impl Fn(usize, usize) -> f64,
    stats: &mut Stats,
) {
    let (k_, kw, p_, r) = (g.k, g.kw, g.positions(), g.r());
    // The normalised patch is (x - m_u) / s_u ([`patch_moments`]); raw patches: m 0, s 1.
    let mom = patch_moments(g, xpad, n);
    for img in 0..n {
        for k in 0..k_ {
            for h in 0..g.ho {
                for w in 0..g.wo {
                    let u = h * g.wo + w;
                    let (m, sd) = mom.as_ref().map_or((0.0, 1.0), |v| v[img * p_ + u]);
                    let gam = (l[(img * k_ + k) * p_ + u] - logp(img, u)).exp();
                    stats.b[k] += gam;
                    for c in 0..g.c {
                        for i in 0..kw {
                            for j in 0..kw {
                                let x =
                                    xpad[((img * g.c + c) * g.hp + h + i) * g.wp + w + j] as f64;
                                stats.t[k * r + (c * kw + i) * kw + j] += gam * (x - m) / sd;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The end-of-epoch update (twin of `shaders/update.wgsl`).
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// New weights `theta = T / B'`, `(k, c, i, j)`.
    pub theta: Vec<f64>,
    /// `B'[k] = (B[k] + 1/S) * S / (S + 1)` with `S = sum_k B[k]`.
    pub counts: Vec<f64>,
    /// `S = sum_k B[k]` (equals the number of images up to rounding).
    pub count_sum: f64,
}

impl Update {
    /// True when every statistic and the new weights are finite (SPEC's stopping rule).
    pub fn is_finite(&self) -> bool {
        self.count_sum.is_finite()
            && self.counts.iter().all(|v| v.is_finite())
            && self.theta.iter().all(|v| v.is_finite())
    }
}

/// SPEC's end-of-epoch update from an epoch's statistics: `B'` with the pseudo count, then
/// `theta = T / B'`.
pub fn update(g: &Geometry, stats: &Stats) -> Update {
    let r = g.r();
    let s: f64 = stats.b.iter().sum();
    let counts: Vec<f64> = stats
        .b
        .iter()
        .map(|&b| (b + 1.0 / s) * s / (s + 1.0))
        .collect();
    let theta = (0..g.k * r).map(|e| stats.t[e] / counts[e / r]).collect();
    Update {
        theta,
        counts,
        count_sum: s,
    }
}

/// `L` under a prior's mixing weights and variance ([`Prior`]): `s L[n,k,u] + log(K pi_k)`, in
/// place, for `L` of [`estep`] (SPEC's bias included). A uniform prior leaves `L` as it is.
pub fn apply_prior(g: &Geometry, l: &mut [f64], n: usize, prior: &Prior) {
    let p = g.positions();
    let s = prior.inv_var as f64;
    for (i, row) in l[..n * g.k * p].chunks_exact_mut(p).enumerate() {
        let w = prior.log_weight[i % g.k] as f64;
        row.iter_mut().for_each(|v| *v = s * *v + w);
    }
}

/// One whole EM epoch over `x` (`n` unpadded images) in batches of `batch`: returns the epoch's
/// statistics (under `theta`) and the update. The slow, obviously-correct path.
pub fn epoch(g: &Geometry, x: &[f32], n: usize, theta: &[f32], batch: usize) -> (Stats, Update) {
    epoch_with_prior(g, x, n, theta, &Prior::uniform(g.k), batch)
}

/// [`epoch`] with `L` under `prior` (its `LL` is the engines': `sum_n logsumexp L`, without the
/// terms [`Prior::loglik`] adds).
pub fn epoch_with_prior(
    g: &Geometry,
    x: &[f32],
    n: usize,
    theta: &[f32],
    prior: &Prior,
    batch: usize,
) -> (Stats, Update) {
    let per = g.c * g.h * g.w;
    let mut stats = Stats::zeros(g);
    let mut start = 0;
    while start < n {
        let nb = batch.min(n - start);
        let xpad = g.pad_images(&x[start * per..(start + nb) * per], nb);
        let mut l = estep(g, &xpad, nb, theta);
        apply_prior(g, &mut l, nb, prior);
        let lp = logp(g, &l, nb);
        accumulate(g, &xpad, nb, &l, &lp, &mut stats);
        start += nb;
    }
    let up = update(g, &stats);
    (stats, up)
}
