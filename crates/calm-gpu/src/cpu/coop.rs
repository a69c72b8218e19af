//! Twin of `shaders/estep_coop.wgsl`, the E-step on the tensor cores: the same f16 splits of
//! every operand, the same three products and the same chunks of 16 reduction steps, so that
//! the tensor-core path's arithmetic is tested on every machine (tests/coop.rs), and `validate`
//! has something exact to hold a GPU's result against.
//!
//! The scheme (Ootomo & Yokota, 2022): an f32 `v` is `hi = f16(v)` and `lo = f16((v - hi) 2^11)`,
//! so `v = hi + lo 2^-11` to about `2^-22 |v|`. A product `a b` is `hi_a hi_b + (hi_a lo_b +
//! lo_a hi_b) 2^-11` (the `lo lo` term, `2^-22 |a b|`, is left out). Each product of two f16 is
//! exact in f32. The kernel sums `hi_a hi_b` in one accumulator (`main`) and the two correction
//! products in another (`corr`), 16 reduction steps per tensor-core operation; the twin sums each
//! chunk of 16 exactly (f64 holds every product and their sum without rounding here) and adds it
//! to its f32 accumulator with one rounding, a model of the tensor cores' wide internal sum. The
//! hardware's own order and rounding inside a chunk are its own (NVIDIA's truncate), so a GPU
//! agrees with the twin to within a few f32 roundings per chunk, not bit for bit: the
//! tolerance `validate` uses is [`tolerance`].
//!
//! The accuracy contract, tested in tests/coop.rs on problems of the MNIST and STL-10 protocols'
//! sizes against the f64 reference: `L` within [`L_CONTRACT`] of the scale of its terms, and the
//! epoch's `LL` within 1e-5 relative of the FP32 path's over 15 epochs.

use half::f16;
use rayon::prelude::*;

use crate::geometry::Geometry;

/// `lo`'s scale, `2^11`: `lo = f16((v - hi) 2^11)` keeps `lo`'s bits where `v` is small instead
/// of letting them fall into f16's subnormals.
pub const LO_SCALE: f32 = 2048.0;

/// The largest operand the splits take: f16's largest finite value. Pixels, whitened pixels and
/// weights are far below it; the engine refuses the tensor-core path for data above it.
pub const MAX_OPERAND: f32 = 65504.0;

/// The accuracy contract for `L`: `|L - L_exact| <= L_CONTRACT * S[m, k]`, with `S[m, k] =
/// sum_r |A[m, r] theta[k, r]| + |bias[k]|` the scale of the terms (an f32 GEMM of R terms is
/// within about `R 2^-24 S`, here `R = 400..675`, `2.4e-5..4e-5 S`; the splits add `2 2^-21 S`
/// and the chunked sums `R / 16` roundings of `2^-24`).
pub const L_CONTRACT: f64 = 4e-5;

/// f16's smallest normal value, `2^-14`: below it the kernel's `hi` is 0.
pub const F16_MIN_NORMAL: f32 = 1.0 / 16384.0;

/// `v` as the kernel splits it: `hi` is `v` truncated to f16's 11 significant bits (the low 13
/// mantissa bits of its f32 form cleared: exactly an f16 where `|v| >= 2^-14`, and 0 below),
/// `lo = f16((v - hi) 2^11)` rounded to nearest-even (`v - hi` is exact in f32). The kernel
/// splits with bits rather than `f16(v)` and back because NVIDIA's Vulkan compiler folded
/// `f32(f16(v))` into `v`, which left `lo` zero (docs/perf.md).
pub fn split(v: f32) -> (f16, f16) {
    let hi = if v.abs() < F16_MIN_NORMAL {
        0.0
    } else {
        f32::from_bits(v.to_bits() & 0xffff_e000)
    };
    (f16::from_f32(hi), f16::from_f32((v - hi) * LO_SCALE))
}

/// `hi + lo 2^-11`: what the three products see of `v`.
pub fn joined(v: f32) -> f64 {
    let (hi, lo) = split(v);
    hi.to_f64() + lo.to_f64() / LO_SCALE as f64
}

/// True when every value can go through the splits (finite and within [`MAX_OPERAND`]).
pub fn fits(values: &[f32]) -> bool {
    values.iter().all(|v| v.abs() <= MAX_OPERAND)
}

/// The tensor-core E-step's `L` for `n` padded images `xpad` under weights `theta` `(K, R)` and
/// the f32 bias `bias` (K), laid out `(n, k, h, w)` as [`super::reference::estep`].
pub fn estep(g: &Geometry, xpad: &[f32], n: usize, theta: &[f32], bias: &[f32]) -> Vec<f32> {
    let r = g.r();
    let th: Vec<(f16, f16)> = theta[..g.k * r].iter().map(|&v| split(v)).collect();
    per_output(g, xpad, n, |k, patch| {
        let a: Vec<(f16, f16)> = patch.map(split).collect();
        dot(&a, &th[k * r..(k + 1) * r]) + bias[k]
    })
}

