//! The links between layers on the CPU: a layer's map encoded per position, pooled, and
//! standardised per channel, and the [`LinkSource`] that serves the next layer's input images
//! computed from the layer below.
//!
//! Every map here is channel-major, `(K, H, W)` per image, the layout of the next layer's input.

use std::sync::Arc;

use super::spec::{LinkSpec, MapEncoding, PoolKind, PoolSpec};
use crate::cancel::CancelToken;
use crate::data::{DataError, Dataset, ImageSource, check_request};
use crate::dist::{Comm, Sharding, Solo};
use crate::error::Result;
use crate::geometry::Geometry;
use crate::prior::Prior;

/// Encodes one image's map: `l` its `L` `(P, K)` (position-major, as the CPU engine gives it),
/// `a` its patches `(P, R)` (for the triangle's distances; `l` must then hold SPEC's bias),
/// `out` the `(K, P)` encoding.
pub fn encode_image(enc: MapEncoding, g: &Geometry, l: &[f32], a: &[f32], out: &mut [f32]) {
    let (k, p, r) = (g.k, g.positions(), g.r());
    let mut d = vec![0f32; k];
    for u in 0..p {
        let lu = &l[u * k..(u + 1) * k];
        match enc {
            MapEncoding::Triangle { power } => {
                // ||a - theta||^2 = ||a||^2 - 2 (a . theta - ||theta||^2 / 2), as the features'
                // triangle encoding computes it.
                let norm: f32 = a[u * r..(u + 1) * r].iter().map(|v| v * v).sum();
                for (dk, &lk) in d.iter_mut().zip(lu) {
                    *dk = (norm - 2.0 * lk).max(0.0).sqrt();
                }
                let mean = d.iter().sum::<f32>() / k as f32;
                for (kk, &dk) in d.iter().enumerate() {
                    let t = (mean - dk).max(0.0);
                    out[kk * p + u] = if power == 1.0 { t } else { t.powf(power) };
                }
            }
            MapEncoding::Posterior => {
                let m = lu.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let s: f64 = lu.iter().map(|&v| ((v - m) as f64).exp()).sum();
                for (kk, &v) in lu.iter().enumerate() {
                    out[kk * p + u] = (((v - m) as f64).exp() / s) as f32;
                }
            }
            MapEncoding::LogP => {
                for (kk, &v) in lu.iter().enumerate() {
                    out[kk * p + u] = v;
                }
            }
        }
    }
}

/// Pools one image's `(K, ho, wo)` map `x` into `out`, `(K, ho', wo')` ([`PoolSpec::out_len`]).
/// Padded cells are left out of every window (so a window's mean is over the cells it covers).
pub fn pool_image(p: &PoolSpec, (k, ho, wo): (usize, usize, usize), x: &[f32], out: &mut [f32]) {
    let (oh, ow) = (
        p.out_len(ho).expect("the spec's shapes were checked"),
        p.out_len(wo).expect("the spec's shapes were checked"),
    );
    let range = |o: usize, n: usize| {
        let lo = (o * p.stride).saturating_sub(p.pad);
        let hi = (o * p.stride + p.window).saturating_sub(p.pad).min(n);
        lo..hi
    };
    for c in 0..k {
        let xc = &x[c * ho * wo..(c + 1) * ho * wo];
        for oy in 0..oh {
            for ox in 0..ow {
                let cells = || {
                    range(oy, ho).flat_map(move |y| range(ox, wo).map(move |xx| xc[y * wo + xx]))
                };
                out[(c * oh + oy) * ow + ox] = match p.kind {
                    PoolKind::Max => cells().fold(f32::NEG_INFINITY, f32::max),
                    PoolKind::Avg => {
                        let (s, n) =
                            cells().fold((0f64, 0usize), |(s, n), v| (s + v as f64, n + 1));
                        (s / n.max(1) as f64) as f32
                    }
                    PoolKind::Lse => {
                        let m = cells().fold(f32::NEG_INFINITY, f32::max);
                        if m.is_finite() {
                            let s: f64 = cells().map(|v| ((v - m) as f64).exp()).sum();
                            (m as f64 + s.ln()) as f32
                        } else {
                            m
                        }
                    }
                };
            }
        }
    }
}

