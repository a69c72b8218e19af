//! Per-image preprocessing, and the source adapters that apply it on the fly ([`Preprocessed`])
//! and chain datasets ([`Concat`], e.g. STL-10's train + unlabeled split for unsupervised
//! training).
//!
//! Preprocessing is per image, so it can run while images stream from disk: nothing has to
//! see the whole dataset, and a 100,000-image file never has to be expanded in memory.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use super::{DataError, Dataset, ImageSource, PixelKind, check_request};

/// How pixels are transformed before the model sees them. Serialised by its name (as in
/// `Display`), the way model files and checkpoints record it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Preprocess {
    /// `x / 255`: byte pixels to [0, 1]. The default for byte sources (IDX, uint8 `.npy`,
    /// STL-10, CIFAR, PNG/JPEG); it divides by 255 whatever the source, so it is meant for those.
    Scale,
    /// Per-image, per-channel ZCA whitening exactly as SPEC.md's STL-10 protocol (see
    /// [`zca_channel`]). Whitening is scale invariant up to its tiny regulariser, so applying it
    /// to 0..=255 values or to `x / 255` gives the same images to within about 1e-6.
    ZcaImage,
    /// Values used as they are. The default for float sources, which are taken as prepared.
    None,
}

impl Preprocess {
    /// The preprocessing a source gets when the user names none.
    pub fn default_for(kind: PixelKind) -> Self {
        match kind {
            PixelKind::U8 => Preprocess::Scale,
            PixelKind::F32 => Preprocess::None,
        }
    }

    /// Transforms one image of shape `(c, h, w)` in place (`img.len() == c * h * w`).
    pub fn apply(self, img: &mut [f32], (c, h, w): (usize, usize, usize)) -> Result<(), DataError> {
        if img.len() != c * h * w {
            return Err(DataError::Invalid(format!(
                "preprocess: image buffer holds {} values, shape {c}x{h}x{w} needs {}",
                img.len(),
                c * h * w
            )));
        }
        match self {
            Preprocess::None => Ok(()),
            Preprocess::Scale => {
                img.iter_mut().for_each(|v| *v /= 255.0);
                Ok(())
            }
            Preprocess::ZcaImage => {
                if h * w == 0 {
                    return Ok(());
                }
                let mut work = ZcaWork::new(h, w);
                for ch in img.chunks_exact_mut(h * w) {
                    work.whiten(ch)?;
                }
                Ok(())
            }
        }
    }

    /// Transforms a batch of `(n, c, h, w)` images in place, images in parallel.
    pub fn apply_batch(
        self,
        images: &mut [f32],
        shape: (usize, usize, usize),
    ) -> Result<(), DataError> {
        let per = shape.0 * shape.1 * shape.2;
        if per == 0 || self == Preprocess::None {
            return Ok(());
        }
        if !images.len().is_multiple_of(per) {
            return Err(DataError::Invalid(format!(
                "preprocess: batch of {} values is not a whole number of {per}-value images",
                images.len()
            )));
        }
        match self {
            Preprocess::Scale => {
                images
                    .par_chunks_mut(1 << 16)
                    .for_each(|c| c.iter_mut().for_each(|v| *v /= 255.0));
                Ok(())
            }
            _ => images
                .par_chunks_mut(per)
                .try_for_each(|img| self.apply(img, shape)),
        }
    }

    /// Transforms a dataset held in memory (in parallel), keeping its labels.
    pub fn apply_dataset(self, data: &mut Dataset) -> Result<(), DataError> {
        let (_, c, h, w) = data.images.dim();
        if !data.images.is_standard_layout() {
            data.images = data.images.as_standard_layout().to_owned();
        }
        match data.images.as_slice_mut() {
            Some(flat) => self.apply_batch(flat, (c, h, w)),
            None => Err(DataError::Invalid(
                "preprocess: dataset memory is not contiguous".into(),
            )),
        }
    }
}

impl fmt::Display for Preprocess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preprocess::Scale => "scale",
            Preprocess::ZcaImage => "zca-image",
            Preprocess::None => "none",
        })
    }
}

impl FromStr for Preprocess {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scale" => Ok(Preprocess::Scale),
            "zca-image" | "zca_image" => Ok(Preprocess::ZcaImage),
            "none" => Ok(Preprocess::None),
            _ => Err(DataError::Invalid(format!(
                "unknown preprocessing '{s}': expected one of scale, zca-image, none"
            ))),
        }
    }
}

/// Ridge added to the covariance, as in the reference protocol.
pub const ZCA_EPS: f64 = 1e-7;
/// Singular values below this get 1 added, as in the reference protocol.
pub const ZCA_SMALL: f64 = 1e-5;

/// Whitens one `h x w` channel in place, exactly as SPEC.md's per-image ZCA: subtract from each
/// row its mean, `Cov = x x^T / w + 1e-7 I` (`h x h`), `Cov = V diag(d) V^T`, `s = sqrt(d)` with
/// 1 added where `s < 1e-5`, and `x <- V ((V^T x) / s[:, None])`. Computed in f64.
///
/// Note that the ridge keeps every `d >= 1e-7`, so `s >= 3.2e-4` and the `s < 1e-5` rule can
/// only matter through rounding; it is kept because the reference has it. A constant channel
/// becomes all zeros.
pub fn zca_channel(x: &mut [f32], h: usize, w: usize) -> Result<(), DataError> {
    ZcaWork::new(h, w).whiten(x)
}

