//! Timing of the engines (`calm-gpu bench`, `benches/`): wall clock of whole epochs, with the
//! queue drained before the clock is read, and SPEC's FLOP count beside it. The GPU engine's
//! epochs are timed after a warm-up epoch (which compiles its pipelines); the CPU engine has
//! nothing to warm up, and every one of its epochs is timed.

use std::sync::Arc;
use std::time::Instant;

use ndarray::Array4;
use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::cpu::CpuEngine;
use crate::data::Dataset;
use crate::engine::Engine;
use crate::error::Result;
use crate::geometry::Geometry;
use crate::gpu::{GpuContext, GpuEngine, GpuOptions};
use crate::peak::FmaPeak;

/// `n` unlabelled images of `c x h x w` pixels drawn uniformly from `[0, 1)` with `seed`; panics
/// where [`try_random_images`] gives an error.
pub fn random_images(seed: u64, n: usize, c: usize, h: usize, w: usize) -> Dataset {
    try_random_images(seed, n, c, h, w).expect("random images fit in memory")
}

/// [`random_images`] for a count a user gave (`bench --images`): an error, not an abort, when
/// the machine cannot hold them.
pub fn try_random_images(seed: u64, n: usize, c: usize, h: usize, w: usize) -> Result<Dataset> {
    let too_many = || {
        crate::error::CalmError::Invalid(format!(
            "{n} random images of {c}x{h}x{w} need {:.1} GB of memory, more than this machine can give",
            n as f64 * (c * h * w * 4) as f64 / 1e9
        ))
    };
    let len = n
        .checked_mul(c * h * w)
        .filter(|&l| l <= isize::MAX as usize / 4)
        .ok_or_else(too_many)?;
    let mut x: Vec<f32> = Vec::new();
    x.try_reserve_exact(len).map_err(|_| too_many())?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    x.extend((0..len).map(|_| rng.random::<f32>()));
    Ok(Dataset::new(
        Array4::from_shape_vec((n, c, h, w), x).expect("shape"),
        None,
    ))
}

/// One line of the benchmark table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The engine: `cpu`, or the GPU's backend (`vulkan`, `metal`, ...), ` streamed` added when the
    /// images stream through batch-sized buffers.
    pub engine: String,
    /// The adapter's name (GPU), or the GEMM crate and thread count (CPU).
    pub adapter: String,
    /// Images and layer, `N` x [`crate::gpu::tune::shape_key`], e.g. `8000x1x28x28 K64 w20 p2`.
    pub shape: String,
    /// Images per epoch.
    pub images: usize,
    /// Images per batch (for the GPU, the largest batch the engine runs).
    pub batch: usize,
    /// Median seconds of the E-step alone over all images (GPU only).
    pub estep_s: Option<f64>,
    /// Median seconds of the M-step alone (posteriors, statistics, partial sums; GPU only).
    pub mstep_s: Option<f64>,
    /// M-step GFLOP/s by SPEC's count (GPU only).
    pub mstep_gflops: Option<f64>,
    /// Median seconds of a whole epoch (E-step, log-sum-exp, M-step, update).
    pub epoch_s: f64,
    /// Seconds of each timed epoch, in order (their spread is the run's noise).
    pub epochs_s: Vec<f64>,
    /// E-step GFLOP/s by SPEC's count (GPU only).
    pub estep_gflops: Option<f64>,
    /// Whole-epoch GFLOP/s by SPEC's count (both steps).
    pub epoch_gflops: f64,
    /// Bytes of device buffers the engine allocated (GPU only).
    pub device_bytes: Option<u64>,
    /// The GEMM kernels' tile shapes (GPU only).
    pub tiles: Option<String>,
    /// The GEMM kernels and where the choice came from (built-in, tuned, CALM_TILES; GPU only).
    pub kernels: Option<String>,
    /// LL of the warm-up epoch, from the starting theta (GPU only).
    pub first_loglik: Option<f64>,
    /// Seconds of the warm-up epoch, pipeline compilation included (GPU only).
    pub warmup_s: Option<f64>,
    /// The machine's FP32 FMA peak on the engine's threads, measured before its epochs (CPU
    /// only): `epoch_gflops` is read against it.
    pub fma_peak: Option<FmaPeak>,
}

