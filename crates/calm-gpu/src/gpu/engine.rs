//! The GPU engine: uploads the dataset once, keeps data, `theta` and the statistics resident on
//! the device for the whole run, and reads back four scalars per epoch.
//!
//! Per batch (one command buffer): `estep` -> `logsumexp` -> `mstep` -> `reduce_stats` (with
//! contrast-normalised patches, the three `norm_*` passes around them).
//! Per epoch: `update` -> `summary`, read `[LL hi, LL lo, S, finite]`; if finite, copy
//! `theta_next` over `theta`.
//!
//! The engine only sequences: the memory plan ([`super::plan`]) sizes everything, the buffers
//! ([`super::buffers`]) hold it, and one struct per kernel ([`super::steps`]) owns its pipeline
//! and bind groups and records itself into a pass.
//!
//! A dataset larger than one storage binding is split over several resident buffers of whole
//! images; batches never straddle two of them, so a batch may be shorter than `--batch` at a
//! buffer's end, which changes nothing but rounding.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::Array2;

use super::buffers::{Resident, kernel_sums, pixel_bound, read_padded, transpose_padded};
use super::context::GpuContext;
use super::kernels::{Tiles, Variant};
use super::pipelines::Pipelines;
use super::plan::{BatchRange, MemoryPlan, PlanInput};
use super::steps::{
    EStep, Features, LogSumExp, MStep, NormSteps, Posterior, ReduceStats, Setup, Summary, Update,
};
use super::tune::{self, Choice, Lookup};
use crate::cancel::CancelToken;
use crate::data::ImageSource;
use crate::engine::{Engine, EpochStats, Stats};
use crate::error::{CalmError, Result};
use crate::features::Encoding;
use crate::geometry::Geometry;
use crate::prior::Prior;

/// Knobs for tests and tuning; the defaults are right for users.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Largest batch (images per E-step), bounding memory; also limited by the device.
    pub batch: usize,
    /// Pretend storage bindings and buffers can hold at most this many bytes (to test the
    /// split of large datasets on a small problem).
    pub binding_cap: Option<u64>,
    /// Tile shapes; `None`: the tuning file's choice for this adapter and shape (`calm-gpu
    /// tune`, [`super::tune`]), else the built-in rule for the adapter.
    pub tiles: Option<Tiles>,
    /// Kernel implementation; `None`: the tuning file's, else the adapter's default. The tuning
    /// file is read only when neither field is set.
    pub variant: Option<Variant>,
    /// Features: pooling regions per axis (0 or 1: image-wide, SPEC's features).
    pub grid: usize,
    /// Features: the encoding of `L` before pooling (SPEC's log-sum-exp by default).
    pub encoding: Encoding,
    /// Device memory to plan within, in bytes; `None`: `GpuContext::budget`, or, where the
    /// adapter reports nothing, whatever allocates.
    pub memory_budget: Option<u64>,
    /// Stream the data through batch-sized buffers even where it would fit on the device.
    pub stream: bool,
    /// Stops an epoch or the features after the batch in progress once cancelled.
    pub cancel: CancelToken,
    /// The tuning file to look the kernels up in when neither `tiles` nor `variant` is set.
    pub tune_file: Option<std::path::PathBuf>,
    /// Who set `tiles` or `variant`, as the engine's description names it (default: "chosen
    /// by the caller").
    pub chosen_by: Option<String>,
}

impl GpuOptions {
    /// The options of a run configured by `gpu` in batches of `batch` images.
    pub fn from_config(gpu: &super::GpuConfig, batch: usize) -> Self {
        Self {
            batch,
            tiles: gpu.tiles,
            variant: gpu.kernels,
            tune_file: gpu.tune_file.clone(),
            chosen_by: gpu.chosen_by.clone(),
            ..Default::default()
        }
    }
}

pub use super::plan::STREAM_SLOTS;

/// Batches queued on the GPU before the host waits for the oldest: enough to hide the
/// submission gap (a 1,000-image MNIST batch takes about 1 ms on an H100), few enough that the
/// progress bar tells the truth.
const IN_FLIGHT: usize = 6;

/// The kernels of one engine, each with its bind groups for every batch.
struct Steps {
    estep: EStep,
    logsumexp: LogSumExp,
    posterior: Option<Posterior>,
    mstep: MStep,
    reduce: ReduceStats,
    update: Update,
    summary: Summary,
    features: Features,
    norm: Option<NormSteps>,
}

