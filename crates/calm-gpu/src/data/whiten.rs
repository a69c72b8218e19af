//! Patch whitening (`train --whiten W`): a ZCA transform fitted on `W x W` patches of the
//! training images, applied to whole images as a convolution, as single-layer feature learners
//! whiten their patches (Coates, Lee & Ng 2011) — but as a fixed filter over the image, so the
//! layer still sees images and `L` is still a convolution.
//!
//! Fit: patches `p` (`C W W` values) at random images and positions; their mean `mu` and
//! covariance `S = V^T diag(d) V`; `Z = V^T diag(1 / sqrt(d + eps)) V` with `eps` a tenth of
//! the mean eigenvalue (scale-free). The row of `Z` for the centre pixel of channel `co` is that
//! output channel's filter over all input channels: `F[co, ci, i, j]`. Applied with zero padding
//! so that the image keeps its size:
//!
//! ```text
//! y[co, h, w] = sum_{ci, i, j} F[co, ci, i, j] * x[ci, h + i - W/2, w + j - W/2]
//! ```
//!
//! and `F` is finally scaled so that the whitened training pixels have standard deviation 1 —
//! the unit variance SPEC's model assumes.

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use super::{DataError, ImageSource};

/// Patches the fit draws from each sampled image, and images sampled at most.
const PATCHES_PER_IMAGE: usize = 10;
const MAX_IMAGES: usize = 10_000;
/// `eps` as a fraction of the mean eigenvalue of the patch covariance.
pub const EPS_OF_MEAN_EIGENVALUE: f64 = 0.1;

/// A fitted whitening filter, `(C, C, W, W)` (output channel, input channel, row, column).
#[derive(Clone, Debug, PartialEq)]
pub struct Whitening {
    /// Channels `C` of the images it is for.
    pub channels: usize,
    /// Patch width `W`.
    pub width: usize,
    /// `F[co, ci, i, j]`, `(C, C, W, W)` row-major.
    pub filter: Vec<f32>,
}

impl Whitening {
    /// A patch width [`Whitening::fit`] accepts for `h x w` images: 1 to `min(h, w)`.
    pub fn check_width(width: usize, h: usize, w: usize) -> Result<(), DataError> {
        if width == 0 || width > h || width > w {
            return Err(DataError::Invalid(format!(
                "whitening patch width {width} must fit the {h}x{w} images (1 to {})",
                h.min(w)
            )));
        }
        Ok(())
    }

