//! The fast CPU engine: the E-step and the M-step as two GEMMs per chunk of images (through the
//! `gemm` crate), chunks spread over all cores with rayon.
//!
//! Per chunk of `n` images with `P = Ho*Wo` positions, `R = C*w*w`:
//! - `A = im2col(X)`, `(n*P) x R`, built once and used by both products;
//! - E-step `L = A theta^T + bias`, `(n*P) x K`;
//! - `logp[n]` per image (f64), then `G = exp(L - logp)` in place;
//! - M-step `T_chunk = G^T A`, `K x R`, and `B_chunk[k] = sum_m G[m,k]`.
//!
//! Chunks are fixed-size and their partial sums are added in chunk order in f64, so the result
//! does not depend on the number of threads, and splits the M-step's long reduction the way
//! PERF.md suggests.

use std::sync::Arc;

use ndarray::Array2;
use rayon::prelude::*;

use crate::data::ImageSource;
use crate::engine::{Engine, EpochStats};
use crate::error::Result;
use crate::geometry::Geometry;

/// Images per parallel work item. Fixed (not derived from the thread count) so that results are
/// bit-identical on any machine; 8 MNIST images make a 1352 x 400 patch matrix (2 MB), which
/// stays in a core's L2 between the two products.
fn chunk_images(g: &Geometry) -> usize {
    let per_image = g.positions() * (g.r() + g.k) * 4;
    (2 << 20) / per_image.max(1)
}

pub struct CpuEngine {
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: Vec<f32>,
    counts: Vec<f32>,
    batch: usize,
}

impl CpuEngine {
    /// `batch` bounds how many images are read and expanded at once (memory), nothing else.
    pub fn new(g: Geometry, source: Arc<dyn ImageSource>, theta: Vec<f32>, batch: usize) -> Self {
        assert_eq!(theta.len(), g.k * g.r());
        Self {
            counts: vec![0.0; g.k],
            g,
            source,
            theta,
            batch: batch.max(1),
        }
    }
}

/// `bias[k] = -0.5 ||theta_k||^2`, summed in f64.
pub fn bias_f32(g: &Geometry, theta: &[f32]) -> Vec<f32> {
    super::reference::bias(g, theta)
        .into_iter()
        .map(|b| b as f32)
        .collect()
}

