//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use calm_gpu::gpu::{GpuBackend, GpuContext};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// The GPU to test on: Vulkan unless `CALM_TEST_BACKEND` says otherwise. Where no adapter exists
/// the test is skipped with a message, unless `CALM_REQUIRE_GPU=1` (set by `.ci/run`), which
/// makes a missing adapter a failure.
pub fn gpu() -> Option<Arc<GpuContext>> {
    let backend = match std::env::var("CALM_TEST_BACKEND").as_deref() {
        Ok("gl") => GpuBackend::Gl,
        Ok("metal") => GpuBackend::Metal,
        Ok("dx12") => GpuBackend::Dx12,
        _ => GpuBackend::Vulkan,
    };
    match GpuContext::new(backend, false) {
        Ok(ctx) => Some(Arc::new(ctx)),
        Err(e) => {
            if std::env::var("CALM_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("CALM_REQUIRE_GPU=1 but no adapter: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// Images uniform in [0, 1) (the benchmarks' generator).
pub use calm_gpu::bench::random_images;

/// Weights drawn i.i.d. from N(0, scale^2).
pub fn random_theta(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * scale)
        .collect()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    // f64::max drops a NaN, so a value that is not finite counts as an infinite error.
    if a.iter()
        .zip(b)
        .any(|(x, y)| !x.is_finite() && y.is_finite())
    {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}
