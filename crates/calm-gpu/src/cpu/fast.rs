//! The fast CPU engine: the E-step and the M-step as two GEMMs per chunk of images (through the
//! `gemm` crate), chunks spread over all cores with rayon.
//!
//! Per chunk of `n` images with `P = Ho*Wo` positions, `R = C*w*w`:
//! - `A = im2col(Xpad)`, `(n*P) x R`, built once and used by both products;
//! - E-step `L = A theta^T + bias`, `(n*P) x K`;
//! - per image `m = max L`, `E = exp(L - m)` in place (f32, `exp_nonpos`), `s = sum E` (f64),
//!   `logp = m + ln s`, then `G = E / s` in place, which is `exp(L - logp)` with one `exp` per
//!   element instead of two (with [`Posterior::Patch`] the same per patch, a row of K);
//! - M-step `T_chunk = G^T A`, `K x R`, and `B_chunk[k] = sum_m G[m,k]` (f64).
//!
//! Chunks are fixed-size and their partial sums are added in chunk order in f64, so the result
//! does not depend on the number of threads, and splits the M-step's long reduction the way
//! PERF.md suggests. Every reduction inside a chunk has a fixed order (explicit lanes, no
//! reassociation by the compiler), so the result is also the same with and without AVX2 or
//! AVX-512.

use std::sync::{Arc, Mutex};

use ndarray::Array2;
use rayon::prelude::*;

use crate::cancel::CancelToken;
use crate::data::ImageSource;
use crate::engine::{Engine, EpochStats, Posterior, Stats};
use crate::error::Result;
use crate::features::{Encoding, Pooling};
use crate::geometry::Geometry;
use crate::prior::Prior;

/// Images per parallel work item. Fixed (not derived from the thread count) so that results are
/// bit-identical on any machine. About 2 MB of `A` plus `L` per chunk: 6 MNIST images
/// (1014 x 400 patches). On the 2-core machine of docs/perf.md, 6 to 16 images per chunk ran
/// equally fast, 2 images 4% and 1 image 12% slower (gemm's per-call cost), 32 images 11%
/// slower.
fn chunk_images(g: &Geometry) -> usize {
    // The unit tests below use small chunks so that their small shapes still make many.
    const BYTES: usize = if cfg!(test) { 20 << 10 } else { 2 << 20 };
    let per_image = g.positions() * (g.r() + g.k) * 4;
    (BYTES / per_image.max(1)).max(1)
}

/// Chunks whose `T` (`K x R` f32 each) are held at once before they are added into the epoch's
/// sum: as many as 256 MB holds, at least one per thread. The sum runs in chunk order whatever
/// this is, so results do not depend on it. (Holding every chunk's `T` of a batch, as before,
/// took 160 GB for K 100,000 kernels of 20x20 in batches of 1,000 and was killed.)
fn wave_chunks(g: &Geometry) -> usize {
    const BYTES: usize = 256 << 20;
    let t = g.k * g.r() * 4;
    (BYTES / t.max(1)).max(rayon::current_num_threads()).max(1)
}

/// Host bytes the CPU engine needs at least for `g`: each worker's chunk buffers (images,
/// padded images, patches `A`, `L`), the `T` of a wave of chunks (`wave_chunks`; at most the
/// batch's), plus the f64 sums.
pub fn host_bytes(g: &Geometry, batch: usize) -> u128 {
    let ci = chunk_images(g);
    let (p, r, k) = (g.positions() as u128, g.r() as u128, g.k as u128);
    let image = (g.c * g.h * g.w) as u128 + g.padded_len() as u128;
    let worker = ci as u128 * (image + p * r + p * k) * 4;
    let held = wave_chunks(g).min(batch.max(1).div_ceil(ci)) as u128;
    rayon::current_num_threads() as u128 * worker + held * k * r * 4 + k * r * 8
}

/// Refuses a layer whose CPU-engine buffers ([`host_bytes`]) exceed the machine's memory
/// (Linux's `MemTotal`; elsewhere nothing is checked): an error instead of an abort when the
/// allocation fails mid-epoch.
pub fn check_host_memory(g: &Geometry, batch: usize) -> Result<()> {
    let Some(total) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
            .map(|kb| kb * 1024)
    }) else {
        return Ok(());
    };
    let need = host_bytes(g, batch);
    if need > total {
        return Err(crate::error::CalmError::Invalid(format!(
            "the CPU engine needs at least {:.1} GB for K {} kernels of {}x{}x{} on {}x{}x{} images, more than this machine's {:.1} GB; use fewer kernels or a smaller width",
            need as f64 / 1e9,
            g.k,
            g.c,
            g.kw,
            g.kw,
            g.c,
            g.h,
            g.w,
            total as f64 / 1e9
        )));
    }
    Ok(())
}