    /// Fits the filter on `W x W` patches of `source` (seeded, so a seed gives the same filter).
    pub fn fit(source: &dyn ImageSource, width: usize, seed: u64) -> Result<Self, DataError> {
        let (c, h, w) = source.shape();
        Self::check_width(width, h, w)?;
        if source.is_empty() {
            return Err(DataError::Invalid(
                "whitening: no images to fit it on".into(),
            ));
        }
        let d = c * width * width;
        let n = source.len();
        let images = n.min(MAX_IMAGES);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x05ee_d0f7_a17e);
        // Evenly spread images (all of them when there are few), read in order.
        let picks: Vec<usize> = (0..images).map(|i| i * n / images).collect();
        let per = c * h * w;
        let mut img = vec![0f32; per];
        let mut mean = vec![0f64; d];
        let mut cov = vec![0f64; d * d];
        let mut p = vec![0f64; d];
        let mut count = 0f64;
        for &i in &picks {
            source.read_into(i, 1, &mut img)?;
            for _ in 0..PATCHES_PER_IMAGE {
                let (y, x) = (
                    rng.random_range(0..=h - width),
                    rng.random_range(0..=w - width),
                );
                for ch in 0..c {
                    for a in 0..width {
                        for b in 0..width {
                            p[(ch * width + a) * width + b] =
                                img[(ch * h + y + a) * w + x + b] as f64;
                        }
                    }
                }
                count += 1.0;
                for (m, &v) in mean.iter_mut().zip(&p) {
                    *m += v;
                }
                for r in 0..d {
                    let pr = p[r];
                    for (s, &pc) in cov[r * d..(r + 1) * d].iter_mut().zip(&p) {
                        *s += pr * pc;
                    }
                }
            }
        }
        mean.iter_mut().for_each(|m| *m /= count);
        for r in 0..d {
            for s in 0..d {
                cov[r * d + s] = cov[r * d + s] / count - mean[r] * mean[s];
            }
        }
        let (vals, vecs) = super::preprocess::symmetric_eigen(&cov, d)
            .map_err(|e| DataError::Invalid(format!("whitening: {e}")))?;
        let mean_eig = vals.iter().map(|v| v.max(0.0)).sum::<f64>() / d as f64;
        if !(mean_eig > 0.0 && mean_eig.is_finite()) {
            return Err(DataError::Invalid(
                "whitening: the images' patches do not vary (constant images?)".into(),
            ));
        }
        let eps = EPS_OF_MEAN_EIGENVALUE * mean_eig;
        let scale: Vec<f64> = vals
            .iter()
            .map(|&v| 1.0 / (v.max(0.0) + eps).sqrt())
            .collect();
        // Z[r, s] = sum_e V[e, r] scale[e] V[e, s]; only the centre rows are needed.
        let centre = (width / 2) * width + width / 2;
        let mut filter = vec![0f32; c * d];
        for co in 0..c {
            let r = co * width * width + centre;
            for s in 0..d {
                let z: f64 = (0..d)
                    .map(|e| vecs[e * d + r] * scale[e] * vecs[e * d + s])
                    .sum();
                filter[co * d + s] = z as f32;
            }
        }
        let mut white = Whitening {
            channels: c,
            width,
            filter,
        };
        // Unit standard deviation over the whitened pixels of (up to) 1,000 of the images.
        let (mut s1, mut s2, mut m) = (0f64, 0f64, 0f64);
        let mut out = vec![0f32; per];
        for &i in picks.iter().step_by((images / 1000).max(1)) {
            source.read_into(i, 1, &mut img)?;
            white.apply_image(&img, &mut out, (c, h, w));
            for &v in &out {
                s1 += v as f64;
                s2 += v as f64 * v as f64;
                m += 1.0;
            }
        }
        let std = (s2 / m - (s1 / m).powi(2)).max(0.0).sqrt();
        if !(std > 0.0 && std.is_finite()) {
            return Err(DataError::Invalid(
                "whitening: the whitened images do not vary".into(),
            ));
        }
        white
            .filter
            .iter_mut()
            .for_each(|f| *f = (*f as f64 / std) as f32);
        Ok(white)
    }

    /// Checks a filter read from a model file against the model's channels.
    pub fn check(&self) -> Result<(), String> {
        let want = self.channels * self.channels * self.width * self.width;
        if self.width == 0 || self.filter.len() != want {
            return Err(format!(
                "whitening filter holds {} values, {}x{}x{w}x{w} needs {want}",
                self.filter.len(),
                self.channels,
                self.channels,
                w = self.width
            ));
        }
        if self.filter.iter().any(|v| !v.is_finite()) {
            return Err("whitening filter holds a value that is not finite".into());
        }
        Ok(())
    }

    /// `out = F * img` for one `(c, h, w)` image (zero padding, same size).
    pub fn apply_image(&self, img: &[f32], out: &mut [f32], (c, h, w): (usize, usize, usize)) {
        let k = self.width;
        let half = (k / 2) as isize;
        for co in 0..c {
            let o = &mut out[co * h * w..(co + 1) * h * w];
            o.fill(0.0);
            for ci in 0..c {
                let x = &img[ci * h * w..(ci + 1) * h * w];
                for a in 0..k {
                    for b in 0..k {
                        let f = self.filter[((co * c + ci) * k + a) * k + b];
                        let dy = a as isize - half;
                        let dx = b as isize - half;
                        // Output rows/columns whose input h + dy, w + dx is inside the image.
                        let y0 = (-dy).max(0) as usize;
                        let y1 = (h as isize - dy).min(h as isize).max(0) as usize;
                        let x0 = (-dx).max(0) as usize;
                        let x1 = (w as isize - dx).min(w as isize).max(0) as usize;
                        for y in y0..y1 {
                            let src = ((y as isize + dy) as usize) * w;
                            let row = &mut o[y * w..(y + 1) * w];
                            for xx in x0..x1 {
                                row[xx] += f * x[(src as isize + xx as isize + dx) as usize];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A source whose images are whitened as they are read.
pub struct Whitened<S> {
    inner: S,
    white: std::sync::Arc<Whitening>,
}

impl<S: ImageSource> Whitened<S> {
    /// `inner` whitened with `white`; an error when their channel counts differ.
    pub fn new(inner: S, white: std::sync::Arc<Whitening>) -> Result<Self, DataError> {
        let (c, _, _) = inner.shape();
        if c != white.channels {
            return Err(DataError::Invalid(format!(
                "the whitening filter is for {}-channel images, the data has {c}",
                white.channels
            )));
        }
        Ok(Self { inner, white })
    }
}

impl<S: ImageSource> ImageSource for Whitened<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        use rayon::prelude::*;
        self.inner.read_into(start, count, out)?;
        let shape = self.shape();
        let per = shape.0 * shape.1 * shape.2;
        if per == 0 {
            return Ok(());
        }
        out[..count * per].par_chunks_mut(per).for_each_init(
            || vec![0f32; per],
            |tmp, img| {
                self.white.apply_image(img, tmp, shape);
                img.copy_from_slice(tmp);
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use ndarray::Array4;

    /// Smooth random images plus noise: neighbouring pixels correlated (about 0.7).
    fn smooth(n: usize, c: usize, h: usize, w: usize) -> Dataset {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let mut x = Array4::<f32>::zeros((n, c, h, w));
        for img in 0..n {
            for ch in 0..c {
                let (a, b, ph): (f32, f32, f32) = (
                    rng.random_range(0.1..0.5),
                    rng.random_range(0.1..0.5),
                    rng.random_range(0.0..6.0),
                );
                for y in 0..h {
                    for xx in 0..w {
                        x[[img, ch, y, xx]] = (a * y as f32 + b * xx as f32 + ph).sin()
                            + 0.5 * rng.random_range(-1.0f32..1.0);
                    }
                }
            }
        }
        Dataset::new(x, None)
    }

    fn neighbour_corr(x: &[f32], h: usize, w: usize) -> f64 {
        let (mut sa, mut sb, mut sab, mut saa, mut sbb, mut m) = (0f64, 0., 0., 0., 0., 0.);
        for img in x.chunks_exact(h * w) {
            for y in 2..h - 2 {
                for xx in 2..w - 3 {
                    let (a, b) = (img[y * w + xx] as f64, img[y * w + xx + 1] as f64);
                    sa += a;
                    sb += b;
                    sab += a * b;
                    saa += a * a;
                    sbb += b * b;
                    m += 1.0;
                }
            }
        }
        let cov = sab / m - sa / m * sb / m;
        cov / ((saa / m - (sa / m).powi(2)) * (sbb / m - (sb / m).powi(2))).sqrt()
    }

    /// Whitening removes most of the correlation of neighbouring pixels and leaves unit
    /// standard deviation; the same seed gives the same filter.
    #[test]
    fn whitening_decorrelates_and_normalises() {
        let d = smooth(300, 1, 16, 16);
        let x = d.images.as_slice().unwrap().to_vec();
        let white = Whitening::fit(&d, 5, 1).unwrap();
        assert_eq!(white, Whitening::fit(&d, 5, 1).unwrap());
        let src = Whitened::new(d, std::sync::Arc::new(white)).unwrap();
        let mut y = vec![0f32; x.len()];
        src.read_into(0, 300, &mut y).unwrap();
        let before = neighbour_corr(&x, 16, 16);
        let after = neighbour_corr(&y, 16, 16);
        assert!(before > 0.6, "{before}");
        eprintln!("neighbour correlation {before} -> {after}");
        assert!(after.abs() < 0.3, "{before} -> {after}");
        let m = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        let sd = (y.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
        assert!((sd - 1.0).abs() < 0.1, "std {sd}");
    }

    /// `apply_image` against the formula as plain loops (the twin), two channels, an even width.
    #[test]
    fn apply_matches_the_formula() {
        let (c, h, w, k) = (2, 7, 6, 4);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let white = Whitening {
            channels: c,
            width: k,
            filter: (0..c * c * k * k)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        };
        let img: Vec<f32> = (0..c * h * w)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut out = vec![0f32; c * h * w];
        white.apply_image(&img, &mut out, (c, h, w));
        for co in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let mut want = 0f64;
                    for ci in 0..c {
                        for a in 0..k {
                            for b in 0..k {
                                let (yy, xx) = (
                                    y as isize + a as isize - (k / 2) as isize,
                                    x as isize + b as isize - (k / 2) as isize,
                                );
                                if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                    want += white.filter[((co * c + ci) * k + a) * k + b] as f64
                                        * img[(ci * h + yy as usize) * w + xx as usize] as f64;
                                }
                            }
                        }
                    }
                    let got = out[(co * h + y) * w + x] as f64;
                    assert!((got - want).abs() < 1e-5, "{co} {y} {x}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn bad_widths_and_filters_are_refused() {
        let d = smooth(3, 1, 8, 8);
        assert!(Whitening::fit(&d, 0, 1).is_err());
        assert!(Whitening::fit(&d, 9, 1).is_err());
        let mut white = Whitening::fit(&d, 3, 1).unwrap();
        assert!(white.check().is_ok());
        white.filter[0] = f32::NAN;
        assert!(white.check().is_err());
        white.filter.pop();
        assert!(white.check().is_err());
        let flat = Dataset::new(Array4::<f32>::zeros((4, 1, 8, 8)), None);
        assert!(Whitening::fit(&flat, 3, 1).is_err());
    }
}