/// Where a link's standardisation is fitted: over the images of this process (`solo`), or over
/// the whole data from one rank's shard of it.
pub(crate) struct NormFit<'a> {
    pub sharding: Sharding,
    pub comm: &'a dyn Comm,
}

impl NormFit<'static> {
    /// All `n` images here, summed in batches of `batch` (see [`ChannelNorm::fit`]).
    pub fn solo(n: usize, batch: usize) -> Result<Self> {
        Ok(Self {
            sharding: Sharding::new(n, batch, 0, 1)?,
            comm: &Solo,
        })
    }
}

/// A per-channel standardisation `(x - mean[c]) / scale[c]`, fitted on the training maps.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelNorm {
    /// Each channel's mean.
    pub mean: Vec<f32>,
    /// Each channel's divisor: `sqrt(var[c] + eps)`, `eps` a millionth of the mean variance
    /// (so a channel that never varies maps to 0 instead of dividing by 0).
    pub scale: Vec<f32>,
}

impl ChannelNorm {
    /// The means and variances of `source`'s channels over all images and positions: summed in
    /// f64 in image order within each batch of `batch` images, from zero, and the batches' sums
    /// then added in order (the same bits on any machine, and for any number of ranks through
    /// [`ChannelNorm::fit_sharded`]).
    pub fn fit(
        source: &dyn ImageSource,
        batch: usize,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let n = source.len();
        if n == 0 {
            return Err(crate::CalmError::Invalid(
                "a standardisation needs at least one image".into(),
            ));
        }
        let sharding = Sharding::new(n, batch, 0, 1)?;
        Self::fit_sharded(source, sharding, &Solo, cancel, progress)
    }

    /// [`ChannelNorm::fit`] of the whole data from one rank's `shard` of it: every rank of
    /// `comm` calls it alike and gets the same bits as [`ChannelNorm::fit`] on all the images.
    /// `cancel` stops this rank alone, so in a job of several ranks give one that is never
    /// cancelled and agree on stopping afterwards.
    pub fn fit_sharded(
        shard: &dyn ImageSource,
        sharding: Sharding,
        comm: &dyn Comm,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Self> {
        let (c, h, w) = shard.shape();
        let (per, rounds) = (c * h * w, sharding.rounds());
        // Each round's batch sums [s1 (C), s2 (C)], this rank's, then everyone's.
        let mut send = vec![0f64; rounds * 2 * c];
        let chunk = ((64 << 20) / (per * 4).max(1)).clamp(1, sharding.batch);
        let mut buf = Vec::new();
        let mut done = 0;
        for j in 0..rounds {
            let Some((first, nb)) = sharding.local_batch(j) else {
                break;
            };
            let (s1, s2) = send[j * 2 * c..(j + 1) * 2 * c].split_at_mut(c);
            let mut start = first;
            while start < first + nb {
                cancel.check()?;
                let m = chunk.min(first + nb - start);
                buf.resize(m * per, 0.0);
                shard.read_into(start, m, &mut buf)?;
                for img in buf.chunks_exact(per) {
                    for (ch, plane) in img.chunks_exact(h * w).enumerate() {
                        for &v in plane {
                            s1[ch] += v as f64;
                            s2[ch] += v as f64 * v as f64;
                        }
                    }
                }
                start += m;
                done += m;
                progress(done);
            }
        }
        let mut all = vec![0f64; sharding.size * send.len()];
        comm.all_gather(&send, &mut all)?;
        let (mut s1, mut s2) = (vec![0f64; c], vec![0f64; c]);
        for b in 0..sharding.batches() {
            let (q, j) = (b % sharding.size, b / sharding.size);
            let sums = &all[(q * rounds + j) * 2 * c..(q * rounds + j + 1) * 2 * c];
            s1.iter_mut().zip(&sums[..c]).for_each(|(a, v)| *a += v);
            s2.iter_mut().zip(&sums[c..]).for_each(|(a, v)| *a += v);
        }
        let count = (sharding.n * h * w).max(1) as f64;
        let mean: Vec<f64> = s1.iter().map(|s| s / count).collect();
        let var: Vec<f64> = s2
            .iter()
            .zip(&mean)
            .map(|(s, m)| (s / count - m * m).max(0.0))
            .collect();
        let eps = 1e-6 * var.iter().sum::<f64>() / c.max(1) as f64 + f64::MIN_POSITIVE;
        Ok(Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            scale: var.iter().map(|&v| (v + eps).sqrt() as f32).collect(),
        })
    }