/// Scratch buffers for [`zca_channel`], reused across the channels of an image.
struct ZcaWork {
    h: usize,
    w: usize,
    x: Vec<f64>,
    cov: Vec<f64>,
    p: Vec<f64>,
}

impl ZcaWork {
    fn new(h: usize, w: usize) -> Self {
        ZcaWork {
            h,
            w,
            x: vec![0.0; h * w],
            cov: vec![0.0; h * h],
            p: vec![0.0; h * w],
        }
    }

    fn whiten(&mut self, ch: &mut [f32]) -> Result<(), DataError> {
        let (h, w) = (self.h, self.w);
        if ch.iter().any(|v| !v.is_finite()) {
            return Err(DataError::Invalid(
                "zca-image: the image holds a non-finite value (NaN or infinity)".into(),
            ));
        }
        // Centre each row.
        for (xr, cr) in self.x.chunks_exact_mut(w).zip(ch.chunks_exact(w)) {
            let mean = cr.iter().map(|&v| v as f64).sum::<f64>() / w as f64;
            for (a, &b) in xr.iter_mut().zip(cr) {
                *a = b as f64 - mean;
            }
        }
        // Cov = x x^T / w + eps I.
        let x = &self.x;
        for i in 0..h {
            let xi = &x[i * w..(i + 1) * w];
            for j in 0..=i {
                let xj = &x[j * w..(j + 1) * w];
                let v = dot(xi, xj) / w as f64;
                self.cov[i * h + j] = v;
                self.cov[j * h + i] = v;
            }
            self.cov[i * h + i] += ZCA_EPS;
        }
        let (d, vt) = symmetric_eigen(&self.cov, h)
            .map_err(|e| DataError::Invalid(format!("zca-image: {e}")))?;
        // p = diag(1/s) V^T x; rows of `vt` are the eigenvectors.
        self.p.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..h {
            let pi = &mut self.p[i * w..(i + 1) * w];
            for k in 0..h {
                axpy(vt[i * h + k], &x[k * w..(k + 1) * w], pi);
            }
            let mut s = d[i].max(0.0).sqrt();
            if s < ZCA_SMALL {
                s += 1.0;
            }
            pi.iter_mut().for_each(|v| *v /= s);
        }
        // x = V p.
        let y = &mut self.x;
        y.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..h {
            let pi = &self.p[i * w..(i + 1) * w];
            for k in 0..h {
                axpy(vt[i * h + k], pi, &mut y[k * w..(k + 1) * w]);
            }
        }
        for (o, &v) in ch.iter_mut().zip(y.iter()) {
            *o = v as f32;
        }
        Ok(())
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four accumulators let the compiler vectorise without reassociating a single sum.
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// Eigendecomposition of a symmetric `n x n` matrix (row-major; only symmetry is assumed, both
/// triangles are read). Returns the eigenvalues in ascending order and the matching unit
/// eigenvectors as the rows of an `n x n` matrix, so `A = V^T diag(d) V` with `V` the returned
/// rows.
///
/// Householder reduction to tridiagonal form, then the implicit QL algorithm (the EISPACK
/// `tred2`/`tql2` pair as published in JAMA), in f64: about `9 n^3` flops against cyclic Jacobi's
/// `~20 n^3`, which matters because STL-10's protocol runs it 315,000 times per pass. Written
/// here to keep the crate free of a linear-algebra dependency.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    if a.len() != n * n {
        return Err(format!(
            "matrix has {} entries, {n}x{n} needs {}",
            a.len(),
            n * n
        ));
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err("matrix holds a non-finite value".into());
    }
    // Symmetrise (averaging) so tiny asymmetries from rounding cannot bias the result.
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            v[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    let mut d = vec![0.0f64; n];
    let mut e = vec![0.0f64; n];
    tred2(n, &mut v, &mut d, &mut e);
    // tql2 rotates columns of V; work on its transpose so each rotation touches two rows.
    let mut vt = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            vt[j * n + i] = v[i * n + j];
        }
    }
    tql2(n, &mut vt, &mut d, &mut e)?;
    // Sort ascending (selection sort on indices: n is small).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let ds: Vec<f64> = order.iter().map(|&i| d[i]).collect();
    let mut vs = vec![0.0f64; n * n];
    for (r, &i) in order.iter().enumerate() {
        vs[r * n..(r + 1) * n].copy_from_slice(&vt[i * n..(i + 1) * n]);
    }
    Ok((ds, vs))
}