/// The GPU engine: the data, `theta` and the statistics resident on one device, each EM step a
/// WGSL kernel (see the module's text).
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    g: Geometry,
    tiles: Tiles,
    variant: Variant,
    plan: MemoryPlan,
    buf: Resident,
    steps: Steps,
    device_bytes: u64,
    /// Set when the data streams: batches are read from it (and padded) every pass.
    source: Option<Arc<dyn ImageSource>>,
    /// Mixing weights and variance: `theta_t` and `bias` hold the effective weights of
    /// [`Prior::effective`], `theta` the model's.
    prior: Prior,
    /// What the tuning file said for this adapter and shape (`calm-gpu tune`).
    tuned: Lookup,
    /// Who chose the kernels when neither the tuning file nor the built-in rule did.
    chosen_by: Option<String>,
    cancel: CancelToken,
}

/// What the engine holds after an epoch, read back for validation.
pub struct GpuState {
    /// `L` of the last batch run, `(n_images, K, P)`.
    pub l_last: Vec<f32>,
    /// `logp` of every image of the epoch, `(N)`.
    pub logp_all: Vec<f32>,
    /// Statistics `(K, R + 1)`, column `R` holding `B`.
    pub t: Vec<f32>,
    /// The update's weights, `(K, R)`.
    pub theta_next: Vec<f32>,
    /// The update's bias, `(K)`.
    pub bias_next: Vec<f32>,
    /// The update's `B'`, `(K)`.
    pub counts_next: Vec<f32>,
}

impl GpuEngine {
    /// Uploads `theta`, builds every pipeline and bind group, and places the data: the whole
    /// padded dataset stays on the device when it fits the memory budget, else it streams
    /// through [`STREAM_SLOTS`] batch-sized buffers, read from `source` again every epoch.
    pub fn new(
        ctx: Arc<GpuContext>,
        g: Geometry,
        source: Arc<dyn ImageSource>,
        theta: &[f32],
        opts: GpuOptions,
    ) -> Result<Self> {
        let budget_known = opts.memory_budget.is_some() || ctx.budget.is_some();
        match Self::build(ctx.clone(), g, source.clone(), theta, &opts, opts.stream) {
            // The API does not report its memory: try to keep the data resident, and stream
            // it if the device says it is out of memory.
            Err(CalmError::GpuMemory(_)) if !budget_known && !opts.stream => {
                Self::build(ctx, g, source, theta, &opts, true)
            }
            r => r,
        }
    }