    /// Standardises one image `(C, H, W)` in place.
    pub fn apply(&self, img: &mut [f32]) {
        let plane = img.len() / self.mean.len().max(1);
        for ((x, &m), &s) in img.chunks_exact_mut(plane).zip(&self.mean).zip(&self.scale) {
            x.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
    }

    /// Checks its sizes for `c` channels and that every value is finite and every scale positive.
    pub fn check(&self, c: usize) -> std::result::Result<(), String> {
        if self.mean.len() != c || self.scale.len() != c {
            return Err(format!(
                "a channel standardisation of {} means and {} scales for {c} channels",
                self.mean.len(),
                self.scale.len()
            ));
        }
        if self.mean.iter().any(|v| !v.is_finite())
            || self.scale.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err("a channel standardisation holds a non-finite mean or scale".into());
        }
        Ok(())
    }
}

/// A layer's link applied to its input: the images of the next layer (or the head's maps),
/// computed from `input` a batch at a time on the CPU engine.
pub struct LinkSource {
    /// The layer's input after its whitening filter.
    input: Arc<dyn ImageSource>,
    g: Geometry,
    theta: Vec<f32>,
    bias: Vec<f32>,
    link: LinkSpec,
    norm: Option<ChannelNorm>,
    out: (usize, usize, usize),
}

impl LinkSource {
    /// `link` after the layer `(g, theta, prior)` on `input` (already through the layer's
    /// whitening), standardised by `norm` where given.
    pub fn new(
        input: Arc<dyn ImageSource>,
        g: Geometry,
        theta: &[f32],
        prior: &Prior,
        link: LinkSpec,
        norm: Option<ChannelNorm>,
    ) -> Result<Self> {
        let out = link.out_shape(g.k, g.ho, g.wo).ok_or_else(|| {
            crate::CalmError::Invalid(format!(
                "the link `{link}` does not fit the layer's {}x{} map",
                g.ho, g.wo
            ))
        })?;
        // The triangle's distances need SPEC's bias; the posterior and L use the layer's prior.
        let (theta, bias) = match link.encoding {
            MapEncoding::Triangle { .. } => (theta.to_vec(), g.bias_f32(theta)),
            _ => prior.effective(&g, theta),
        };
        if let Some(n) = &norm {
            n.check(out.0).map_err(crate::CalmError::Model)?;
        }
        Ok(Self {
            input,
            g,
            theta,
            bias,
            link,
            norm,
            out,
        })
    }

    /// The same link with a standardisation (fitted with [`ChannelNorm::fit`] on `self`).
    pub fn with_norm(mut self, norm: Option<ChannelNorm>) -> Self {
        self.norm = norm;
        self
    }
}

