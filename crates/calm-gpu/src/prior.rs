//! Mixing weights over kernels and a shared variance (issue 6's options; SPEC's protocol has
//! neither: uniform weights, unit variance).
//!
//! The generative story of SPEC.md with two more parameters: kernel `k` is picked with
//! probability `pi_k` (SPEC: `1/K`), and every pixel of the padded image has variance `sigma^2`
//! (SPEC: 1) around its mean (`theta_k` inside the patch, 0 outside). Up to terms that are the
//! same for every `(k, u)`, the joint log likelihood is then still a convolution with a bias:
//!
//! ```text
//! L[n,k,u] = s * (theta_k . x_u - 0.5 ||theta_k||^2) + log(K pi_k),     s = 1 / sigma^2
//! ```
//!
//! so every engine runs the same kernels on *effective* weights `s theta_k` and bias
//! `s (-0.5 ||theta_k||^2) + log(K pi_k)` ([`Prior::effective`]). With `s = 1` and uniform
//! weights this is SPEC's `L` exactly. The terms the E-step leaves out enter the epoch's log
//! likelihood ([`Prior::loglik`]), so that EM's guarantee (LL never decreases) holds for the
//! model with these parameters too.
//!
//! The M-step for them, given the epoch's counts `B`, `B'` and the updated `theta = T / B'`:
//! - weights: `pi_k = B'[k] / sum_j B'[j]`;
//! - variance: `sigma^2 = (SX - sum_k (2 B'[k] - B[k]) ||theta_k||^2) / (N D)`, the expected
//!   squared residual per pixel, with `SX = sum_n ||X_n||^2` and `D` pixels per padded image
//!   (for `B' = B` this is `(SX - sum_k B[k] ||theta_k||^2) / (N D)`). It is kept at or above
//!   [`MIN_VARIANCE`], as scikit-learn's `GaussianMixture` adds `reg_covar = 1e-6`, so that data
//!   fitted exactly cannot make `s` infinite.

use serde::{Deserialize, Serialize};

use crate::data::ImageSource;
use crate::error::Result;
use crate::geometry::Geometry;

/// The smallest variance the M-step returns (see the module's text).
pub const MIN_VARIANCE: f64 = 1e-6;

/// Which of the two parameters EM learns (both off: SPEC's protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorOptions {
    /// Learn the mixing weights `pi_k`.
    #[serde(default)]
    pub weights: bool,
    /// Learn the shared variance `sigma^2`.
    #[serde(default)]
    pub variance: bool,
}

impl PriorOptions {
    /// True when EM learns either parameter.
    pub fn any(self) -> bool {
        self.weights || self.variance
    }
}

/// The mixing weights and variance in the form the engines use, in f32 (as the model file keeps
/// them, so a resumed run continues from the same bits).
#[derive(Clone, Debug, PartialEq)]
pub struct Prior {
    /// `s = 1 / sigma^2`.
    pub inv_var: f32,
    /// `log(K pi_k)`, `(K)`: all zero for uniform weights.
    pub log_weight: Vec<f32>,
}

impl Prior {
    /// SPEC's: uniform weights, unit variance.
    pub fn uniform(k: usize) -> Self {
        Self {
            inv_var: 1.0,
            log_weight: vec![0.0; k],
        }
    }

    /// True for SPEC's prior: unit variance and uniform weights (every `log_weight` zero).
    pub fn is_uniform(&self) -> bool {
        self.inv_var == 1.0 && self.log_weight.iter().all(|&w| w == 0.0)
    }

    /// `sigma^2`.
    pub fn variance(&self) -> f64 {
        1.0 / self.inv_var as f64
    }

    /// The mixing weights `pi_k`.
    pub fn weights(&self) -> Vec<f64> {
        let k = self.log_weight.len() as f64;
        self.log_weight
            .iter()
            .map(|&w| (w as f64).exp() / k)
            .collect()
    }

    /// One line for people: the variance and the range of the weights.
    pub fn summary(&self) -> String {
        let w = self.weights();
        let (lo, hi) = w
            .iter()
            .fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
        format!(
            "variance {:.6} (SPEC: 1), mixing weights {lo:.4}..{hi:.4} (uniform: {:.4})",
            self.variance(),
            1.0 / w.len().max(1) as f64
        )
    }

