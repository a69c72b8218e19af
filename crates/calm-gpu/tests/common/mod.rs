//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use calm_gpu::gpu::{GpuBackend, GpuContext};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// The GPU back end to test on, as the CLI's `--backend` names it: `CALM_TEST_BACKEND` (vulkan,
/// gl, metal or dx12; the hosted Windows and macOS jobs set dx12 and metal), else vulkan.
pub fn backend_name() -> &'static str {
    match std::env::var("CALM_TEST_BACKEND").as_deref() {
        Ok("gl") => "gl",
        Ok("metal") => "metal",
        Ok("dx12") => "dx12",
        _ => "vulkan",
    }
}

/// The GPU to test on: Vulkan unless `CALM_TEST_BACKEND` says otherwise. Where no adapter exists
/// the test is skipped with a message, unless `CALM_REQUIRE_GPU=1` (set by `.ci/run`), which
/// makes a missing adapter a failure.
pub fn gpu() -> Option<Arc<GpuContext>> {
    gpu_with(&calm_gpu::GpuConfig::default())
}

/// [`gpu`] opened with `config`.
pub fn gpu_with(config: &calm_gpu::GpuConfig) -> Option<Arc<GpuContext>> {
    let backend = match backend_name() {
        "gl" => GpuBackend::Gl,
        "metal" => GpuBackend::Metal,
        "dx12" => GpuBackend::Dx12,
        _ => GpuBackend::Vulkan,
    };
    match GpuContext::open(backend, false, config) {
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
#[allow(unused_imports)] // not every test file uses it
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

/// Property-test settings: `cases` cases from a fixed seed, so that CI runs the same cases every
/// time; `PROPTEST_CASES` and `PROPTEST_RNG_SEED` (a number) override either for a longer or
/// another search by hand.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(20_261_129);
    }
    config
}

/// `bytes` gzipped.
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap()
}

/// A numpy-style `.npy` (version 1.0) with the given header fields.
pub fn npy_bytes(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let f = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}