/// Builds the `(n*P) x R` patch matrix of `n` unpadded images, zero outside the image.
fn im2col(g: &Geometry, x: &[f32], n: usize, a: &mut [f32]) {
    let (r, kw, p) = (g.r(), g.kw, g.pad as isize);
    for img in 0..n {
        for h in 0..g.ho {
            for w in 0..g.wo {
                let m = (img * g.ho + h) * g.wo + w;
                let arow = &mut a[m * r..(m + 1) * r];
                for c in 0..g.c {
                    for i in 0..kw {
                        let dst = &mut arow[(c * kw + i) * kw..(c * kw + i + 1) * kw];
                        let y = h as isize + i as isize - p;
                        if y < 0 || y >= g.h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let xrow = &x[((img * g.c + c) * g.h + y as usize) * g.w..][..g.w];
                        for (j, d) in dst.iter_mut().enumerate() {
                            let xx = w as isize + j as isize - p;
                            *d = if xx >= 0 && xx < g.w as isize {
                                xrow[xx as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
}

/// `L = A theta^T + bias` for one chunk, `(n*P) x K` row-major.
fn estep_chunk(g: &Geometry, a: &[f32], rows: usize, theta: &[f32], bias: &[f32]) -> Vec<f32> {
    let (r, k) = (g.r(), g.k);
    let mut l = vec![0f32; rows * k];
    // SAFETY: the slices hold exactly rows*K, rows*R and K*R elements and the strides below
    // address them in bounds: dst (rows x K, row-major), lhs A (rows x R, row-major),
    // rhs theta^T (R x K, i.e. theta read column-major).
    unsafe {
        gemm::gemm(
            rows,
            k,
            r,
            l.as_mut_ptr(),
            1,
            k as isize,
            false,
            a.as_ptr(),
            1,
            r as isize,
            theta.as_ptr(),
            r as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for row in l.chunks_exact_mut(k) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
    l
}

struct ChunkStats {
    t: Vec<f32>,
    b: Vec<f64>,
    ll: f64,
}

fn stats_chunk(g: &Geometry, x: &[f32], n: usize, theta: &[f32], bias: &[f32]) -> ChunkStats {
    let (r, k, p) = (g.r(), g.k, g.positions());
    let rows = n * p;
    let mut a = vec![0f32; rows * r];
    im2col(g, x, n, &mut a);
    let mut l = estep_chunk(g, &a, rows, theta, bias);
    let mut b = vec![0f64; k];
    let mut ll = 0f64;
    for img in 0..n {
        let li = &mut l[img * p * k..(img + 1) * p * k];
        let m = li.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let s: f64 = li.iter().map(|&v| (v as f64 - m).exp()).sum();
        let logp = m + s.ln();
        ll += logp;
        for row in li.chunks_exact_mut(k) {
            for (kk, v) in row.iter_mut().enumerate() {
                let gam = (*v as f64 - logp).exp();
                b[kk] += gam;
                *v = gam as f32;
            }
        }
    }
    let mut t = vec![0f32; k * r];
    // SAFETY: dst T (K x R, row-major), lhs G^T (K x rows: G is rows x K row-major, so read
    // column-major), rhs A (rows x R, row-major); all in bounds of the slices above.
    unsafe {
        gemm::gemm(
            k,
            r,
            rows,
            t.as_mut_ptr(),
            1,
            r as isize,
            false,
            l.as_ptr(),
            k as isize,
            1,
            a.as_ptr(),
            1,
            r as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    ChunkStats { t, b, ll }
}

/// Runs `f` over fixed-size chunks of images `[start, start + n)` in parallel and returns the
/// results in chunk order.
fn for_chunks<T: Send>(
    g: &Geometry,
    source: &dyn ImageSource,
    start: usize,
    n: usize,
    f: impl Fn(&[f32], usize) -> T + Sync,
) -> Result<Vec<T>> {
    let per = g.c * g.h * g.w;
    let mut x = vec![0f32; n * per];
    source.read_into(start, n, &mut x)?;
    let ci = chunk_images(g).max(1);
    Ok(x.par_chunks(ci * per)
        .map(|xc| f(xc, xc.len() / per))
        .collect())
}

impl Engine for CpuEngine {
    fn describe(&self) -> String {
        format!(
            "CPU engine (gemm, {} threads)",
            rayon::current_num_threads()
        )
    }

    fn geometry(&self) -> Geometry {
        self.g
    }

    fn len(&self) -> usize {
        self.source.len()
    }

    fn epoch(&mut self, progress: &mut dyn FnMut(usize)) -> Result<EpochStats> {
        let g = self.g;
        let bias = bias_f32(&g, &self.theta);
        let mut t = vec![0f64; g.k * g.r()];
        let mut b = vec![0f64; g.k];
        let mut ll = 0f64;
        let n = self.source.len();
        let mut start = 0;
        while start < n {
            let nb = self.batch.min(n - start);
            let parts = for_chunks(&g, self.source.as_ref(), start, nb, |x, ni| {
                stats_chunk(&g, x, ni, &self.theta, &bias)
            })?;
            for part in parts {
                ll += part.ll;
                t.iter_mut()
                    .zip(&part.t)
                    .for_each(|(acc, &v)| *acc += v as f64);
                b.iter_mut().zip(&part.b).for_each(|(acc, &v)| *acc += v);
            }
            start += nb;
            progress(start);
        }
        let stats = super::reference::Stats { b, t, ll };
        let up = super::reference::update(&g, &stats);
        let finite = ll.is_finite() && up.is_finite();
        if finite {
            self.theta = up.theta.iter().map(|&v| v as f32).collect();
            self.counts = up.counts.iter().map(|&v| v as f32).collect();
        }
        Ok(EpochStats {
            loglik: ll,
            count_sum: up.count_sum,
            finite,
        })
    }

    fn theta(&mut self) -> Result<Vec<f32>> {
        Ok(self.theta.clone())
    }

    fn counts(&mut self) -> Result<Vec<f32>> {
        Ok(self.counts.clone())
    }
}

/// Features `f[n,k] = logsumexp over (h,w) of L[n,k,h,w]` for every image of `source`, `(N, K)`.
pub fn features(
    g: &Geometry,
    source: &dyn ImageSource,
    theta: &[f32],
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Array2<f32>> {
    let (k, p, r) = (g.k, g.positions(), g.r());
    let bias = bias_f32(g, theta);
    let n = source.len();
    let mut out = Array2::<f32>::zeros((n, k));
    let mut start = 0;
    while start < n {
        let nb = batch.max(1).min(n - start);
        let parts = for_chunks(g, source, start, nb, |x, ni| {
            let mut a = vec![0f32; ni * p * r];
            im2col(g, x, ni, &mut a);
            let l = estep_chunk(g, &a, ni * p, theta, &bias);
            let mut f = vec![0f32; ni * k];
            for img in 0..ni {
                let li = &l[img * p * k..(img + 1) * p * k];
                for kk in 0..k {
                    let col = li.iter().skip(kk).step_by(k).map(|&v| v as f64);
                    f[img * k + kk] = super::reference::logsumexp(col) as f32;
                }
            }
            f
        })?;
        let flat: Vec<f32> = parts.into_iter().flatten().collect();
        out.as_slice_mut().expect("standard layout")[start * k..(start + nb) * k]
            .copy_from_slice(&flat);
        start += nb;
        progress(start);
    }
    Ok(out)
}
