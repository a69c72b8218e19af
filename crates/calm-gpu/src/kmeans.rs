//! k-means on image patches, the classic unsupervised dictionary (Coates, Lee and Ng, AISTATS
//! 2011): the centroids of `w x w` patches of the (whitened) images, used as a layer's kernels,
//! are the twin a CALM layer is compared with ([`crate::eval::Baseline::KMeans`]). With the
//! triangle encoding, `L = x . theta_k - ||theta_k||^2 / 2` gives exactly Coates' "k-means
//! triangle" features: how much closer than average a patch is to each centroid.
//!
//! Lloyd's algorithm from a k-means++ start, on a seeded sample of patches; the products are
//! ndarray's GEMM (single-threaded, so the same seed gives the same centroids).

use ndarray::{Array1, Array2, Axis};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::data::ImageSource;
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;

/// How [`kmeans_patches`] runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KMeansConfig {
    /// Patches sampled from the images (at random images and positions).
    pub patches: usize,
    /// Lloyd iterations at most.
    pub max_iter: usize,
    /// Stop once no more than this fraction of the patches changes cluster in an iteration.
    pub tol: f64,
}

impl Default for KMeansConfig {
    /// 50,000 patches and up to 30 iterations: a few seconds for the protocols' layers.
    fn default() -> Self {
        Self {
            patches: 50_000,
            max_iter: 30,
            tol: 1e-3,
        }
    }
}

/// What the fit did, for the report.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeans {
    /// The centroids as kernels, `(K, R)` flattened (`R = C w w`).
    pub theta: Vec<f32>,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Mean squared distance of a patch to its centroid at the end.
    pub inertia: f64,
}

/// `g.k` centroids of `cfg.patches` patches of `g`'s shape drawn from `source` (seeded).
/// A cluster left empty is re-seeded with the patch farthest from its centroid.
pub fn kmeans_patches(
    g: &Geometry,
    source: &dyn ImageSource,
    seed: u64,
    cfg: &KMeansConfig,
) -> Result<KMeans> {
    if source.is_empty() {
        return Err(CalmError::Invalid(
            "k-means: no images to draw patches from".into(),
        ));
    }
    let (k, r) = (g.k, g.r());
    let m = cfg.patches.max(k);
    let x = sample_patches(g, source, seed, m)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x6b6d_6561_6e73);
    let mut c = plus_plus(&x, k, &mut rng);
    let x_sq: Array1<f64> = x.rows().into_iter().map(|p| p.dot(&p) as f64).collect();
    let mut assign = vec![usize::MAX; m];
    let mut iterations = 0;
    let mut inertia = f64::NAN;
    for _ in 0..cfg.max_iter {
        iterations += 1;
        let (changed, dist) = assign_nearest(&x, &x_sq, &c, &mut assign);
        inertia = dist.iter().sum::<f64>() / m as f64;
        // New centroids: the mean of each cluster's patches, f64 sums.
        let mut sums = Array2::<f64>::zeros((k, r));
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            sums.row_mut(a)
                .iter_mut()
                .zip(x.row(i))
                .for_each(|(s, &v)| *s += v as f64);
        }
        // Empty clusters take the patches farthest from their centroids, one each.
        let mut far: Vec<usize> = (0..m).collect();
        far.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]).then(a.cmp(&b)));
        let mut far = far.into_iter();
        for (j, &count) in counts.iter().enumerate() {
            if count == 0 {
                let i = far.next().expect("more patches than clusters");
                c.row_mut(j).assign(&x.row(i));
            } else {
                let n = count as f64;
                c.row_mut(j)
                    .iter_mut()
                    .zip(sums.row(j))
                    .for_each(|(v, &s)| *v = (s / n) as f32);
            }
        }
        if changed as f64 <= cfg.tol * m as f64 {
            break;
        }
    }
    Ok(KMeans {
        theta: c.into_raw_vec_and_offset().0,
        iterations,
        inertia,
    })
}

/// `m` padded patches `(m, R)` at random images and positions of `source`.
fn sample_patches(
    g: &Geometry,
    source: &dyn ImageSource,
    seed: u64,
    m: usize,
) -> Result<Array2<f32>> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x0070_6174_6368_6573);
    let r = g.r();
    let mut x = Array2::<f32>::zeros((m, r));
    let per = g.c * g.h * g.w;
    let mut img = vec![0f32; per];
    for mut row in x.rows_mut() {
        let n = rng.random_range(0..source.len());
        source.read_into(n, 1, &mut img)?;
        let (h, w) = (rng.random_range(0..g.ho), rng.random_range(0..g.wo));
        crate::em::patch(g, &img, h, w, row.as_slice_mut().expect("standard layout"));
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(CalmError::Invalid(
            "k-means: the images hold a non-finite value (NaN or infinity)".into(),
        ));
    }
    Ok(x)
}