impl ImageSource for LinkSource {
    fn len(&self) -> usize {
        self.input.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.out
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        let (c, h, w) = self.out;
        let per = c * h * w;
        check_request(self.len(), per, start, count, out.len())?;
        let (g, link) = (&self.g, self.link);
        let enc_len = g.k * g.positions();
        let maps = crate::cpu::fast::image_maps(
            g,
            self.input.as_ref(),
            &self.theta,
            &self.bias,
            start,
            count,
            per,
            &|l, a, o| match &link.pool {
                None => encode_image(link.encoding, g, l, a, o),
                Some(p) => {
                    let mut e = vec![0f32; enc_len];
                    encode_image(link.encoding, g, l, a, &mut e);
                    pool_image(p, (g.k, g.ho, g.wo), &e, o);
                }
            },
        )
        .map_err(|e| DataError::Invalid(format!("computing the next layer's input: {e}")))?;
        out.copy_from_slice(&maps);
        if let Some(n) = &self.norm {
            out.chunks_exact_mut(per).for_each(|img| n.apply(img));
        }
        Ok(())
    }
}

/// Images of `source` standardised by `norm` as they are read: the same bits as a
/// [`LinkSource`] with that standardisation, over a link's outputs already computed.
pub struct Normed {
    source: Arc<dyn ImageSource>,
    norm: ChannelNorm,
}

impl Normed {
    /// `source` standardised by `norm` (checked against its channels).
    pub fn new(source: Arc<dyn ImageSource>, norm: ChannelNorm) -> Result<Self> {
        norm.check(source.shape().0)
            .map_err(crate::CalmError::Invalid)?;
        Ok(Self { source, norm })
    }
}

impl ImageSource for Normed {
    fn len(&self) -> usize {
        self.source.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.source.shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        self.source.read_into(start, count, out)?;
        let (c, h, w) = self.source.shape();
        out.chunks_exact_mut(c * h * w)
            .for_each(|img| self.norm.apply(img));
        Ok(())
    }
}