impl Row {
    /// The table's column titles, aligned with [`Row::line`].
    pub fn header() -> String {
        format!(
            "{:<15} {:<40} {:<28} {:>11} {:>9} {:>11} {:>9} {:>11} {:>9} {:>10}",
            "engine",
            "adapter",
            "shape",
            "E-step ms",
            "GFLOP/s",
            "M-step ms",
            "GFLOP/s",
            "epoch ms",
            "GFLOP/s",
            "device MB"
        )
    }
    /// For a CPU row: its epoch's GFLOP/s as a fraction of the machine's FMA peak, in a line.
    pub fn peak_line(&self) -> Option<String> {
        let p = self.fma_peak.as_ref()?;
        Some(format!(
            "{}: FP32 FMA peak {:.1} GFLOP/s ({}, {} threads); the epoch's {:.1} GFLOP/s is {:.0}% of it",
            self.engine,
            p.gflops,
            p.isa,
            p.threads,
            self.epoch_gflops,
            100.0 * p.fraction(self.epoch_gflops)
        ))
    }
    /// This row as a line of the table under [`Row::header`].
    pub fn line(&self) -> String {
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        format!(
            "{:<15} {:<40} {:<28} {:>11} {:>9} {:>11} {:>9} {:>11.1} {:>9.1} {:>10}",
            self.engine,
            self.adapter.chars().take(40).collect::<String>(),
            self.shape,
            opt(self.estep_s.map(|s| s * 1e3), 1),
            opt(self.estep_gflops, 1),
            opt(self.mstep_s.map(|s| s * 1e3), 1),
            opt(self.mstep_gflops, 1),
            self.epoch_s * 1e3,
            self.epoch_gflops,
            self.device_bytes
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
        )
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn shape(g: &Geometry, n: usize) -> String {
    format!("{n}x{}", crate::gpu::tune::shape_key(g))
}

/// Times a GPU engine built with `opts` (batch, streaming; tiles and kernels for
/// `calm-gpu tune`). With `warmup_limit_s`, gives up after the warm-up epoch if it took longer
/// ([`crate::CalmError::SlowWarmup`]: `calm-gpu tune` does not time a candidate far slower
/// than the built-in choice).
pub fn time_gpu(
    ctx: &Arc<GpuContext>,
    g: Geometry,
    data: &Arc<Dataset>,
    theta: &[f32],
    epochs: usize,
    opts: GpuOptions,
    warmup_limit_s: Option<f64>,
) -> Result<Row> {
    let n = data.images.shape()[0];
    let mut eng = GpuEngine::new(Arc::clone(ctx), g, data.clone(), theta, opts)?;
    // Warm-up: pipeline compilation, first-touch of memory. Its LL, from the starting theta,
    // is the same for every choice of kernels up to f32 rounding (`calm-gpu tune` compares).
    let t0 = Instant::now();
    let first = eng.epoch(&mut |_| {})?;
    let warmup_s = t0.elapsed().as_secs_f64();
    if let Some(limit_s) = warmup_limit_s.filter(|&limit| warmup_s > limit) {
        return Err(crate::error::CalmError::SlowWarmup { warmup_s, limit_s });
    }
    eng.time_estep()?;
    let mut es = Vec::new();
    let mut ms = Vec::new();
    let mut ep = Vec::new();
    for _ in 0..epochs.max(1) {
        es.push(eng.time_estep()?);
        ms.push(eng.time_mstep()?);
        let t0 = Instant::now();
        eng.epoch(&mut |_| {})?;
        ep.push(t0.elapsed().as_secs_f64());
    }
    let (e, m, p) = (median(&es), median(&ms), median(&ep));
    Ok(Row {
        engine: format!(
            "{:?}{}",
            ctx.info.backend,
            if eng.streamed() { " streamed" } else { "" }
        )
        .to_lowercase(),
        adapter: ctx.info.name.clone(),
        shape: shape(&g, n),
        images: n,
        batch: eng.max_batch(),
        estep_s: Some(e),
        epoch_s: p,
        epochs_s: ep,
        estep_gflops: Some(g.step_flops(n) / e / 1e9),
        mstep_s: Some(m),
        mstep_gflops: Some(g.step_flops(n) / m / 1e9),
        epoch_gflops: g.epoch_flops(n) / p / 1e9,
        device_bytes: Some(eng.device_bytes()),
        tiles: Some(eng.tiles().to_string()),
        kernels: Some(eng.describe_kernels()),
        first_loglik: Some(first.loglik),
        warmup_s: Some(warmup_s),
        fma_peak: None,
    })
}

/// Times the fast CPU engine over `epochs` epochs (at least one), reading `batch` images at a time;
/// no warm-up epoch, and no E-step or M-step times of their own. The machine's FMA peak on the
/// same threads is measured first (about a second), for [`Row::peak_line`].
pub fn time_cpu(
    g: Geometry,
    data: Arc<Dataset>,
    theta: &[f32],
    batch: usize,
    epochs: usize,
) -> Result<Row> {
    let n = data.images.shape()[0];
    let peak = crate::peak::fma_peak(std::time::Duration::from_secs(1));
    let mut eng = CpuEngine::new(g, data, theta.to_vec(), batch);
    let mut ep = Vec::new();
    for _ in 0..epochs.max(1) {
        let t0 = Instant::now();
        eng.epoch(&mut |_| {})?;
        ep.push(t0.elapsed().as_secs_f64());
    }
    let p = median(&ep);
    Ok(Row {
        engine: "cpu".into(),
        adapter: format!("gemm, {} threads", rayon::current_num_threads()),
        shape: shape(&g, n),
        images: n,
        batch,
        estep_s: None,
        epoch_s: p,
        epochs_s: ep,
        estep_gflops: None,
        mstep_s: None,
        mstep_gflops: None,
        epoch_gflops: g.epoch_flops(n) / p / 1e9,
        device_bytes: None,
        tiles: None,
        kernels: None,
        first_loglik: None,
        warmup_s: None,
        fma_peak: Some(peak),
    })
}