/// The fast CPU engine: each chunk's E-step and M-step as two GEMMs, chunks spread over all cores.
pub struct CpuEngine {
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: Vec<f32>,
    counts: Vec<f32>,
    prior: Prior,
    posterior: Posterior,
    batch: usize,
    /// Chunks per wave ([`wave_chunks`]).
    wave: usize,
    pool: Pool,
    cancel: CancelToken,
}

impl CpuEngine {
    /// `batch` bounds how many images are read and expanded at once (memory), nothing else.
    pub fn new(g: Geometry, source: Arc<dyn ImageSource>, theta: Vec<f32>, batch: usize) -> Self {
        assert_eq!(theta.len(), g.k * g.r());
        Self {
            counts: vec![0.0; g.k],
            prior: Prior::uniform(g.k),
            posterior: Posterior::Image,
            g,
            source,
            theta,
            batch: batch.max(1),
            wave: wave_chunks(&g),
            pool: Pool::default(),
            cancel: CancelToken::new(),
        }
    }

    /// The statistics of the batch of images `[start, start + nb)` into `out` (overwritten),
    /// summed over its chunks in chunk order in f64, whatever the threads and the waves.
    fn batch_stats(
        &self,
        (theta, bias): (&[f32], &[f32]),
        start: usize,
        nb: usize,
        out: &mut Stats,
    ) -> Result<()> {
        let g = self.g;
        out.ll = 0.0;
        out.b.iter_mut().for_each(|v| *v = 0.0);
        out.t.iter_mut().for_each(|v| *v = 0.0);
        let pool = &self.pool;
        let posterior = self.posterior;
        let (ci, wave) = (chunk_images(&g), self.wave);
        // The batch's chunks in waves of `wave` chunks, so that only a wave's T are held.
        let mut done = 0;
        while done < nb {
            if self.cancel.is_cancelled() {
                // Abandon the epoch: theta and counts are untouched until the update.
                return Err(crate::CalmError::Interrupted);
            }
            let nw = (wave * ci).min(nb - done);
            let parts = for_chunks(&g, self.source.as_ref(), pool, start + done, nw, |s, ni| {
                let spare = lock(&pool.t).pop().unwrap_or_default();
                stats_chunk(s, &g, ni, (theta, bias), posterior, spare)
            })?;
            for part in &parts {
                out.ll += part.ll;
                out.b
                    .iter_mut()
                    .zip(&part.b)
                    .for_each(|(acc, &v)| *acc += v);
            }
            out.t
                .par_chunks_mut(T_BLOCK)
                .enumerate()
                .for_each(|(i, tc)| {
                    for part in &parts {
                        tc.iter_mut()
                            .zip(&part.t[i * T_BLOCK..])
                            .for_each(|(acc, &v)| *acc += v as f64);
                    }
                });
            lock(&pool.t).extend(parts.into_iter().map(|p| p.t));
            done += nw;
        }
        Ok(())
    }
}

