//! This machine's FP32 fused-multiply-add peak on all cores (`bench --with-cpu`): the ceiling
//! the CPU engine's GFLOP/s is read against.
//!
//! Every thread of the rayon pool the engine runs on repeats independent vector FMAs on values
//! held in registers (twelve accumulators, more than an FMA's latency times the FMA ports of
//! any core this runs on, so the ports never wait), and the peak is the best of a few timed
//! rounds. Each instruction set the CPU offers is measured (AVX-512, AVX2 + FMA, NEON) and the
//! fastest kept: on some cores (AMD Zen 4) AVX-512 runs at AVX2's rate.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The measured FMA peak.
#[derive(Clone, Debug, Serialize)]
pub struct FmaPeak {
    /// FP32 GFLOP/s on all threads, an FMA counted as 2 FLOP.
    pub gflops: f64,
    /// The instructions that reached it, e.g. `avx2+fma`.
    pub isa: &'static str,
    /// Threads it ran on (the rayon pool's).
    pub threads: usize,
}

impl FmaPeak {
    /// `gflops` as a fraction of this peak.
    pub fn fraction(&self, gflops: f64) -> f64 {
        gflops / self.gflops
    }
}

/// Accumulators per thread: independent FMA chains.
const CHAINS: usize = 12;

/// One kernel: runs `iters` rounds of `CHAINS` vector FMAs and returns the FLOP it did.
type Kernel = fn(u64) -> f64;

/// Measures the FMA peak on every thread of the current rayon pool, over about `budget` of
/// wall time in all (at least a few milliseconds a round).
pub fn fma_peak(budget: Duration) -> FmaPeak {
    let threads = rayon::current_num_threads();
    let kernels = kernels();
    let per_kernel = budget / kernels.len() as u32;
    let mut best = FmaPeak {
        gflops: 0.0,
        isa: kernels[0].0,
        threads,
    };
    for (isa, kernel) in kernels {
        let g = measure(kernel, per_kernel);
        if g > best.gflops {
            best.gflops = g;
            best.isa = isa;
        }
    }
    best
}

/// The best GFLOP/s of `kernel` on all threads over rounds that fill `budget`.
fn measure(kernel: Kernel, budget: Duration) -> f64 {
    // Calibrate one round to about a twentieth of the budget on one thread.
    let mut iters: u64 = 1 << 12;
    let target = (budget / 20).max(Duration::from_millis(2));
    loop {
        let t0 = Instant::now();
        kernel(iters);
        if t0.elapsed() >= target / 4 || iters >= 1 << 40 {
            let per = t0.elapsed().as_secs_f64() / iters as f64;
            iters = ((target.as_secs_f64() / per.max(1e-12)) as u64).max(1);
            break;
        }
        iters *= 4;
    }
    let start = Instant::now();
    let mut best = 0.0_f64;
    let mut rounds = 0;
    while rounds < 3 || (start.elapsed() < budget && rounds < 50) {
        let t0 = Instant::now();
        let flops: f64 = rayon::broadcast(|_| kernel(iters)).iter().sum();
        best = best.max(flops / t0.elapsed().as_secs_f64() / 1e9);
        rounds += 1;
    }
    best
}

/// The kernels this CPU can run, each with its name.
fn kernels() -> Vec<(&'static str, Kernel)> {
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push(("avx512f", x86::avx512));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(("avx2+fma", x86::avx2));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        v.push(("neon", arm::neon));
    }
    if v.is_empty() {
        v.push(("f32 mul_add, no vector FMA found", scalar));
    }
    v
}

/// The multiplier and addend: `acc * A + B` stays near `B / (1 - A)`, far from overflow and
/// from subnormals.
const A: f32 = 0.999_9;
const B: f32 = 1e-4;

/// Plain `f32::mul_add` chains, for CPUs without a vector FMA the kernels above know.
fn scalar(iters: u64) -> f64 {
    let mut acc = [0.5_f32; CHAINS];
    let (a, b) = (black_box(A), black_box(B));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = x.mul_add(a, b);
        }
    }
    black_box(acc);
    2.0 * CHAINS as f64 * iters as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{A, B, CHAINS};
    use std::arch::x86_64::*;
    use std::hint::black_box;

    pub(super) fn avx2(iters: u64) -> f64 {
        // SAFETY: chosen by `kernels` only where the CPU reports AVX2 and FMA.
        unsafe { avx2_impl(iters) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_impl(iters: u64) -> f64 {
        let a = _mm256_set1_ps(black_box(A));
        let b = _mm256_set1_ps(black_box(B));
        let mut acc = [_mm256_set1_ps(0.5); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        black_box(acc);
        2.0 * 8.0 * CHAINS as f64 * iters as f64
    }

    pub(super) fn avx512(iters: u64) -> f64 {
        // SAFETY: chosen by `kernels` only where the CPU reports AVX-512F.
        unsafe { avx512_impl(iters) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_impl(iters: u64) -> f64 {
        let a = _mm512_set1_ps(black_box(A));
        let b = _mm512_set1_ps(black_box(B));
        let mut acc = [_mm512_set1_ps(0.5); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        black_box(acc);
        2.0 * 16.0 * CHAINS as f64 * iters as f64
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{A, B, CHAINS};
    use std::arch::aarch64::*;
    use std::hint::black_box;

    #[allow(unused_unsafe)]
    pub(super) fn neon(iters: u64) -> f64 {
        // SAFETY: NEON is part of every aarch64 target Rust supports.
        unsafe {
            let a = vdupq_n_f32(black_box(A));
            let b = vdupq_n_f32(black_box(B));
            let mut acc = [vdupq_n_f32(0.5); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = vfmaq_f32(b, *x, a);
                }
            }
            black_box(acc);
        }
        2.0 * 4.0 * CHAINS as f64 * iters as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counts_its_flops_and_keeps_finite_values() {
        for (isa, k) in kernels() {
            assert!(k(0) == 0.0, "{isa}");
            let f = k(1000);
            assert!(
                f > 0.0 && f % (2.0 * CHAINS as f64 * 1000.0) == 0.0,
                "{isa}: {f}"
            );
        }
        // The chain's fixed point is B / (1 - A) = 1: no overflow and no subnormals however
        // long a round runs.
        let mut x = 0.5_f32;
        for _ in 0..1_000_000 {
            x = x.mul_add(A, B);
        }
        assert!((x - 1.0).abs() < 1e-2, "{x}");
    }

    #[test]
    fn the_peak_is_positive_and_names_its_instructions() {
        let p = fma_peak(Duration::from_millis(60));
        assert!(p.gflops.is_finite() && p.gflops > 0.0, "{p:?}");
        assert!(p.threads >= 1);
        assert!(!p.isa.is_empty());
    }
}