/// k-means++ (Arthur and Vassilvitskii, 2007): each next centroid a patch drawn with
/// probability proportional to its squared distance to the nearest one so far.
fn plus_plus(x: &Array2<f32>, k: usize, rng: &mut Xoshiro256PlusPlus) -> Array2<f32> {
    let (m, r) = x.dim();
    let mut c = Array2::<f32>::zeros((k, r));
    let first = rng.random_range(0..m);
    c.row_mut(0).assign(&x.row(first));
    let sq = |i: usize, j: &ndarray::ArrayView1<f32>| -> f64 {
        x.row(i)
            .iter()
            .zip(j)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    };
    let mut d: Vec<f64> = (0..m).map(|i| sq(i, &c.row(0))).collect();
    for j in 1..k {
        let total: f64 = d.iter().sum();
        let pick = if total > 0.0 {
            let mut u = rng.random::<f64>() * total;
            d.iter()
                .position(|&v| {
                    u -= v;
                    u <= 0.0
                })
                .unwrap_or(m - 1)
        } else {
            rng.random_range(0..m)
        };
        c.row_mut(j).assign(&x.row(pick));
        let cj = c.row(j);
        for (i, di) in d.iter_mut().enumerate() {
            *di = di.min(sq(i, &cj));
        }
    }
    c
}

/// Each patch to its nearest centroid (`||x||^2 - 2 x.c + ||c||^2`, the products as one GEMM
/// per block of patches); returns how many changed and each patch's squared distance.
fn assign_nearest(
    x: &Array2<f32>,
    x_sq: &Array1<f64>,
    c: &Array2<f32>,
    assign: &mut [usize],
) -> (usize, Vec<f64>) {
    let c_sq: Vec<f64> = c.rows().into_iter().map(|v| v.dot(&v) as f64).collect();
    let ct = c.t();
    let mut changed = 0;
    let mut dist = vec![0f64; x.nrows()];
    const BLOCK: usize = 4096;
    for (b, block) in x.axis_chunks_iter(Axis(0), BLOCK).enumerate() {
        let xc = block.dot(&ct);
        for (i, row) in xc.rows().into_iter().enumerate() {
            let p = b * BLOCK + i;
            let (mut best, mut best_d) = (0, f64::INFINITY);
            for (j, &v) in row.iter().enumerate() {
                let dj = x_sq[p] - 2.0 * v as f64 + c_sq[j];
                if dj < best_d {
                    (best, best_d) = (j, dj);
                }
            }
            if assign[p] != best {
                assign[p] = best;
                changed += 1;
            }
            dist[p] = best_d.max(0.0);
        }
    }
    (changed, dist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::LayerConfig;

    /// Images made of four distinct flat patches: k-means with K 4 on 1x1 patches finds the
    /// four values, whatever the seed.
    #[test]
    fn finds_well_separated_clusters() {
        let values = [0.0f32, 1.0, 5.0, 9.0];
        let (n, h, w) = (40, 4, 4);
        let x: Vec<f32> = (0..n * h * w).map(|i| values[(i / 3) % 4]).collect();
        let data = crate::data::Dataset {
            images: ndarray::Array4::from_shape_vec((n, 1, h, w), x).unwrap(),
            labels: None,
        };
        let layer = LayerConfig {
            kernels: 4,
            width: 1,
            pad: 0,
        };
        let g = Geometry::new(layer, 1, h, w).unwrap();
        for seed in 0..5 {
            let km = kmeans_patches(&g, &data, seed, &KMeansConfig::default()).unwrap();
            let mut found = km.theta.clone();
            found.sort_by(f32::total_cmp);
            assert_eq!(found, values, "seed {seed}");
            assert!(km.inertia < 1e-12, "{}", km.inertia);
            let again = kmeans_patches(&g, &data, seed, &KMeansConfig::default()).unwrap();
            assert_eq!(again, km, "the same seed gives the same centroids");
        }
    }

    /// Lloyd's iterations never raise the mean squared distance (each assignment and each mean
    /// is the best for the other), on real digits.
    #[test]
    fn inertia_never_rises() {
        let digits = crate::data::embedded_digits(crate::data::Split::Test);
        let layer = LayerConfig {
            kernels: 16,
            width: 5,
            pad: 0,
        };
        let g = Geometry::new(layer, 1, 28, 28).unwrap();
        let run = |max_iter| {
            let cfg = KMeansConfig {
                patches: 3000,
                max_iter,
                tol: 0.0,
            };
            kmeans_patches(&g, &digits, 3, &cfg).unwrap().inertia
        };
        let inertia: Vec<f64> = (1..8).map(run).collect();
        assert!(
            inertia.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-9)),
            "{inertia:?}"
        );
        assert!(inertia[6] < inertia[0], "{inertia:?}");
    }
}