    /// Chooses the kernels, plans the memory, allocates, and builds each kernel's bind groups.
    fn build(
        ctx: Arc<GpuContext>,
        g: Geometry,
        source: Arc<dyn ImageSource>,
        theta: &[f32],
        opts: &GpuOptions,
        stream: bool,
    ) -> Result<Self> {
        let n = source.len();
        if n == 0 {
            return Err(CalmError::Invalid("the dataset holds no images".into()));
        }
        assert_eq!(theta.len(), g.k * g.r());
        g.check_pool_grid(opts.grid.max(1))?;
        let chosen = tune::choose(
            &ctx,
            &g,
            opts.tiles,
            opts.variant,
            opts.tune_file.as_deref(),
            opts.chosen_by.clone(),
        )?;
        let (tiles, variant) = (chosen.tiles, chosen.variant);
        if variant == Variant::Coop && !crate::cpu::coop::fits(theta) {
            return Err(CalmError::Invalid(format!(
                "the starting weights hold values beyond the {} the tensor-core kernels take (f16's range); choose the FP32 kernels (CALM_KERNELS=staged)",
                crate::cpu::coop::MAX_OPERAND
            )));
        }
        let pipes = Pipelines::new(&ctx, &tiles, variant, g.patch_norm.is_some())?;
        let budget = match opts.memory_budget {
            Some(b) => Some((b, "the budget GpuOptions set")),
            None => ctx.budget.map(|b| (b, ctx.budget_source)),
        };
        let plan = MemoryPlan::new(
            &g,
            n,
            &PlanInput {
                limits: &ctx.limits,
                adapter: &ctx.info.name,
                budget,
                binding_cap: opts.binding_cap,
                batch: opts.batch,
                stream,
                grid: opts.grid,
                triangle: opts.encoding == Encoding::Triangle,
                variant,
                tiles,
            },
        )?;
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = Resident::allocate(&ctx, &g, &plan, theta, source.as_ref(), variant)?;
        let s = Setup {
            ctx: &ctx,
            g: &g,
            plan: &plan,
            buf: &buf,
            pipes: &pipes,
            tiles: &tiles,
        };
        let steps = Steps {
            estep: EStep::new(&s),
            logsumexp: LogSumExp::new(&s),
            posterior: Posterior::new(&s),
            mstep: MStep::new(&s),
            reduce: ReduceStats::new(&s),
            update: Update::new(&s),
            summary: Summary::new(&s),
            features: Features::new(&s, opts.encoding),
            norm: NormSteps::new(&s),
        };
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(CalmError::GpuMemory(format!(
                "{} ran out of memory holding the {} and statistics ({e}); try a smaller batch, or a memory budget (GpuConfig::memory_budget) below what it has",
                ctx.info.name,
                if plan.stream { "data slots" } else { "dataset" }
            )));
        }
        ctx.wait()?;
        Ok(Self {
            prior: Prior::uniform(g.k),
            device_bytes: buf.bytes(),
            source: plan.stream.then_some(source),
            ctx,
            g,
            tiles,
            variant,
            plan,
            buf,
            steps,
            tuned: chosen.tuned,
            chosen_by: chosen.chosen_by,
            cancel: opts.cancel.clone(),
        })
    }

    /// Bytes of every buffer the engine allocated on the device.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// The tile shapes of the GEMM kernels this engine runs.
    pub fn tiles(&self) -> Tiles {
        self.tiles
    }

    /// The implementation of the GEMM kernels this engine runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// What the tuning file said for this adapter and shape: [`Lookup::Found`] when the engine
    /// runs the tuned choice.
    pub fn tuned(&self) -> &Lookup {
        &self.tuned
    }

    /// One line on the GEMM kernels this engine runs and where the choice came from.
    pub fn describe_kernels(&self) -> String {
        let c = Choice::new(self.variant(), self.tiles);
        let line = match &self.tuned {
            Lookup::Found(_, p) => format!("{c} (tuned, {})", p.display()),
            Lookup::Stale(p) => format!(
                "{c} (built-in; {} was tuned by another build of calm-gpu: run `calm-gpu tune` again)",
                p.display()
            ),
            Lookup::Unreadable(p, why) => {
                format!("{c} (built-in; tuning file {} ignored: {why})", p.display())
            }
            Lookup::None => format!("{c} ({})", self.chosen_by.as_deref().unwrap_or("built-in")),
        };
        // The path comes from CALM_TUNE_FILE and the line is printed: no raw control characters.
        crate::text::printable(&line, 2000)
    }

    /// The largest batch the engine runs (the user's, or less where the device requires).
    pub fn max_batch(&self) -> usize {
        self.plan.max_batch
    }

    /// The adapter and device the engine runs on.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// True when the data streams through batch-sized buffers instead of staying resident.
    pub fn streamed(&self) -> bool {
        self.source.is_some()
    }

    /// Calls `body` on every batch in order (its index and range), the batch's images on the
    /// device by then: when the data streams, a reader thread reads and pads the next batches
    /// while the GPU works, and each is written to its slot just before its `body` (wgpu orders
    /// that write after the work already submitted that reads the slot).
    fn for_each_batch(&self, mut body: impl FnMut(usize, &BatchRange) -> Result<()>) -> Result<()> {
        let batches = &self.plan.batches;
        let Some(source) = &self.source else {
            return batches.iter().enumerate().try_for_each(|(i, b)| body(i, b));
        };
        let ranges: Vec<(usize, usize)> = batches.iter().map(|b| (b.first, b.n_images)).collect();
        let g = self.g;
        std::thread::scope(|scope| {
            // Two batches read ahead bound the host memory.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(2);
            let source = source.clone();
            let bound = pixel_bound(self.variant);
            scope.spawn(move || {
                let mut host = Vec::new();
                for (first, count) in ranges {
                    let r = read_padded(&g, source.as_ref(), first, count, &mut host, bound);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            for (i, b) in batches.iter().enumerate() {
                let data = rx
                    .recv()
                    .map_err(|_| CalmError::Gpu("the data reader stopped early".into()))??;
                self.ctx
                    .queue
                    .write_buffer(&self.buf.x[b.x], 0, bytemuck::cast_slice(&data));
                body(i, b)?;
            }
            Ok(())
        })
    }

    /// The E-step of batch `b`: `L`, made the normalised patches' where the layer has them.
    fn record_estep(&self, pass: &mut wgpu::ComputePass, b: usize) {
        self.steps.estep.record(pass, b);
        if let Some(norm) = &self.steps.norm {
            norm.record_estep(pass, b);
        }
    }

    /// The M-step of batch `b`: posteriors (unless fused), statistics, partial sums added.
    fn record_mstep(&self, pass: &mut wgpu::ComputePass, b: usize) {
        if let Some(norm) = &self.steps.norm {
            norm.record_shift(pass, b);
        }
        if let Some(posterior) = &self.steps.posterior {
            posterior.record(pass, b);
        }
        self.steps.mstep.record(pass, b);
        if let Some(norm) = &self.steps.norm {
            norm.record_correct(pass, b);
        }
        self.steps.reduce.record(pass, b);
    }

    /// Submits the statistics of every batch; calls `progress` as batches finish. At most
    /// `IN_FLIGHT` batches are queued, which keeps the GPU busy and the progress honest.
    fn accumulate(&self, progress: &mut dyn FnMut(usize)) -> Result<()> {
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&self.buf.t_acc, 0, None);
        enc.clear_buffer(&self.buf.t_comp, 0, None);
        let mut enc = Some(enc);
        let done = Arc::new(AtomicUsize::new(0));
        let mut in_flight = std::collections::VecDeque::new();
        self.for_each_batch(|i, b| {
            let mut e = enc
                .take()
                .unwrap_or_else(|| self.ctx.device.create_command_encoder(&Default::default()));
            {
                let mut pass = e.begin_compute_pass(&Default::default());
                self.record_estep(&mut pass, i);
                self.steps.logsumexp.record(&mut pass, i);
                self.record_mstep(&mut pass, i);
            }
            let idx = self.ctx.queue.submit([e.finish()]);
            let (d, nb) = (done.clone(), b.n_images);
            self.ctx.queue.on_submitted_work_done(move || {
                d.fetch_add(nb, Ordering::SeqCst);
            });
            in_flight.push_back(idx);
            if self.cancel.is_cancelled() {
                // Abandon the epoch: theta is untouched until `commit_update`.
                self.ctx.wait()?;
                return Err(CalmError::Interrupted);
            }
            if in_flight.len() > IN_FLIGHT {
                let old = in_flight.pop_front().expect("non-empty");
                self.ctx
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(old),
                        timeout: None,
                    })
                    .map_err(|e| CalmError::Gpu(format!("waiting for the GPU failed: {e}")))?;
                progress(done.load(Ordering::SeqCst));
            }
            Ok(())
        })?;
        if let Some(e) = enc {
            self.ctx.queue.submit([e.finish()]);
        }
        self.ctx.wait()?;
        progress(done.load(Ordering::SeqCst));
        Ok(())
    }

    /// Runs `update` and `summary` and reads back `[LL hi, LL lo, S, finite]`.
    fn finish_epoch(&mut self) -> Result<[f32; 4]> {
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.steps.update.record(&mut pass);
            self.steps.summary.record(&mut pass);
        }
        self.ctx.queue.submit([enc.finish()]);
        let s: Vec<f32> = self.ctx.read_buffer(&self.buf.summary, 0, 16)?;
        Ok([s[0], s[1], s[2], s[3]])
    }

    /// After `finish_epoch`: the update becomes the weights when the epoch was `finite`.
    fn commit_if(&mut self, finite: bool) -> Result<()> {
        if finite {
            self.commit_update();
            if !self.prior.is_uniform() || self.g.patch_norm.is_some() {
                // The update wrote SPEC's theta_t and bias; the E-step wants the prior's (and
                // the normalisation the kernels' sums, written with them).
                let theta = self.theta()?;
                self.write_effective(&theta);
            }
        }
        Ok(())
    }

    fn commit_update(&mut self) {
        let (k, r) = (self.g.k as u64, self.g.r() as u64);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.buf.theta_next, 0, &self.buf.theta, 0, k * r * 4);
        enc.copy_buffer_to_buffer(
            &self.buf.theta_t_next,
            0,
            &self.buf.theta_t,
            0,
            self.buf.theta_t_next.size(),
        );
        enc.copy_buffer_to_buffer(&self.buf.bias_next, 0, &self.buf.bias, 0, k * 4);
        enc.copy_buffer_to_buffer(&self.buf.counts_next, 0, &self.buf.counts, 0, k * 4);
        self.ctx.queue.submit([enc.finish()]);
    }

    /// Writes the E-step's `theta_t` and `bias` for the model weights `theta` under the prior.
    fn write_effective(&self, theta: &[f32]) {
        let (t, b) = self.prior.effective(&self.g, theta);
        let q = &self.ctx.queue;
        q.write_buffer(
            &self.buf.theta_t,
            0,
            bytemuck::cast_slice(&transpose_padded(&self.g, &t)),
        );
        q.write_buffer(&self.buf.bias, 0, bytemuck::cast_slice(&b));
        q.write_buffer(
            &self.buf.ksum,
            0,
            bytemuck::cast_slice(&kernel_sums(&self.g, &t)),
        );
        q.submit([]);
    }

    /// Reads back every intermediate the kernels left (for `validate` and tests).
    pub fn read_state(&self) -> Result<GpuState> {
        let (k, r, p) = (
            self.g.k as u64,
            self.g.r() as u64,
            self.g.positions() as u64,
        );
        let last = self.plan.batches.last().map_or(0, |b| b.n_images) as u64;
        let acc: Vec<f32> = self.ctx.read_buffer(&self.buf.t_acc, 0, k * (r + 1) * 4)?;
        let comp: Vec<f32> = self.ctx.read_buffer(&self.buf.t_comp, 0, k * (r + 1) * 4)?;
        Ok(GpuState {
            l_last: self.ctx.read_buffer(&self.buf.l, 0, last * k * p * 4)?,
            logp_all: self
                .ctx
                .read_buffer(&self.buf.logp_all, 0, self.plan.n as u64 * 4)?,
            t: acc.iter().zip(&comp).map(|(a, c)| a - c).collect(),
            theta_next: self.ctx.read_buffer(&self.buf.theta_next, 0, k * r * 4)?,
            bias_next: self.ctx.read_buffer(&self.buf.bias_next, 0, k * 4)?,
            counts_next: self.ctx.read_buffer(&self.buf.counts_next, 0, k * 4)?,
        })
    }

    /// Times the M-step alone (posteriors, statistics, partial sums) over every batch, in one
    /// submission, for benchmarks; needs `L` and `logp` of a previous epoch, so its numbers are
    /// timings only. Returns seconds.
    pub fn time_mstep(&mut self) -> Result<f64> {
        let t0 = std::time::Instant::now();
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for b in 0..self.plan.batches.len() {
                self.record_mstep(&mut pass, b);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        self.ctx.wait()?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Times the E-step alone over every batch (for benchmarks); returns seconds.
    pub fn time_estep(&mut self) -> Result<f64> {
        let t0 = std::time::Instant::now();
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for b in 0..self.plan.batches.len() {
                self.steps.estep.record(&mut pass, b);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        self.ctx.wait()?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Features of the engine's dataset under the current `theta`: `(N, K * grid * grid)`, the
    /// log-sum-exp of `L` over each pooling region (`GpuOptions::grid`; 1 is SPEC's `f[n,k]`).
    pub fn features(&mut self, progress: &mut dyn FnMut(usize)) -> Result<Array2<f32>> {
        let grid = self.plan.grid;
        let per = self.g.k * grid * grid;
        let mut out = Array2::<f32>::zeros((self.plan.n, per));
        let dst = out.as_slice_mut().expect("standard layout");
        self.for_each_batch(|i, b| {
            self.cancel.check()?;
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.record_estep(&mut pass, i);
                self.steps.features.record(&mut pass, i);
            }
            self.ctx.queue.submit([enc.finish()]);
            let f: Vec<f32> =
                self.ctx
                    .read_buffer(&self.buf.f, 0, (b.n_images * per * 4) as u64)?;
            dst[b.first * per..(b.first + b.n_images) * per].copy_from_slice(&f);
            progress(b.first + b.n_images);
            Ok(())
        })?;
        Ok(out)
    }
}

impl Engine for GpuEngine {
    fn describe(&self) -> String {
        let base = if self.streamed() {
            format!(
                "GPU: {}; data streamed in batches of {}",
                self.ctx.describe(),
                self.plan.max_batch
            )
        } else {
            format!("GPU: {}", self.ctx.describe())
        };
        // The kernels are named where the tuning file had a say, so that a run's log shows it.
        match self.tuned {
            Lookup::None => base,
            _ => format!("{base}; kernels {}", self.describe_kernels()),
        }
    }

    fn geometry(&self) -> Geometry {
        self.g
    }

    fn len(&self) -> usize {
        self.plan.n
    }

    fn epoch(&mut self, progress: &mut dyn FnMut(usize)) -> Result<EpochStats> {
        self.accumulate(progress)?;
        let [hi, lo, s, finite] = self.finish_epoch()?;
        self.commit_if(finite == 1.0)?;
        Ok(EpochStats {
            loglik: hi as f64 + lo as f64,
            count_sum: s as f64,
            finite: finite == 1.0,
        })
    }

    /// Only the whole data: the batches are summed on the device (compensated f32), then read
    /// back; `LL` is the f64 sum of the images' `logp`.
    fn stats(
        &mut self,
        start: usize,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Stats> {
        if (start, count) != (0, self.plan.n) {
            return Err(CalmError::Invalid(format!(
                "the GPU engine gives the statistics of all its {} images, not of images {start}..{}",
                self.plan.n,
                start + count
            )));
        }
        self.accumulate(progress)?;
        let (k, r) = (self.g.k, self.g.r());
        let bytes = (k * (r + 1) * 4) as u64;
        let acc: Vec<f32> = self.ctx.read_buffer(&self.buf.t_acc, 0, bytes)?;
        let comp: Vec<f32> = self.ctx.read_buffer(&self.buf.t_comp, 0, bytes)?;
        let logp: Vec<f32> = self
            .ctx
            .read_buffer(&self.buf.logp_all, 0, self.plan.n as u64 * 4)?;
        let mut stats = Stats::zeros(&self.g);
        for kk in 0..k {
            let row = kk * (r + 1);
            for j in 0..r {
                stats.t[kk * r + j] = (acc[row + j] - comp[row + j]) as f64;
            }
            stats.b[kk] = (acc[row + r] - comp[row + r]) as f64;
        }
        stats.ll = logp.iter().map(|&v| v as f64).sum();
        Ok(stats)
    }

    /// The update kernel on the given statistics (rounded to f32, as the device holds its own).
    fn apply(&mut self, stats: &Stats) -> Result<EpochStats> {
        let (k, r) = (self.g.k, self.g.r());
        let mut acc = vec![0f32; k * (r + 1)];
        for kk in 0..k {
            for j in 0..r {
                acc[kk * (r + 1) + j] = stats.t[kk * r + j] as f32;
            }
            acc[kk * (r + 1) + r] = stats.b[kk] as f32;
        }
        let q = &self.ctx.queue;
        q.write_buffer(&self.buf.t_acc, 0, bytemuck::cast_slice(&acc));
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&self.buf.t_comp, 0, None);
        q.submit([enc.finish()]);
        let [_, _, s, finite] = self.finish_epoch()?;
        let finite = finite == 1.0 && stats.ll.is_finite();
        self.commit_if(finite)?;
        Ok(EpochStats {
            loglik: stats.ll,
            count_sum: s as f64,
            finite,
        })
    }

    fn batch(&self) -> usize {
        self.plan.max_batch
    }

    fn theta(&mut self) -> Result<Vec<f32>> {
        let (k, r) = (self.g.k as u64, self.g.r() as u64);
        self.ctx.read_buffer(&self.buf.theta, 0, k * r * 4)
    }

    fn set_theta(&mut self, theta: &[f32]) -> Result<()> {
        if theta.len() != self.g.k * self.g.r() {
            return Err(CalmError::Invalid(format!(
                "set_theta: {} values for {} weights",
                theta.len(),
                self.g.k * self.g.r()
            )));
        }
        self.ctx
            .queue
            .write_buffer(&self.buf.theta, 0, bytemuck::cast_slice(theta));
        self.write_effective(theta);
        Ok(())
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
        prior.check(self.g.k).map_err(CalmError::Invalid)?;
        self.prior = prior.clone();
        let theta = self.theta()?;
        self.write_effective(&theta);
        Ok(())
    }

    fn counts(&mut self) -> Result<Vec<f32>> {
        self.ctx
            .read_buffer(&self.buf.counts, 0, self.g.k as u64 * 4)
    }
}