/// Every image of `source`, `(N, C, H, W)` flattened, read a batch at a time with `progress`
/// (images done) and `cancel`.
pub fn read_all(
    source: &dyn ImageSource,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f32>> {
    let (c, h, w) = source.shape();
    let (n, per) = (source.len(), c * h * w);
    let mut all = vec![0f32; n * per];
    let batch = ((256 << 20) / (per * 4).max(1)).clamp(1, 1000);
    let mut start = 0;
    while start < n {
        cancel.check()?;
        let nb = batch.min(n - start);
        source.read_into(start, nb, &mut all[start * per..(start + nb) * per])?;
        start += nb;
        progress(start);
    }
    Ok(all)
}

/// `source` held in memory when its images take at most `budget` bytes (read once, a batch at a
/// time, with `progress` and `cancel`); else `source` itself, recomputed on every read.
pub fn materialize(
    source: Arc<dyn ImageSource>,
    budget: u64,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize),
) -> Result<Arc<dyn ImageSource>> {
    let (c, h, w) = source.shape();
    let (n, per) = (source.len(), c * h * w);
    if (n as u64).saturating_mul(per as u64 * 4) > budget {
        return Ok(source);
    }
    let all = read_all(source.as_ref(), cancel, progress)?;
    let images = ndarray::Array4::from_shape_vec((n, c, h, w), all)
        .expect("n * per values make (n, c, h, w)");
    Ok(Arc::new(Dataset::new(images, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(kind: PoolKind, window: usize, stride: usize, pad: usize) -> PoolSpec {
        PoolSpec {
            kind,
            window,
            stride,
            pad,
        }
    }

    /// Pooling against windows written out by hand.
    #[test]
    fn pooling_by_hand() {
        // One channel of 3 x 3: 1..=9.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let mut out = vec![0f32; 4];
        pool_image(&pool(PoolKind::Max, 2, 1, 0), (1, 3, 3), &x, &mut out);
        assert_eq!(out, [5.0, 6.0, 8.0, 9.0]);
        pool_image(&pool(PoolKind::Avg, 2, 1, 0), (1, 3, 3), &x, &mut out);
        assert_eq!(out, [3.0, 4.0, 6.0, 7.0]);
        // Window 2, stride 2, padding 1 on 3 x 3: windows cover rows {0}, {1, 2}.
        pool_image(&pool(PoolKind::Avg, 2, 2, 1), (1, 3, 3), &x, &mut out);
        assert_eq!(out, [1.0, 2.5, 5.5, 7.0]);
        let mut one = vec![0f32; 1];
        pool_image(&pool(PoolKind::Lse, 3, 3, 0), (1, 3, 3), &x, &mut one);
        let want = (1..=9).map(|v| (v as f64).exp()).sum::<f64>().ln() as f32;
        assert!((one[0] - want).abs() < 1e-6, "{} {want}", one[0]);
    }

    /// The triangle map pooled over the whole map equals the features' triangle encoding on a
    /// 1 x 1 grid (its sum over positions) divided by the positions.
    #[test]
    fn triangle_map_matches_the_features_encoding() {
        let layer = crate::LayerConfig {
            kernels: 5,
            width: 3,
            pad: 1,
        };
        let g = Geometry::new(layer, 2, 6, 6).unwrap();
        let n = 3;
        let mut rng = 7u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 1000) as f32 / 500.0 - 1.0
        };
        let x: Vec<f32> = (0..n * 2 * 36).map(|_| next()).collect();
        let theta: Vec<f32> = (0..g.k * g.r()).map(|_| next()).collect();
        let data: Arc<dyn ImageSource> = Arc::new(Dataset::new(
            ndarray::Array4::from_shape_vec((n, 2, 6, 6), x).unwrap(),
            None,
        ));
        let link = LinkSpec {
            encoding: MapEncoding::Triangle { power: 1.0 },
            pool: Some(pool(PoolKind::Avg, 6, 6, 0)),
            norm: false,
        };
        let src =
            LinkSource::new(data.clone(), g, &theta, &Prior::uniform(g.k), link, None).unwrap();
        assert_eq!(src.shape(), (5, 1, 1));
        let mut maps = vec![0f32; n * 5];
        src.read_into(0, n, &mut maps).unwrap();
        let f = crate::cpu::fast::features(
            &g,
            data.as_ref(),
            &theta,
            &g.bias_f32(&theta),
            n,
            crate::Pooling {
                grid: 1,
                encoding: crate::Encoding::Triangle,
            },
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap();
        for (a, b) in maps.iter().zip(f.iter()) {
            assert!((a - b / 36.0).abs() <= 1e-5 * (1.0 + b.abs()), "{a} {b}");
        }
        // The posterior sums to 1 over the kernels at each position.
        let post = LinkSpec {
            encoding: MapEncoding::Posterior,
            pool: None,
            norm: false,
        };
        let src = LinkSource::new(data, g, &theta, &Prior::uniform(g.k), post, None).unwrap();
        let mut m = vec![0f32; n * 5 * 36];
        src.read_into(0, n, &mut m).unwrap();
        for img in m.chunks_exact(5 * 36) {
            for u in 0..36 {
                let s: f32 = (0..5).map(|k| img[k * 36 + u]).sum();
                assert!((s - 1.0).abs() < 1e-5, "{s}");
            }
        }
    }

    #[test]
    fn channel_norm_standardises_and_is_checked() {
        let x: Vec<f32> = (0..2 * 2 * 4).map(|v| (v % 7) as f32).collect();
        let d = Dataset::new(
            ndarray::Array4::from_shape_vec((2, 2, 2, 2), x).unwrap(),
            None,
        );
        let norm = ChannelNorm::fit(&d, 7, &CancelToken::new(), &mut |_| {}).unwrap();
        let mut all = d.images.as_slice().unwrap().to_vec();
        all.chunks_exact_mut(8).for_each(|img| norm.apply(img));
        for ch in 0..2 {
            let v: Vec<f64> = all
                .chunks_exact(8)
                .flat_map(|img| img[ch * 4..ch * 4 + 4].iter().map(|&v| v as f64))
                .collect();
            let mean = v.iter().sum::<f64>() / 8.0;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 8.0;
            assert!(
                mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
        assert!(norm.check(2).is_ok() && norm.check(3).is_err());
    }
}