/// Householder tridiagonalisation; on return `v` holds the orthogonal transformation (columns),
/// `d` the diagonal and `e` the sub-diagonal (`e[0] = 0`). Index loops are kept to stay
/// line-for-line comparable with the published algorithm.
#[allow(clippy::needless_range_loop)]
fn tred2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let ix = |r: usize, c: usize| r * n + c;
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
                v[ix(j, i)] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[ix(j, i)] = f;
                g = e[j] + v[ix(j, j)] * f;
                for k in j + 1..i {
                    g += v[ix(k, j)] * d[k];
                    e[k] += v[ix(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[ix(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[ix(n - 1, i)] = v[ix(i, i)];
        v[ix(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[ix(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[ix(k, i + 1)] * v[ix(k, j)];
                }
                for k in 0..=i {
                    v[ix(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[ix(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
        v[ix(n - 1, j)] = 0.0;
    }
    v[ix(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// `sqrt(a^2 + b^2)`; libm's `hypot` guards against overflow at a cost that showed up as 12% of
/// the eigensolver, so it is only used when the plain formula would overflow or underflow.
fn hyp(a: f64, b: f64) -> f64 {
    let s = a * a + b * b;
    if s.is_normal() && s < 1e300 {
        s.sqrt()
    } else {
        a.hypot(b)
    }
}

/// Implicit QL on the tridiagonal `(d, e)`, rotating the rows of `vt` (the eigenvectors, one per
/// row, on return).
fn tql2(n: usize, vt: &mut [f64], d: &mut [f64], e: &mut [f64]) -> Result<(), String> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 100 {
                    return Err(format!(
                        "eigendecomposition did not converge (eigenvalue {l} of {n})"
                    ));
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = hyp(p, 1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0f64;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0f64;
                let mut s2 = 0.0f64;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = hyp(p, e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = vt.split_at_mut((i + 1) * n);
                    let row_i = &mut lo[i * n..];
                    let row_i1 = &mut hi[..n];
                    for (a, b) in row_i.iter_mut().zip(row_i1.iter_mut()) {
                        let hb = *b;
                        *b = s * *a + c * hb;
                        *a = c * *a - s * hb;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// A source whose images are preprocessed as they are read, so streamed data (STL-10's
/// unlabeled split) is whitened chunk by chunk and never held whole.
#[derive(Debug)]
pub struct Preprocessed<S> {
    inner: S,
    pre: Preprocess,
}

impl<S: ImageSource> Preprocessed<S> {
    /// `inner` with `pre` applied to each image read.
    pub fn new(inner: S, pre: Preprocess) -> Self {
        Preprocessed { inner, pre }
    }
    /// The preprocessing applied.
    pub fn preprocess(&self) -> Preprocess {
        self.pre
    }
    /// The source read before preprocessing.
    pub fn inner(&self) -> &S {
        &self.inner
    }
    /// The source read before preprocessing, giving this wrapper up.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: ImageSource> ImageSource for Preprocessed<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        self.inner.read_into(start, count, out)?;
        self.pre.apply_batch(out, self.shape())
    }
}

/// Several sources of the same image shape read as one, in order (e.g. STL-10 train followed by
/// unlabeled for the unsupervised fit).
pub struct Concat {
    parts: Vec<Box<dyn ImageSource>>,
    /// `starts[i]` is the global index of part `i`'s first image; one extra entry holds the total.
    starts: Vec<usize>,
    shape: (usize, usize, usize),
}

impl Concat {
    /// Fails when there are no parts or their image shapes differ.
    pub fn new(parts: Vec<Box<dyn ImageSource>>) -> Result<Self, DataError> {
        let Some(first) = parts.first() else {
            return Err(DataError::Invalid("concat: no sources given".into()));
        };
        let shape = first.shape();
        let mut starts = vec![0usize];
        for (i, p) in parts.iter().enumerate() {
            if p.shape() != shape {
                let (a, b) = (p.shape(), shape);
                return Err(DataError::Invalid(format!(
                    "concat: source {i} has images {}x{}x{} but source 0 has {}x{}x{}",
                    a.0, a.1, a.2, b.0, b.1, b.2
                )));
            }
            let last = starts[starts.len() - 1];
            let next = last
                .checked_add(p.len())
                .ok_or_else(|| DataError::Invalid("concat: too many images".into()))?;
            starts.push(next);
        }
        Ok(Concat {
            parts,
            starts,
            shape,
        })
    }
}

impl fmt::Debug for Concat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Concat")
            .field("starts", &self.starts)
            .field("shape", &self.shape)
            .finish()
    }
}

impl ImageSource for Concat {
    fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        let per = self.shape.0 * self.shape.1 * self.shape.2;
        check_request(self.len(), per, start, count, out.len())?;
        let (mut at, end) = (start, start + count);
        let mut written = 0;
        for (i, part) in self.parts.iter().enumerate() {
            let (lo, hi) = (self.starts[i], self.starts[i + 1]);
            if at >= hi || at >= end {
                continue;
            }
            let take = end.min(hi) - at;
            part.read_into(
                at - lo,
                take,
                &mut out[written * per..(written + take) * per],
            )?;
            written += take;
            at += take;
        }
        Ok(())
    }
}

impl From<Preprocess> for String {
    fn from(p: Preprocess) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Preprocess {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map_err(|e: DataError| e.to_string())
    }
}