/// Defines `fn $name` whose body is compiled three times, for AVX-512F, for AVX2 and for the
/// baseline target, and picks the widest the CPU has at each call (std caches the check).
/// The bodies use only `+`, `*`, conversions and selects, and every reduction in them has
/// explicit lanes: Rust never contracts `a * b + c` into an FMA or reorders float sums, so all
/// three versions give bit-identical results; the wider ones only use wider vectors.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// `exp(x)` in f32 for `x <= 0` (also right up to `x = 88`), written with `+`, `*` and selects
/// only so that LLVM vectorises it: Cephes' `expf` (range reduction `x = n ln2 + r`,
/// `|r| <= ln2/2`, degree-7 polynomial, `2^n` built in the exponent bits). Against f64 `exp`
/// on every 2^-10 step of [-87, 0] and 10^6 random points the error is below 1 ulp (0.97
/// measured, the test below checks it), where libm's f64 `exp` rounded to f32 is within 0.5.
/// Results below `exp(-87) ~ 1.6e-38` are flushed to 0 (they are at least 1e-38 times the
/// largest term of every sum they enter). NaN in gives NaN out.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, 9 significant bits: n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LO: f32 = -87.0;
    // NaN compares false, so it passes through the clamp and the select below.
    let xc = if x < LO { LO } else { x };
    let k = xc * LOG2E + MAGIC;
    let n = k - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let z = r * r;
    let p = ((((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * z
        + r)
        + 1.0;
    // k's bits are MAGIC's plus n (|n| < 2^22), so this is 2^n for n in [-126, 127].
    let e = k
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127)
        .wrapping_shl(23);
    let y = p * f32::from_bits(e);
    if x < LO { 0.0 } else { y }
}

/// Lanes of the explicit (fixed-order) reductions below.
const LANES: usize = 16;

multiversion! {
    /// Turns one image's `L` (`P x K`, row-major, bias included) into its posterior
    /// `G = exp(L - logp)` in place, adds `sum_p G[p,k]` to `b[k]` and returns `logp`.
    fn posterior_image(li: &mut [f32], b: &mut [f64]) -> f64 {
        let k = b.len();
        // max (NaN is skipped here as by f32::max; it comes back through exp below)
        let mut mx = [f32::NEG_INFINITY; LANES];
        let mut it = li.chunks_exact(LANES);
        for ch in &mut it {
            for j in 0..LANES {
                mx[j] = if ch[j] > mx[j] { ch[j] } else { mx[j] };
            }
        }
        let mut m = it.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
        for v in mx {
            m = if v > m { v } else { m };
        }
        // E = exp(L - m) in place. L - m is exact in f32 wherever exp(L - m) is not tiny
        // (Sterbenz); when m is infinite it is NaN, and so is logp, as SPEC's stopping rule
        // needs.
        for v in li.iter_mut() {
            *v = exp_nonpos(*v - m);
        }
        // s = sum E in f64, in LANES fixed lanes.
        let mut acc = [0f64; LANES];
        let mut it = li.chunks_exact(LANES);
        for ch in &mut it {
            for j in 0..LANES {
                acc[j] += ch[j] as f64;
            }
        }
        let s = acc.iter().sum::<f64>() + it.remainder().iter().map(|&v| v as f64).sum::<f64>();
        let inv = 1.0 / s;
        for row in li.chunks_exact_mut(k) {
            for (v, acc) in row.iter_mut().zip(b.iter_mut()) {
                let gam = *v as f64 * inv;
                *acc += gam;
                *v = gam as f32;
            }
        }
        m as f64 + s.ln()
    }
}

multiversion! {
    /// `f[k] = logsumexp over p of L[p,k]` for one image's `L` (`P x K`, row-major), in the
    /// reference's semantics (an infinite maximum is returned as is). `mx`, `s`: scratch of K.
    fn features_image(li: &[f32], mx: &mut [f32], s: &mut [f64], f: &mut [f32]) {
        mx.fill(f32::NEG_INFINITY);
        s.fill(0.0);
        let k = mx.len();
        for row in li.chunks_exact(k) {
            for (m, &v) in mx.iter_mut().zip(row) {
                *m = if v > *m { v } else { *m };
            }
        }
        for row in li.chunks_exact(k) {
            for ((acc, &m), &v) in s.iter_mut().zip(mx.iter()).zip(row) {
                *acc += exp_nonpos(v - m) as f64;
            }
        }
        for ((f, &m), &s) in f.iter_mut().zip(mx.iter()).zip(s.iter()) {
            *f = if m.is_finite() {
                (m as f64 + s.ln()) as f32
            } else {
                m
            };
        }
    }
}

multiversion! {
    /// `l[row, k] += bias[k]` for a row-major `rows x K` matrix.
    fn add_bias(l: &mut [f32], bias: &[f32]) {
        for row in l.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// Copies a short row (`kw` floats) with fixed-size 8-float moves, not a `memcpy` call; for
/// `kw >= 8` the last move overlaps the one before it instead of a scalar tail.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let src = &src[..n];
    if n < 8 {
        dst.copy_from_slice(src);
        return;
    }
    let mut j = 0;
    while j + 8 < n {
        let v: [f32; 8] = src[j..j + 8].try_into().expect("8");
        dst[j..j + 8].copy_from_slice(&v);
        j += 8;
    }
    let v: [f32; 8] = src[n - 8..].try_into().expect("8");
    dst[n - 8..].copy_from_slice(&v);
}

multiversion! {
    /// Builds the `(n*P) x R` patch matrix of `n` padded images `(C, Hp, Wp)`.
    fn im2col_padded(g: &Geometry, xpad: &[f32], n: usize, a: &mut [f32]) {
        let (r, kw) = (g.r(), g.kw);
        let mut rows = a.chunks_exact_mut(r);
        for img in 0..n {
            for h in 0..g.ho {
                for w in 0..g.wo {
                    let arow = rows.next().expect("a holds n*P rows");
                    for c in 0..g.c {
                        let base = ((img * g.c + c) * g.hp + h) * g.wp + w;
                        for i in 0..kw {
                            let src = &xpad[base + i * g.wp..];
                            copy_short(&mut arow[(c * kw + i) * kw..][..kw], src);
                        }
                    }
                }
            }
        }
    }
}

/// One worker's buffers for one chunk, reused from chunk to chunk through a [`Pool`].
#[derive(Default)]
struct Scratch {
    /// The chunk's images as read, `(n, C, H, W)`.
    x: Vec<f32>,
    /// The same zero-padded, `(n, C, Hp, Wp)`.
    xpad: Vec<f32>,
    /// Patch matrix, `(n*P) x R`.
    a: Vec<f32>,
    /// `L`, then the posterior `G`, `(n*P) x K`.
    l: Vec<f32>,
}

impl Scratch {
    /// Reads images `start .. start + n` and builds their patch matrix `a`.
    fn patches(
        &mut self,
        g: &Geometry,
        source: &dyn ImageSource,
        start: usize,
        n: usize,
    ) -> Result<()> {
        let (c, h, w, p) = (g.c, g.h, g.w, g.pad);
        self.x.resize(n * c * h * w, 0.0);
        source.read_into(start, n, &mut self.x)?;
        self.xpad.clear();
        self.xpad.resize(n * g.padded_len(), 0.0);
        for img in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    let src = ((img * c + ch) * h + y) * w;
                    let dst = ((img * c + ch) * g.hp + y + p) * g.wp + p;
                    self.xpad[dst..dst + w].copy_from_slice(&self.x[src..src + w]);
                }
            }
        }
        // Every element of `a` is written by im2col, so a resize (no clear) is enough.
        self.a.resize(n * g.positions() * g.r(), 0.0);
        im2col_padded(g, &self.xpad, n, &mut self.a);
        if g.patch_norm.is_some() {
            for row in self.a.chunks_exact_mut(g.r()) {
                g.normalize(row);
            }
        }
        Ok(())
    }

    /// `l = A theta^T + bias` for the chunk whose patches are in `a`, `(n*P) x K` row-major.
    fn estep(&mut self, g: &Geometry, n: usize, theta: &[f32], bias: &[f32]) {
        let (r, k) = (g.r(), g.k);
        let rows = n * g.positions();
        self.l.resize(rows * k, 0.0);
        debug_assert!(self.a.len() >= rows * r && theta.len() == k * r);
        // SAFETY: `l` holds rows*K, `a` rows*R and `theta` K*R elements and the strides below
        // address them in bounds: dst (rows x K, row-major), lhs A (rows x R, row-major), rhs
        // theta^T (R x K, i.e. theta read column-major). With alpha 0 and read_dst false, dst
        // is only written.
        unsafe {
            gemm::gemm(
                rows,
                k,
                r,
                self.l.as_mut_ptr(),
                1,
                k as isize,
                false,
                self.a.as_ptr(),
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
        add_bias(&mut self.l[..rows * k], bias);
    }
}

/// Buffers kept between chunks, batches and epochs (allocating them per chunk cost page faults).
#[derive(Default)]
struct Pool {
    scratch: Mutex<Vec<Scratch>>,
    /// Spare `K x R` buffers for the chunks' `T`.
    t: Mutex<Vec<Vec<f32>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    fn with_scratch<R>(&self, f: impl FnOnce(&mut Scratch) -> R) -> R {
        let mut s = lock(&self.scratch).pop().unwrap_or_default();
        let r = f(&mut s);
        lock(&self.scratch).push(s);
        r
    }
}

struct ChunkStats {
    t: Vec<f32>,
    b: Vec<f64>,
    ll: f64,
}

/// The chunk's statistics from its patches `s.a`: E-step, posterior, M-step.
fn stats_chunk(
    s: &mut Scratch,
    g: &Geometry,
    n: usize,
    (theta, bias): (&[f32], &[f32]),
    posterior: Posterior,
    t: Vec<f32>,
) -> ChunkStats {
    let (r, k, p) = (g.r(), g.k, g.positions());
    let rows = n * p;
    s.estep(g, n, theta, bias);
    let mut b = vec![0f64; k];
    let mut ll = 0f64;
    // One normalisation per image (P x K values), or per patch (a row of K).
    let per = match posterior {
        Posterior::Image => p * k,
        Posterior::Patch => k,
    };
    for li in s.l[..rows * k].chunks_exact_mut(per) {
        ll += posterior_image(li, &mut b);
    }
    let mut t = t;
    t.resize(k * r, 0.0);
    // SAFETY: dst T (K x R, row-major), lhs G^T (K x rows: G is rows x K row-major, so read
    // column-major), rhs A (rows x R, row-major); all in bounds of the buffers above. With
    // alpha 0 and read_dst false, T is only written.
    unsafe {
        gemm::gemm(
            k,
            r,
            rows,
            t.as_mut_ptr(),
            1,
            r as isize,
            false,
            s.l.as_ptr(),
            k as isize,
            1,
            s.a.as_ptr(),
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

/// Runs `f` over fixed-size chunks of images `[start, start + n)` in parallel (each chunk read
/// and expanded by its worker) and returns the results in chunk order.
fn for_chunks<T: Send>(
    g: &Geometry,
    source: &dyn ImageSource,
    pool: &Pool,
    start: usize,
    n: usize,
    f: impl Fn(&mut Scratch, usize) -> T + Sync,
) -> Result<Vec<T>> {
    let ci = chunk_images(g);
    (0..n.div_ceil(ci))
        .into_par_iter()
        .map(|c| {
            let ni = ci.min(n - c * ci);
            pool.with_scratch(|s| {
                s.patches(g, source, start + c * ci, ni)?;
                Ok(f(s, ni))
            })
        })
        .collect()
}

/// `T` entries per task of the parallel sum over chunks (16 KB of f64).
const T_BLOCK: usize = 2048;

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
        let stats = self.stats(0, self.source.len(), progress)?;
        self.apply(&stats)
    }

    /// Each batch's statistics are summed from zero over its chunks, then added to the range's
    /// in batch order ([`Engine::exact_batches`]).
    fn stats(
        &mut self,
        start: usize,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Stats> {
        let g = self.g;
        let end = start + count;
        if end > self.source.len() {
            return Err(crate::CalmError::Invalid(format!(
                "stats of images {start}..{end} of {}",
                self.source.len()
            )));
        }
        let (theta, bias) = self.prior.effective(&g, &self.theta);
        let mut total = Stats::zeros(&g);
        let mut batch = Stats::zeros(&g);
        let mut at = start;
        while at < end {
            let nb = self.batch.min(end - at);
            self.batch_stats((&theta, &bias), at, nb, &mut batch)?;
            total.ll += batch.ll;
            for (acc, &v) in total.b.iter_mut().zip(&batch.b) {
                *acc += v;
            }
            total
                .t
                .par_chunks_mut(T_BLOCK)
                .zip(batch.t.par_chunks(T_BLOCK))
                .for_each(|(acc, part)| acc.iter_mut().zip(part).for_each(|(a, &v)| *a += v));
            at += nb;
            progress(at - start);
        }
        Ok(total)
    }

    fn apply(&mut self, stats: &Stats) -> Result<EpochStats> {
        let up = super::reference::update(&self.g, stats);
        let finite = stats.ll.is_finite() && up.is_finite();
        if finite {
            self.theta = up.theta.iter().map(|&v| v as f32).collect();
            self.counts = up.counts.iter().map(|&v| v as f32).collect();
        }
        Ok(EpochStats {
            loglik: stats.ll,
            count_sum: up.count_sum,
            finite,
        })
    }

    fn exact_batches(&self) -> bool {
        true
    }

    fn batch(&self) -> usize {
        self.batch
    }

    fn theta(&mut self) -> Result<Vec<f32>> {
        Ok(self.theta.clone())
    }

    fn set_theta(&mut self, theta: &[f32]) -> Result<()> {
        if theta.len() != self.theta.len() {
            return Err(crate::CalmError::Invalid(format!(
                "set_theta: {} values for {} weights",
                theta.len(),
                self.theta.len()
            )));
        }
        self.theta = theta.to_vec();
        Ok(())
    }

    fn counts(&mut self) -> Result<Vec<f32>> {
        Ok(self.counts.clone())
    }

    fn prior(&self) -> Prior {
        self.prior.clone()
    }

    fn set_cancel(&mut self, cancel: CancelToken) {
        self.cancel = cancel;
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn set_prior(&mut self, prior: &Prior) -> Result<()> {
        prior.check(self.g.k).map_err(crate::CalmError::Invalid)?;
        self.prior = prior.clone();
        Ok(())
    }
    fn set_posterior(&mut self, posterior: Posterior) -> Result<()> {
        self.posterior = posterior;
        Ok(())
    }
}

/// Features `f[n,k] = logsumexp over (h,w) of L[n,k,h,w]` for every image of `source`, `(N, K)`.
/// Features of every image of `source` under `L = A theta^T + bias` (SPEC's bias, or a prior's
/// effective weights, [`Prior::effective`]): the encoding pooled over each of `grid x grid`
/// regions of the positions, `(N, K * grid * grid)` laid out `(n, k, a, b)` (the layout of
/// `shaders/features.wgsl`); `grid = 1` with the log-sum-exp is SPEC's `f[n,k] =
/// logsumexp_{h,w} L[n,k,h,w]`. The triangle encoding needs SPEC's bias.
#[allow(clippy::too_many_arguments)]
pub fn features(
    g: &Geometry,
    source: &dyn ImageSource,
    theta: &[f32],
    bias: &[f32],
    batch: usize,
    pooling: Pooling,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize),
) -> Result<Array2<f32>> {
    let (k, p, r) = (g.k, g.positions(), g.r());
    let (grid, encoding) = (pooling.grid.max(1), pooling.encoding);
    let per = k * grid * grid;
    let pool = Pool::default();
    let n = source.len();
    let mut out = Array2::<f32>::zeros((n, per));
    let mut start = 0;
    while start < n {
        cancel.check()?;
        let nb = batch.max(1).min(n - start);
        let parts = for_chunks(g, source, &pool, start, nb, |s, ni| {
            s.estep(g, ni, theta, bias);
            let mut f = vec![0f32; ni * per];
            let (mut mx, mut sum) = (vec![0f32; k], vec![0f64; k]);
            let mut region_rows = Vec::new();
            let mut fr = vec![0f32; k];
            if encoding == Encoding::Triangle {
                for ((li, ai), fi) in s.l[..ni * p * k]
                    .chunks_exact(p * k)
                    .zip(s.a.chunks_exact(p * r))
                    .zip(f.chunks_exact_mut(per))
                {
                    triangle_image(g, li, ai, grid, fi);
                }
                return f;
            }
            for (li, fi) in s.l[..ni * p * k]
                .chunks_exact(p * k)
                .zip(f.chunks_exact_mut(per))
            {
                if grid == 1 {
                    features_image(li, &mut mx, &mut sum, fi);
                    continue;
                }
                for a in 0..grid {
                    for bb in 0..grid {
                        region_rows.clear();
                        for h in a * g.ho / grid..(a + 1) * g.ho / grid {
                            for w in bb * g.wo / grid..(bb + 1) * g.wo / grid {
                                let row = h * g.wo + w;
                                region_rows.extend_from_slice(&li[row * k..(row + 1) * k]);
                            }
                        }
                        features_image(&region_rows, &mut mx, &mut sum, &mut fr);
                        for (kk, &v) in fr.iter().enumerate() {
                            fi[kk * grid * grid + a * grid + bb] = v;
                        }
                    }
                }
            }
            f
        })?;
        let flat: Vec<f32> = parts.into_iter().flatten().collect();
        out.as_slice_mut().expect("standard layout")[start * per..(start + nb) * per]
            .copy_from_slice(&flat);
        start += nb;
        progress(start);
    }
    Ok(out)
}

/// What [`image_maps`] calls per image: its `L` `(P, K)`, its patches `(P, R)`, its outputs.
pub type ImageMapFn<'a> = dyn Fn(&[f32], &[f32], &mut [f32]) + Sync + 'a;

/// Per-image maps of images `[start, start + n)`: `f(l, a, out)` gets each image's `L` `(P, K)`
/// under `theta` and `bias` (`L = A theta^T + bias`), its patch matrix `A` `(P, R)` and its
/// `per` output values, and writes them. Images run in parallel over fixed chunks; the result
/// is `(n, per)` in image order, the same bits on any number of threads.
#[allow(clippy::too_many_arguments)]
pub fn image_maps(
    g: &Geometry,
    source: &dyn ImageSource,
    theta: &[f32],
    bias: &[f32],
    start: usize,
    n: usize,
    per: usize,
    f: &ImageMapFn<'_>,
) -> Result<Vec<f32>> {
    let (k, p, r) = (g.k, g.positions(), g.r());
    let pool = Pool::default();
    let parts = for_chunks(g, source, &pool, start, n, |s, ni| {
        s.estep(g, ni, theta, bias);
        let mut out = vec![0f32; ni * per];
        for ((li, ai), oi) in s.l[..ni * p * k]
            .chunks_exact(p * k)
            .zip(s.a.chunks_exact(p * r))
            .zip(out.chunks_exact_mut(per.max(1)))
        {
            f(li, ai, oi);
        }
        out
    })?;
    Ok(parts.into_iter().flatten().collect())
}

/// Triangle features of one image (see [`Encoding::Triangle`]): `l` its `L` as `(P, K)`, `a` its
/// patch matrix `(P, R)`, `f` its `K * grid * grid` features laid out `(k, a, b)`. Distances and
/// means in f32 as the GPU's, sums over regions in f64.
fn triangle_image(g: &Geometry, l: &[f32], a: &[f32], grid: usize, f: &mut [f32]) {
    let (k, r) = (g.k, g.r());
    let mut acc = vec![0f64; k * grid * grid];
    let mut d = vec![0f32; k];
    for ra in 0..grid {
        for rb in 0..grid {
            let region = ra * grid + rb;
            for h in ra * g.ho / grid..(ra + 1) * g.ho / grid {
                for w in rb * g.wo / grid..(rb + 1) * g.wo / grid {
                    let u = h * g.wo + w;
                    let norm: f32 = a[u * r..(u + 1) * r].iter().map(|v| v * v).sum();
                    for (dk, &lk) in d.iter_mut().zip(&l[u * k..(u + 1) * k]) {
                        *dk = (norm - 2.0 * lk).max(0.0).sqrt();
                    }
                    let mean = d.iter().sum::<f32>() / k as f32;
                    for (kk, &dk) in d.iter().enumerate() {
                        acc[kk * grid * grid + region] += (mean - dk).max(0.0) as f64;
                    }
                }
            }
        }
    }
    for (fv, av) in f.iter_mut().zip(&acc) {
        *fv = *av as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_estimate_counts_the_chunk_buffers() {
        let l = |kernels, width, pad| crate::geometry::LayerConfig {
            kernels,
            width,
            pad,
        };
        let mnist = Geometry::new(l(64, 20, 2), 1, 28, 28).unwrap();
        // One chunk's patches and L alone, per worker, are a lower bound.
        let ci = chunk_images(&mnist) as u128;
        let floor = rayon::current_num_threads() as u128
            * ci
            * (mnist.positions() * (mnist.r() + mnist.k)) as u128
            * 4;
        // Plus the T (K x R f32) of each chunk of a batch, all of them while they fit a wave.
        let t = (mnist.k * mnist.r() * 4) as u128;
        let chunks = 1000u128.div_ceil(ci);
        assert!(chunks <= wave_chunks(&mnist) as u128);
        let bytes = host_bytes(&mnist, 1000);
        assert!(
            bytes >= floor + chunks * t && bytes < 4 * floor + chunks * t + (1 << 20),
            "{bytes} vs {floor} + {chunks} x {t}"
        );
        check_host_memory(&mnist, 1000).unwrap();
        // K 100,000 kernels of 20x20 (T 160 MB): a wave's T, not a batch's (which was 160 GB).
        let wide = Geometry::new(l(100_000, 20, 2), 1, 28, 28).unwrap();
        assert_eq!(host_bytes(&wide, 1000), host_bytes(&wide, 1_000_000));
        let t = (wide.k * wide.r() * 4) as u128;
        let held = wave_chunks(&wide) as u128;
        assert!(held < 1000 && host_bytes(&wide, 1000) >= held * t);
        // 2^31 L values per image and worker: beyond any machine this runs on.
        let huge = Geometry::new(l(2_000_000, 1, 0), 1, 32, 32).unwrap();
        assert!(host_bytes(&huge, 1000) > 8_000_000_000);
    }

    /// Error of `exp_nonpos` in units in the last place of the correctly rounded f32 result.
    fn ulps(x: f32) -> f64 {
        let want = (x as f64).exp();
        let got = exp_nonpos(x) as f64;
        let ulp = f32::EPSILON as f64 * 2f64.powi((want as f32).abs().log2().floor() as i32);
        (got - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_1_ulp_on_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            worst = worst.max(ulps(x));
            x += 1.0 / 1024.0;
        }
        // a fixed LCG for points between the grid's
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1_000_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let x = -87.0 * ((state >> 40) as f32 / (1u64 << 24) as f32);
            worst = worst.max(ulps(x));
        }
        assert!(worst < 1.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }

    #[test]
    fn posterior_matches_f64() {
        let (p, k) = (37, 5);
        let mut state = 7u64;
        let l: Vec<f32> = (0..p * k)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                -50.0 + 60.0 * ((state >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        let mut g = l.clone();
        let mut b = vec![0f64; k];
        let logp = posterior_image(&mut g, &mut b);
        let want = super::super::reference::logsumexp(l.iter().map(|&v| v as f64));
        assert!(
            (logp - want).abs() < 1e-6 * want.abs().max(1.0),
            "{logp} vs {want}"
        );
        for (e, (&v, &gam)) in l.iter().zip(&g).enumerate() {
            // f32 holds L - max to |L - max| * 2^-24, which exp turns into a relative error:
            // the absolute error of every posterior stays below 1e-7.
            let d = v as f64 - want;
            let w = d.exp();
            let tol = w * f32::EPSILON as f64 * (4.0 + d.abs());
            assert!((gam as f64 - w).abs() <= tol, "{e}: {gam} vs {w}");
        }
        assert!((b.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        let mut nan = l.clone();
        nan[3] = f32::NAN;
        assert!(posterior_image(&mut nan, &mut vec![0f64; k]).is_nan());
        let mut inf = l.clone();
        inf[3] = f32::INFINITY;
        assert!(!posterior_image(&mut inf, &mut vec![0f64; k]).is_finite());
    }

    /// The engine's statistics and features against the f64 reference on a shape with
    /// padding, 2 channels, chunks of 2 images and a short last chunk and batch.
    #[test]
    fn epoch_and_features_match_reference() {
        use crate::geometry::LayerConfig;
        let (n, c, h, w) = (11, 2, 9, 8);
        let layer = LayerConfig {
            kernels: 5,
            width: 4,
            pad: 1,
        };
        let g = Geometry::new(layer, c, h, w).unwrap();
        let data = crate::bench::random_images(3, n, c, h, w);
        let x = data.images.as_slice().unwrap().to_vec();
        let mut state = 11u64;
        let theta: Vec<f32> = (0..g.k * g.r())
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
            })
            .collect();
        let (stats, up) = super::super::reference::epoch(&g, &x, n, &theta, n);
        let data = Arc::new(data);
        let mut eng = CpuEngine::new(g, data.clone(), theta.clone(), 4);
        let st = eng.epoch(&mut |_| {}).unwrap();
        assert!((st.loglik - stats.ll).abs() <= 1e-6 * stats.ll.abs().max(1.0));
        let th = eng.theta().unwrap();
        let scale = up.theta.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = th
            .iter()
            .zip(&up.theta)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(err <= 1e-5 * scale, "theta error {err} of {scale}");

        let f = features(
            &g,
            data.as_ref(),
            &theta,
            &g.bias_f32(&theta),
            4,
            Pooling {
                grid: 1,
                encoding: Encoding::Lse,
            },
            &Default::default(),
            &mut |_| {},
        )
        .unwrap();
        let xpad = g.pad_images(&x, n);
        let l = super::super::reference::estep(&g, &xpad, n, &theta);
        let want = super::super::reference::features(&g, &l, n);
        // Pooled over a 2 x 2 grid: the f64 twin of the GPU kernel.
        let f2 = features(
            &g,
            data.as_ref(),
            &theta,
            &g.bias_f32(&theta),
            4,
            Pooling {
                grid: 2,
                encoding: Encoding::Lse,
            },
            &Default::default(),
            &mut |_| {},
        )
        .unwrap();
        let want2 = super::super::reference::features_grid(&g, &l, n, 2);
        let scale2 = want2.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err2 = f2
            .iter()
            .zip(&want2)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(
            err2 <= 1e-5 * scale2,
            "pooled features error {err2} of {scale2}"
        );
        for (a, b) in f.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
    }

    /// Chunk results do not depend on the thread count (fixed chunks, ordered sums).
    #[test]
    fn any_thread_count_gives_the_same_bits() {
        use crate::geometry::LayerConfig;
        let (n, c, h, w) = (40, 1, 12, 12);
        let layer = LayerConfig {
            kernels: 6,
            width: 5,
            pad: 2,
        };
        let g = Geometry::new(layer, c, h, w).unwrap();
        let data = Arc::new(crate::bench::random_images(5, n, c, h, w));
        let theta = crate::em::init_theta(&g, 4);
        let run = |threads: usize, wave: Option<usize>| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut eng = CpuEngine::new(g, data.clone(), theta.clone(), 17);
                eng.wave = wave.unwrap_or(eng.wave);
                let lls: Vec<u64> = (0..2)
                    .map(|_| eng.epoch(&mut |_| {}).unwrap().loglik.to_bits())
                    .collect();
                let f = features(
                    &g,
                    data.as_ref(),
                    &theta,
                    &g.bias_f32(&theta),
                    17,
                    Pooling {
                        grid: 1,
                        encoding: Encoding::Lse,
                    },
                    &Default::default(),
                    &mut |_| {},
                )
                .unwrap();
                (lls, eng.theta().unwrap(), f)
            })
        };
        let one = run(1, None);
        assert_eq!(one, run(3, None));
        assert_eq!(one, run(2, None));
        // Waves of 1 and 2 chunks (of the batch's 17): the same bits.
        assert_eq!(one, run(2, Some(1)));
        assert_eq!(one, run(1, Some(2)));
    }
}