    /// Checks the values a model file or a caller supplies.
    pub fn check(&self, k: usize) -> std::result::Result<(), String> {
        if self.log_weight.len() != k {
            return Err(format!(
                "{} mixing weights for {k} kernels",
                self.log_weight.len()
            ));
        }
        if !(self.inv_var.is_finite() && self.inv_var > 0.0) {
            return Err(format!(
                "inverse variance {} is not a positive number",
                self.inv_var
            ));
        }
        if let Some(w) = self.log_weight.iter().find(|w| !w.is_finite()) {
            return Err(format!("log mixing weight {w} is not finite"));
        }
        Ok(())
    }

    /// The effective weights `s theta`, `(K, R)`, and bias `s (-0.5 ||theta_k||^2) +
    /// log(K pi_k)`, `(K)`, that make the engines' `L` this prior's (computed in f64, rounded
    /// once). For a uniform prior these are `theta` and SPEC's bias, bit for bit.
    pub fn effective(&self, g: &Geometry, theta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let s = self.inv_var as f64;
        let bias = g.bias(theta);
        let b = bias
            .iter()
            .zip(&self.log_weight)
            .map(|(&b, &w)| (s * b + w as f64) as f32)
            .collect();
        if self.inv_var == 1.0 {
            return (theta.to_vec(), b);
        }
        let t = theta.iter().map(|&v| (s * v as f64) as f32).collect();
        (t, b)
    }

    /// The epoch's log likelihood from the engines' `sum_n logsumexp L` under this prior: adds
    /// the terms that are the same for every `(k, u)` but depend on `s`, relative to `s = 1`:
    /// `(1 - s) SX / 2 + N (D / 2) log s`. Zero for `s = 1`, so SPEC's LL is unchanged.
    pub fn loglik(&self, ll_lse: f64, sum_sq: f64, n: usize, g: &Geometry) -> f64 {
        if self.inv_var == 1.0 {
            return ll_lse;
        }
        let s = self.inv_var as f64;
        let d = (g.c * g.hp * g.wp) as f64;
        ll_lse + (1.0 - s) * sum_sq / 2.0 + n as f64 * d / 2.0 * s.ln()
    }

    /// The M-step for the learned parameters (the others keep their values in `self`), from the
    /// updated `theta`, its counts `B'` and `S = sum_k B[k]` of the epoch, `sum_sq = SX` and `n`
    /// images. Kernels in `fresh` (just re-seeded by revival) get the mean weight.
    #[allow(clippy::too_many_arguments)]
    pub fn learn(
        &self,
        opts: PriorOptions,
        g: &Geometry,
        theta: &[f32],
        counts: &[f32],
        count_sum: f64,
        sum_sq: f64,
        n: usize,
        fresh: &[usize],
    ) -> Prior {
        let mut next = self.clone();
        let k = g.k;
        if opts.weights {
            let mut c: Vec<f64> = counts.iter().map(|&v| v as f64).collect();
            let mean = c.iter().sum::<f64>() / k as f64;
            for &j in fresh {
                c[j] = mean;
            }
            let total: f64 = c.iter().sum();
            next.log_weight = c
                .iter()
                .map(|&b| (k as f64 * b / total).ln() as f32)
                .collect();
        }
        if opts.variance {
            let s = count_sum;
            let sq = g.bias(theta);
            let fit: f64 = counts
                .iter()
                .zip(&sq)
                .map(|(&bp, &b)| {
                    let bp = bp as f64;
                    // B from B' = (B + 1/S) S / (S + 1).
                    let raw = bp * (s + 1.0) / s - 1.0 / s;
                    (2.0 * bp - raw) * (-2.0 * b)
                })
                .sum();
            let d = (g.c * g.hp * g.wp) as f64;
            let var = ((sum_sq - fit) / (n as f64 * d)).max(MIN_VARIANCE);
            next.inv_var = (1.0 / var) as f32;
        }
        next
    }
}