/// `f(k, the patch's R values)` for every output `(n, k, u)` of `n` padded images, laid out as
/// `L`, in parallel over the rows `(n, k)`.
fn per_output<T: Send + Default + Clone>(
    g: &Geometry,
    xpad: &[f32],
    n: usize,
    f: impl Fn(usize, &mut dyn Iterator<Item = f32>) -> T + Sync,
) -> Vec<T> {
    let (k_, p_) = (g.k, g.positions());
    let offsets: Vec<usize> = g.patch_offsets().collect();
    let corners: Vec<usize> = g.position_offsets().collect();
    let mut out = vec![T::default(); n * k_ * p_];
    out.par_chunks_mut(p_).enumerate().for_each(|(nk, row)| {
        let (img, k) = (nk / k_, nk % k_);
        let base = img * g.padded_len();
        for (pos, o) in row.iter_mut().enumerate() {
            let at = base + corners[pos];
            *o = f(k, &mut offsets.iter().map(|&d| xpad[at + d]));
        }
    });
    out
}

/// One output of the kernel: `main + corr 2^-11` over R, in chunks of 16 steps, each chunk's
/// exact sum rounded once into its f32 accumulator; `corr` takes `hi_a lo_b`, then `lo_a hi_b`.
fn dot(a: &[(f16, f16)], b: &[(f16, f16)]) -> f32 {
    let (mut main, mut corr) = (0f32, 0f32);
    for (ca, cb) in a.chunks(16).zip(b.chunks(16)) {
        let (mut hh, mut hl, mut lh) = (0f64, 0f64, 0f64);
        for (&(ah, al), &(bh, bl)) in ca.iter().zip(cb) {
            hh += ah.to_f64() * bh.to_f64();
            hl += ah.to_f64() * bl.to_f64();
            lh += al.to_f64() * bh.to_f64();
        }
        main = (main as f64 + hh) as f32;
        corr = (corr as f64 + hl) as f32;
        corr = (corr as f64 + lh) as f32;
    }
    main + corr / LO_SCALE
}

/// The scale of `L[m, k]`'s terms, `sum_r |A[m, r] theta[k, r]| + |bias[k]|`, laid out as `L`:
/// what [`L_CONTRACT`] and [`tolerance`] are relative to.
pub fn term_scale(g: &Geometry, xpad: &[f32], n: usize, theta: &[f32], bias: &[f32]) -> Vec<f64> {
    let r = g.r();
    per_output(g, xpad, n, |k, patch| {
        patch
            .zip(&theta[k * r..(k + 1) * r])
            .map(|(x, &t)| (x as f64 * t as f64).abs())
            .sum::<f64>()
            + (bias[k] as f64).abs()
    })
}

/// How far a GPU's tensor-core `L` may lie from this twin's, relative to [`term_scale`]: the
/// hardware sums a chunk of 16 products in its own order and rounding (NVIDIA truncates), which
/// moves each chunk's sum by up to a few f32 roundings, `R / 16` chunks in all, in each of the
/// two accumulators, then the epilogue's two roundings.
pub fn tolerance(r: usize) -> f64 {
    let eps = f32::EPSILON as f64; // 2^-23
    4.0 * eps * (2.0 * r.div_ceil(16) as f64 + 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_exact_where_f16_holds_the_value_and_close_everywhere() {
        for v in [0.0f32, 1.0, -2.5, 0.5, 1024.0] {
            assert_eq!(split(v), (f16::from_f32(v), f16::ZERO));
        }
        // hi is truncated, not rounded: 1 + 2^-11 + 2^-12 (which rounds up to 1 + 2^-10) has
        // hi = 1 and lo = (2^-11 + 2^-12) 2^11 = 1.5.
        let v = 1.0 + 2f32.powi(-11) + 2f32.powi(-12);
        assert_eq!(split(v), (f16::ONE, f16::from_f32(1.5)));
        // Below f16's normal range hi is 0 and lo carries v.
        assert_eq!(split(1e-5), (f16::ZERO, f16::from_f32(1e-5 * 2048.0)));
        // 1/255 (a pixel) and a spread of magnitudes: hi + lo 2^-11 within 2^-21 relative, or,
        // below f16's normal range (6.1e-5) where hi is 0, 2^-25 absolute.
        let mut v = 1.0f32 / 255.0;
        for _ in 0..200 {
            for s in [v, -v, v * 1000.0, v / 300.0] {
                let err = (joined(s) - s as f64).abs();
                let rel = err / (s as f64).abs();
                assert!(
                    rel <= 2f64.powi(-21) || err <= 2f64.powi(-25),
                    "{s}: {rel:e}"
                );
                if s.abs() >= 6.2e-5 {
                    assert!(rel <= 2f64.powi(-21), "{s}: {rel:e}");
                }
            }
            v *= 1.0173;
        }
        assert!(fits(&[65504.0, -1.0]) && !fits(&[70000.0]) && !fits(&[f32::NAN]));
    }
}
