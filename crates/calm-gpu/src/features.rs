//! How a layer's maps become one feature vector per image.

use std::fmt;

/// The encoding of `L` before it is pooled over each of `grid x grid` regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// SPEC's (and the paper's): log-sum-exp of L over the region, `log sum_u exp L[k,u]`
    #[default]
    Lse,
    /// Triangle encoding (Coates, Lee & Ng 2011) summed over the region: `max(0, mean_j d_j(u)
    /// - d_k(u))` with `d_k(u) = ||x_u - theta_k||`, the patch's distance to each kernel (its
    /// log likelihood under kernel k is `-d^2 / 2` up to a constant)
    Triangle,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Lse => "lse",
            Encoding::Triangle => "triangle",
        })
    }
}

/// How `L` is turned into features: the encoding, pooled over `grid x grid` regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pooling {
    /// Regions per axis (1: the whole image, SPEC's features).
    pub grid: usize,
    /// The encoding of `L` pooled over each region.
    pub encoding: Encoding,
}