/// `SX = sum_n ||X_n||^2` over every image of `source`, in f64 (one pass over the data).
pub fn sum_of_squares(source: &dyn ImageSource) -> Result<f64> {
    let (c, h, w) = source.shape();
    let per = c * h * w;
    let chunk = (4 << 20) / (per * 4).max(1) + 1;
    let mut buf = vec![0f32; chunk * per];
    let mut total = 0f64;
    let n = source.len();
    let mut start = 0;
    while start < n {
        let nb = chunk.min(n - start);
        source.read_into(start, nb, &mut buf[..nb * per])?;
        total += buf[..nb * per]
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>();
        start += nb;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::LayerConfig;

    fn geom() -> Geometry {
        Geometry::new(
            LayerConfig {
                kernels: 3,
                width: 2,
                pad: 1,
            },
            1,
            4,
            4,
        )
        .unwrap()
    }

    #[test]
    fn uniform_prior_is_spec_bit_for_bit() {
        let g = geom();
        let theta: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 2.0).collect();
        let (t, b) = Prior::uniform(3).effective(&g, &theta);
        assert_eq!(t, theta);
        assert_eq!(b, g.bias_f32(&theta));
        assert_eq!(Prior::uniform(3).loglik(-5.5, 123.0, 7, &g), -5.5);
    }

    /// The weights are the normalised counts; the variance is the mean squared residual per
    /// pixel, checked against a direct sum for data that one kernel explains with certainty.
    #[test]
    fn learned_weights_and_variance() {
        let g = geom();
        let theta: Vec<f32> = vec![0.5; 12];
        let counts = [1.0f32, 3.0, 6.0];
        let opts = PriorOptions {
            weights: true,
            variance: false,
        };
        let p = Prior::uniform(3).learn(opts, &g, &theta, &counts, 10.0, 0.0, 10, &[]);
        let w = p.weights();
        for (a, b) in w.iter().zip([0.1, 0.3, 0.6]) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(p.inv_var, 1.0);
        // Revived kernels get the mean count, 10/3.
        let p = Prior::uniform(3).learn(opts, &g, &theta, &counts, 10.0, 0.0, 10, &[0]);
        assert!((p.weights()[0] - (10.0 / 3.0) / (10.0 + 10.0 / 3.0 - 1.0)).abs() < 1e-6);

        // Two images whose only non-zero pixels are one 2x2 patch, of 0.6 in one and 0.4 in
        // the other, all responsibility on kernel 0: B = (2, 0, 0), S = 2, T_0 = 1.0 per pixel,
        // theta = T / B' (0 for the empty kernels). The variance is the direct mean squared
        // residual per pixel of the padded images, 4 (0.6 - t)^2 + 4 (0.4 - t)^2 over 2 D.
        let opts = PriorOptions {
            weights: false,
            variance: true,
        };
        let s = 2.0;
        let bp = |b: f64| (b + 1.0 / s) * s / (s + 1.0);
        let counts = [bp(2.0) as f32, bp(0.0) as f32, bp(0.0) as f32];
        let t0 = (1.0 / counts[0] as f64) as f32;
        let mut theta = vec![0f32; 12];
        theta[..4].fill(t0);
        let sx = 4.0 * 0.36 + 4.0 * 0.16;
        let p = Prior::uniform(3).learn(opts, &g, &theta, &counts, s, sx, 2, &[]);
        let t = t0 as f64;
        let d = (g.hp * g.wp) as f64;
        let want = (4.0 * (0.6 - t).powi(2) + 4.0 * (0.4 - t).powi(2)) / (2.0 * d);
        assert!(
            (p.variance() - want).abs() < 1e-5 * want,
            "{} {want}",
            p.variance()
        );
        // Data fitted exactly: the variance stops at its floor instead of 0.
        let p = Prior::uniform(3).learn(opts, &g, &theta, &counts, s, 0.0, 2, &[]);
        assert!(
            (p.variance() - MIN_VARIANCE).abs() < 1e-9,
            "{}",
            p.variance()
        );
    }

    #[test]
    fn check_refuses_bad_values() {
        let mut p = Prior::uniform(2);
        assert!(p.check(2).is_ok());
        assert!(p.check(3).is_err());
        p.inv_var = 0.0;
        assert!(p.check(2).is_err());
        p.inv_var = 1.0;
        p.log_weight[1] = f32::NAN;
        assert!(p.check(2).is_err());
    }
}
