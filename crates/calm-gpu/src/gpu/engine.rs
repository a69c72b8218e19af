//! The GPU engine: uploads the dataset once, keeps data, `theta` and the statistics resident on
//! the device for the whole run, and reads back four scalars per epoch.
//!
//! Per batch (one command buffer): `estep` -> `logsumexp` -> `mstep` -> `reduce_stats`.
//! Per epoch: `update` -> `summary`, read `[LL hi, LL lo, S, finite]`; if finite, copy
//! `theta_next` over `theta`.
//!
//! A dataset larger than one storage binding is split over several resident buffers of whole
//! images; batches never straddle two of them, so a batch may be shorter than `--batch` at a
//! buffer's end, which changes nothing but rounding.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::Array2;
use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::kernels::{Params, Pipelines, Tiles, UBO_FLOATS, Variant, ubo_rows};
use super::tune::{self, Choice, Lookup};
use crate::cancel::CancelToken;
use crate::cpu::reference::pad_images;
use crate::data::ImageSource;
use crate::engine::{Engine, EpochStats};
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
    /// Tile shapes; `None`: `CALM_TILES`, else the tuning file's choice for this adapter and
    /// shape (`calm-gpu tune`, [`super::tune`]), else the built-in rule for the adapter.
    pub tiles: Option<Tiles>,
    /// Kernel implementation; `None`: `CALM_KERNELS`, else the tuning file's, else the
    /// adapter's default. The tuning file is read only when neither field is set and neither
    /// variable is.
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

/// Batch-sized device buffers that a dataset larger than the memory budget streams through:
/// one being read by the kernels while the next is written.
pub const STREAM_SLOTS: usize = 2;

/// Batches queued on the GPU before the host waits for the oldest: enough to hide the
/// submission gap (a 1,000-image MNIST batch takes about 1 ms on an H100), few enough that the
/// progress bar tells the truth.
const IN_FLIGHT: usize = 6;

struct Batch {
    n_images: usize,
    /// Index of its first image in the dataset.
    first: usize,
    /// Which of `Resident::x` it reads.
    x: usize,
    /// Bind groups, built once: estep, logsumexp, mstep, reduce_stats, features.
    /// The E-step's and the M-step's bind groups: one, or for the uniform-buffer kernels
    /// ([`Variant::Uniform`]) one per window (of reduction steps, of positions), a dispatch each.
    estep: Vec<wgpu::BindGroup>,
    lse: wgpu::BindGroup,
    /// None where the M-step computes the posteriors itself (staged kernels, Tiles::m_fused).
    posterior: Option<wgpu::BindGroup>,
    mstep: Vec<wgpu::BindGroup>,
    reduce: wgpu::BindGroup,
    features: wgpu::BindGroup,
    tri_mean: wgpu::BindGroup,
    features_tri: wgpu::BindGroup,
    /// Workgroups of estep (x) and mstep (z).
    estep_groups: u32,
    n_chunks: u32,
}

/// Buffers that live for the whole run.
struct Resident {
    theta: wgpu::Buffer,
    theta_t: wgpu::Buffer,
    theta_t_next: wgpu::Buffer,
    gpost: wgpu::Buffer,
    bias: wgpu::Buffer,
    theta_next: wgpu::Buffer,
    bias_next: wgpu::Buffer,
    counts: wgpu::Buffer,
    counts_next: wgpu::Buffer,
    l: wgpu::Buffer,
    logp_all: wgpu::Buffer,
    t_acc: wgpu::Buffer,
    t_comp: wgpu::Buffer,
    summary: wgpu::Buffer,
    f: wgpu::Buffer,
    /// Triangle features: `||x_u||^2` and the mean distance per patch, `(batch, P, 2)`.
    pm: wgpu::Buffer,
    /// The padded dataset (resident), or the batch-sized slots it streams through.
    x: Vec<wgpu::Buffer>,
}

pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    g: Geometry,
    n: usize,
    tiles: Tiles,
    pipes: Pipelines,
    buf: Resident,
    batches: Vec<Batch>,
    update_bg: wgpu::BindGroup,
    summary_bg: wgpu::BindGroup,
    max_batch: usize,
    device_bytes: u64,
    grid: usize,
    encoding: Encoding,
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
    pub logp_all: Vec<f32>,
    /// Statistics `(K, R + 1)`, column `R` holding `B`.
    pub t: Vec<f32>,
    pub theta_next: Vec<f32>,
    pub bias_next: Vec<f32>,
    pub counts_next: Vec<f32>,
}

/// Storage buffers; the ones the uniform-buffer kernels read in windows are also UNIFORM.
const RW: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);
const RW_UNIFORM: wgpu::BufferUsages = RW.union(wgpu::BufferUsages::UNIFORM);

fn storage_as(
    ctx: &GpuContext,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4),
        usage,
        mapped_at_creation: false,
    })
}

fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    storage_as(ctx, label, bytes, RW)
}

fn init_as(ctx: &GpuContext, label: &str, data: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage,
        })
}

fn init(ctx: &GpuContext, label: &str, data: &[u8]) -> wgpu::Buffer {
    init_as(ctx, label, data, RW)
}

/// A binding of `size` bytes of `buffer` from `offset`.
fn part(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: std::num::NonZeroU64::new(size),
    })
}

/// Binds `parts` in binding order.
fn bind_parts(
    ctx: &GpuContext,
    pipe: &wgpu::ComputePipeline,
    parts: Vec<wgpu::BindingResource<'_>>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = parts
        .into_iter()
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipe.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// Binds whole buffers, in binding order.
fn bind(ctx: &GpuContext, pipe: &wgpu::ComputePipeline, bufs: &[&wgpu::Buffer]) -> wgpu::BindGroup {
    bind_parts(
        ctx,
        pipe,
        bufs.iter().map(|b| b.as_entire_binding()).collect(),
    )
}

/// The bind groups of one batch's windows for the uniform-buffer kernels ([`Variant::Uniform`]):
/// the E-step's reduction steps and the M-step's `nb * P` positions in windows of `rows`, each
/// a 64 KiB uniform binding of theta_t or G and a dispatch. The M-step windows add to
/// `n_chunks` partial sums in turn (window w to sum `w * n_chunks / windows`), the first window
/// of each sum writing it. `bufs`: params, x, theta_t, bias, off, L, G, partials.
fn uniform_windows(
    ctx: &GpuContext,
    pipes: &Pipelines,
    g: &Geometry,
    rows: usize,
    nb: usize,
    n_chunks: u32,
    bufs: [&wgpu::Buffer; 8],
) -> (Vec<wgpu::BindGroup>, Vec<wgpu::BindGroup>) {
    let [pb, xb, theta_t, bias, off, l, gpost, partials] = bufs;
    let kp = g.kpad();
    let (e_windows, tot) = (g.r().div_ceil(rows), nb * g.positions());
    let m_windows = tot.div_ceil(rows);
    // Each window's `Window` uniform (lo, rows, slot, first), at the uniform offset alignment.
    let stride = ctx.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
    let mut win: Vec<u32> = Vec::new();
    let mut push = |lo: usize, len: usize, slot: usize, first: bool| {
        let at = win.len();
        win.resize(at + stride / 4, 0);
        win[at..at + 4].copy_from_slice(&[lo as u32, len as u32, slot as u32, first as u32]);
    };
    for w in 0..e_windows {
        push(w * rows, rows.min(g.r() - w * rows), 0, w == 0);
    }
    let slot = |w: usize| w * n_chunks as usize / m_windows;
    for w in 0..m_windows {
        let first = w == 0 || slot(w) != slot(w - 1);
        push(w * rows, rows.min(tot - w * rows), slot(w), first);
    }
    let wb = init_as(
        ctx,
        "windows",
        bytemuck::cast_slice(&win),
        wgpu::BufferUsages::UNIFORM,
    );
    let window = |i: usize| part(&wb, (i * stride) as u64, 16);
    let ubo = UBO_FLOATS as u64 * 4;
    let at = |w: usize| (w * rows * kp * 4) as u64;
    let estep = (0..e_windows)
        .map(|w| {
            bind_parts(
                ctx,
                &pipes.estep,
                vec![
                    pb.as_entire_binding(),
                    xb.as_entire_binding(),
                    part(theta_t, at(w), ubo),
                    bias.as_entire_binding(),
                    part(off, 0, ubo),
                    l.as_entire_binding(),
                    window(w),
                ],
            )
        })
        .collect();
    let mstep = (0..m_windows)
        .map(|w| {
            bind_parts(
                ctx,
                &pipes.mstep,
                vec![
                    pb.as_entire_binding(),
                    part(gpost, at(w), ubo),
                    xb.as_entire_binding(),
                    off.as_entire_binding(),
                    partials.as_entire_binding(),
                    window(e_windows + w),
                ],
            )
        })
        .collect();
    (estep, mstep)
}

/// Images `start .. start + count` of `source`, checked finite and zero-padded (`host` is
/// scratch space, reused).
fn read_padded(
    g: &Geometry,
    source: &dyn ImageSource,
    start: usize,
    count: usize,
    host: &mut Vec<f32>,
) -> Result<Vec<f32>> {
    let per = g.c * g.h * g.w;
    host.resize(count * per, 0.0);
    source.read_into(start, count, host)?;
    if let Some(i) = host.iter().position(|v| !v.is_finite()) {
        return Err(CalmError::Invalid(format!(
            "image {} holds a non-finite value (NaN or infinity); clean the data first",
            start + i / per
        )));
    }
    Ok(pad_images(g, host, count))
}

fn tiles_for(ctx: &GpuContext, opt: Option<Tiles>, g: &Geometry) -> Result<Tiles> {
    let k = g.k;
    let tiles = match opt {
        Some(t) => t,
        None => Tiles::for_shape(k, g.r(), ctx.limits.max_compute_workgroup_storage_size),
    };
    // The uniform-buffer kernels' tile of kernels follows K, whoever chose the rest.
    let tiles = Tiles {
        u_tn: Tiles::uniform_tn(k),
        ..tiles
    };
    tiles
        .check()
        .map_err(|why| CalmError::Invalid(format!("tiles {tiles}: {why}")))?;
    Ok(tiles)
}

/// The variant an engine runs when `wanted` is asked for (`asked`: by the caller, CALM_KERNELS
/// or the tuning file) or is the adapter's default. The uniform-buffer kernels need 64 KiB
/// uniform bindings, and a row of theta and of G and the offset table to fit one (K up to about
/// 2,000, R up to 16,384): asked for where they do not fit, an error. Chosen by default only
/// where a window holds 64 rows or more (K up to 248): below that, the windows (a bind group and
/// a dispatch each) grow too many; else the staged kernels.
fn resolve_variant(
    ctx: &GpuContext,
    g: &Geometry,
    tiles: &Tiles,
    wanted: Variant,
    asked: bool,
) -> Result<Variant> {
    if wanted != Variant::Uniform {
        return Ok(wanted);
    }
    let rows_u = ubo_rows(g.kpad(), tiles.u_tn);
    let fits = rows_u > 0
        && g.r() <= UBO_FLOATS
        && ctx.limits.max_uniform_buffer_binding_size >= UBO_FLOATS as u64 * 4;
    if asked && !fits {
        return Err(CalmError::Invalid(format!(
            "the uniform-buffer kernels need 64 KiB uniform bindings ({} allows {} bytes), K <= 2,000 and R <= {UBO_FLOATS}; K={} and R={} (choose the staged kernels)",
            ctx.info.name,
            ctx.limits.max_uniform_buffer_binding_size,
            g.k,
            g.r()
        )));
    }
    Ok(if !fits || (!asked && rows_u < 64) {
        Variant::Staged
    } else {
        Variant::Uniform
    })
}

/// The kernels an engine for `g` runs on `ctx`'s adapter when nobody chose (no options, no
/// `CALM_TILES` or `CALM_KERNELS`, no tuning file): what `calm-gpu tune` measures against.
pub fn builtin_choice(ctx: &GpuContext, g: &Geometry) -> Result<Choice> {
    let tiles = Tiles {
        u_tn: Tiles::uniform_tn(g.k),
        ..Tiles::for_shape(g.k, g.r(), ctx.limits.max_compute_workgroup_storage_size)
    };
    let variant = resolve_variant(ctx, g, &tiles, Variant::builtin(&ctx.info), false)?;
    Ok(Choice::new(variant, tiles))
}

/// Whether the adapter runs the staged kernels with `tiles`: their workgroup memory and thread
/// counts against its limits (the other variants use neither).
fn staged_tiles_fit(ctx: &GpuContext, tiles: &Tiles) -> Result<()> {
    let (e, m) = tiles.workgroup_bytes();
    let l = &ctx.limits;
    let max = l.max_compute_workgroup_storage_size;
    if e.max(m) > max {
        return Err(CalmError::Gpu(format!(
            "tiles {tiles} need {} bytes of workgroup memory; {} allows {max}",
            e.max(m),
            ctx.info.name
        )));
    }
    for (wx, wy) in [(tiles.e_wx, tiles.e_wy), (tiles.m_wx, tiles.m_wy)] {
        if wx as u64 * wy as u64 > l.max_compute_invocations_per_workgroup as u64
            || wx > l.max_compute_workgroup_size_x
            || wy > l.max_compute_workgroup_size_y
        {
            return Err(CalmError::Gpu(format!(
                "tiles {tiles} need workgroups of {wx} x {wy} threads; {} allows {} x {}, {} in all",
                ctx.info.name,
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_invocations_per_workgroup
            )));
        }
    }
    Ok(())
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

    // One piece for now (about 460 lines): it plans memory, builds the pipelines, allocates the
    // buffers and bind groups in one pass because each step sizes the next. Issue 19 item 5
    // splits it into a memory plan and one struct per kernel; not done yet.
    fn build(
        ctx: Arc<GpuContext>,
        g: Geometry,
        source: Arc<dyn ImageSource>,
        theta: &[f32],
        opts: &GpuOptions,
        mut stream: bool,
    ) -> Result<Self> {
        let n = source.len();
        if n == 0 {
            return Err(CalmError::Invalid("the dataset holds no images".into()));
        }
        assert_eq!(theta.len(), g.k * g.r());
        // A choice tuned on this adapter for this shape (`calm-gpu tune`), unless the caller
        // chose.
        let chosen_by = (opts.tiles.is_some() || opts.variant.is_some()).then(|| {
            opts.chosen_by
                .clone()
                .unwrap_or_else(|| "chosen by the caller".into())
        });
        let tuned = match (&opts.tune_file, &chosen_by) {
            (Some(path), None) => tune::lookup(&ctx, &g, path),
            _ => Lookup::None,
        };
        let tuned_choice = match &tuned {
            Lookup::Found(c, _) => Some(*c),
            _ => None,
        };
        let tiles = tiles_for(&ctx, opts.tiles.or(tuned_choice.map(|c| c.tiles)), &g)?;
        let grid = opts.grid.max(1);
        g.check_pool_grid(grid)?;
        let tri = opts.encoding == Encoding::Triangle;
        let asked = opts.variant.or(tuned_choice.map(|c| c.variant));
        let variant = match asked {
            Some(v) => resolve_variant(&ctx, &g, &tiles, v, true)?,
            None => resolve_variant(&ctx, &g, &tiles, Variant::builtin(&ctx.info), false)?,
        };
        let uniform = variant == Variant::Uniform;
        let rows_u = ubo_rows(g.kpad(), tiles.u_tn);
        // The G buffer and the posterior pass, unless the staged M-step computes the
        // posteriors while loading (Tiles::m_fused).
        let uses_g = !(variant == Variant::Staged && tiles.m_fused);
        // Zeros after the offset table: the M-step's tile loads read up to a column tile past R.
        let off_pad = (tiles.m_tr() as usize).max(1100);
        if variant == Variant::Staged {
            staged_tiles_fit(&ctx, &tiles)?;
        }
        let pipes = Pipelines::new(&ctx, &tiles, variant)?;
        let kp = g.kpad() as u64;

        let (k, r, p) = (g.k as u64, g.r() as u64, g.positions() as u64);
        let mut cap = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        if let Some(c) = opts.binding_cap {
            cap = cap.min(c);
        }
        let img_bytes = g.padded_len() as u64 * 4;
        let per_x_buffer = (cap / img_bytes) as usize;
        // Images per M-step chunk: about 2,048 positions each, so a batch of MNIST digits gives
        // hundreds of workgroups (PERF.md: split the long reduction).
        let ipc = (2048 / g.positions()).clamp(1, 64);
        let stat_bytes = k * (r + 1) * 4;
        // G carries a 64 KiB tail for the uniform-buffer kernels' last window: bound only as
        // windows, it counts against the buffer size, not the storage binding.
        let g_tail = if uniform { UBO_FLOATS as u64 * 4 } else { 0 };
        let by_l = (cap / (kp * p * 4))
            .min(ctx.limits.max_buffer_size.saturating_sub(g_tail) / (kp * p * 4))
            as usize;
        let by_partials = (cap / stat_bytes) as usize * ipc;
        // Positions per E-step workgroup, for the 65,535-workgroup limit.
        let tm = variant.estep_positions(&tiles);
        let by_dispatch = (65535usize * tm / g.positions()).min(65535);
        let mut max_batch = opts
            .batch
            .max(1)
            .min(by_l)
            .min(by_partials)
            .min(per_x_buffer)
            .min(by_dispatch)
            .min(n);
        if max_batch == 0 || g.k * g.r() * 4 > cap as usize {
            return Err(CalmError::Gpu(format!(
                "one image's data does not fit {}'s {} MiB storage binding limit for K={}, {}x{} positions",
                ctx.info.name,
                cap >> 20,
                g.k,
                g.ho,
                g.wo
            )));
        }

        // Device memory: everything but the data scales with the batch; the data is either all
        // resident or `STREAM_SLOTS` batches. Plan within the budget before allocating.
        // The uniform-buffer kernels' `Window` uniforms, 256 bytes each at the most, for every
        // batch: the E-step's windows and the M-step's, about n * P / rows in all.
        let windows = |mb: usize| -> u64 {
            if !uniform {
                return 0;
            }
            let batches = n.div_ceil(mb.max(1)) as u64;
            let e_windows = g.r().div_ceil(rows_u) as u64;
            256 * ((n as u64 * p).div_ceil(rows_u as u64) + batches * (e_windows + 1))
        };
        let fixed = |mb: usize| -> u64 {
            let mb = mb as u64;
            let chunks = mb.div_ceil(ipc as u64);
            // theta, theta_next; theta_t, theta_t_next; bias, bias_next, counts, counts_next, bad
            2 * k * r * 4 + 2 * r * kp * 4 + 5 * k * 4
                + if uses_g { mb * p * kp * 4 } else { 0 } // G
                + mb * k * p * 4 // L
                + mb * k * (grid * grid) as u64 * 4 // features
                + if tri { mb * p * 2 * 4 } else { 0 } // triangle: norms and means
                + (2 + chunks) * stat_bytes // t_acc, t_comp, partials
                + n as u64 * 4 // logp_all
                + (r + off_pad as u64 + p + 128) * 4 + 16 // offsets, summary
                + if uniform { 3 * UBO_FLOATS as u64 * 4 } else { 0 } // 64 KiB window tails
                + windows(mb as usize)
        };
        let budget = opts.memory_budget.or(ctx.budget);
        if let Some(b) = budget {
            if !stream && fixed(max_batch) + n as u64 * img_bytes > b {
                stream = true;
            }
            if stream {
                let need = |mb: usize| fixed(mb) + (STREAM_SLOTS * mb) as u64 * img_bytes;
                while max_batch > 1 && need(max_batch) > b {
                    max_batch = max_batch * 3 / 4;
                }
                if need(max_batch) > b {
                    return Err(CalmError::GpuMemory(format!(
                        "{} needs at least {} MiB of device memory for K={}, {}x{} positions and {} images, but plans within {} MiB ({}); use a smaller K or kernel, or fewer images",
                        ctx.info.name,
                        need(1).div_ceil(1 << 20),
                        g.k,
                        g.ho,
                        g.wo,
                        n,
                        b >> 20,
                        if opts.memory_budget.is_some() {
                            "the budget GpuOptions set"
                        } else {
                            ctx.budget_source
                        }
                    )));
                }
            }
        }

        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        // Dataset: resident buffers of whole padded images, or the streaming slots.
        let mut x_bufs = Vec::new();
        // (buffer, offset in it, first image, images) of every batch.
        let mut batch_plan = Vec::new();
        if stream {
            let n_batches = n.div_ceil(max_batch);
            for _ in 0..STREAM_SLOTS.min(n_batches) {
                x_bufs.push(storage(&ctx, "x-slot", max_batch as u64 * img_bytes));
            }
            for i in 0..n_batches {
                let first = i * max_batch;
                batch_plan.push((i % x_bufs.len(), 0, first, max_batch.min(n - first)));
            }
        } else {
            let mut start = 0;
            let piece = ((64 << 20) / img_bytes as usize).max(1);
            let mut host = Vec::new();
            while start < n {
                let cnt = per_x_buffer.min(n - start);
                let buf = storage(&ctx, "x", cnt as u64 * img_bytes);
                let mut done = 0;
                while done < cnt {
                    let m = piece.min(cnt - done);
                    let padded = read_padded(&g, source.as_ref(), start + done, m, &mut host)?;
                    ctx.queue.write_buffer(
                        &buf,
                        done as u64 * img_bytes,
                        bytemuck::cast_slice(&padded),
                    );
                    // Flush the staging memory now and then so a large upload stays bounded.
                    ctx.queue.submit([]);
                    done += m;
                }
                let mut s = 0;
                while s < cnt {
                    let nb = max_batch.min(cnt - s);
                    batch_plan.push((x_bufs.len(), s, start + s, nb));
                    s += nb;
                }
                x_bufs.push(buf);
                start += cnt;
            }
        }

        let bias: Vec<f32> = crate::cpu::fast::bias_f32(&g, theta);
        let off: Vec<u32> = (0..g.c)
            .flat_map(|c| {
                (0..g.kw)
                    .flat_map(move |i| (0..g.kw).map(move |j| ((c * g.hp + i) * g.wp + j) as u32))
            })
            // Zeros past R and P: the M-step's tile loads read them (in bounds, value unused)
            // instead of branching per element, up to a whole column tile past R.
            .chain(std::iter::repeat_n(0, off_pad))
            .collect();
        // The uniform-buffer E-step reads the table as one 64 KiB uniform binding.
        let mut off = off;
        if uniform {
            off.resize(off.len().max(UBO_FLOATS), 0);
        }
        let pos_off: Vec<u32> = (0..g.ho)
            .flat_map(|h| (0..g.wo).map(move |w| (h * g.wp + w) as u32))
            .chain(std::iter::repeat_n(0, 128))
            .collect();
        let n_chunks_max = max_batch.div_ceil(ipc) as u64;
        let buf = Resident {
            theta: init(&ctx, "theta", bytemuck::cast_slice(theta)),
            theta_t: {
                // Zero rows after theta_t so that the last window's 64 KiB binding fits.
                let mut t = transpose_padded(&g, theta);
                if uniform {
                    let last = (g.r() - 1) / rows_u * rows_u;
                    t.resize(t.len().max(last * g.kpad() + UBO_FLOATS), 0.0);
                }
                init_as(&ctx, "theta_t", bytemuck::cast_slice(&t), RW_UNIFORM)
            },
            theta_t_next: storage(&ctx, "theta_t_next", r * kp * 4),
            gpost: storage_as(
                &ctx,
                "G",
                if uses_g {
                    max_batch as u64 * p * kp * 4 + if uniform { UBO_FLOATS as u64 * 4 } else { 0 }
                } else {
                    16 // bound nowhere
                },
                RW_UNIFORM,
            ),
            bias: init(&ctx, "bias", bytemuck::cast_slice(&bias)),
            theta_next: storage(&ctx, "theta_next", k * r * 4),
            bias_next: storage(&ctx, "bias_next", k * 4),
            counts: storage(&ctx, "counts", k * 4),
            counts_next: storage(&ctx, "counts_next", k * 4),
            l: storage(&ctx, "L", max_batch as u64 * k * p * 4),
            logp_all: storage(&ctx, "logp_all", n as u64 * 4),
            t_acc: storage(&ctx, "t_acc", stat_bytes),
            t_comp: storage(&ctx, "t_comp", stat_bytes),
            summary: storage(&ctx, "summary", 16),
            f: storage(
                &ctx,
                "features",
                max_batch as u64 * k * (grid * grid) as u64 * 4,
            ),
            pm: storage(
                &ctx,
                "tri-pm",
                if tri { max_batch as u64 * p * 2 * 4 } else { 4 },
            ),
            x: x_bufs,
        };
        let off_buf = init_as(&ctx, "off", bytemuck::cast_slice(&off), RW_UNIFORM);
        let pos_buf = init(&ctx, "pos_off", bytemuck::cast_slice(&pos_off));
        let partials = storage(&ctx, "partials", n_chunks_max * stat_bytes);
        let bad = storage(&ctx, "bad", k * 4);

        let base = Params {
            k: g.k as u32,
            r: g.r() as u32,
            positions: g.positions() as u32,
            wo: g.wo as u32,
            wp: g.wp as u32,
            img_stride: g.padded_len() as u32,
            imgs_per_chunk: ipc as u32,
            n_total: n as u32,
            grid: grid as u32,
            ..Default::default()
        };
        let mut batches = Vec::new();
        for &(xi, offset, first, nb) in &batch_plan {
            let xb = &buf.x[xi];
            {
                let mut n_chunks = nb.div_ceil(ipc);
                if uniform {
                    // Every partial sum gets at least one M-step window.
                    n_chunks = n_chunks.min((nb * g.positions()).div_ceil(rows_u));
                }
                let n_chunks = n_chunks as u32;
                let prm = Params {
                    n_images: nb as u32,
                    x_offset: offset as u32,
                    logp_offset: first as u32,
                    n_chunks,
                    ..base
                };
                let pb = ctx
                    .device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("params"),
                        contents: bytemuck::bytes_of(&prm),
                        usage: wgpu::BufferUsages::UNIFORM,
                    });
                let (estep, mstep) = if uniform {
                    uniform_windows(
                        &ctx,
                        &pipes,
                        &g,
                        rows_u,
                        nb,
                        n_chunks,
                        [
                            &pb,
                            xb,
                            &buf.theta_t,
                            &buf.bias,
                            &off_buf,
                            &buf.l,
                            &buf.gpost,
                            &partials,
                        ],
                    )
                } else {
                    (
                        vec![bind(
                            &ctx,
                            &pipes.estep,
                            &[&pb, xb, &buf.theta_t, &buf.bias, &off_buf, &buf.l],
                        )],
                        vec![{
                            // The staged M-step reads G, or (Tiles::m_fused) L and logp.
                            let g_src = if uses_g { &buf.gpost } else { &buf.l };
                            let mut bufs = vec![&pb, g_src, xb, &off_buf, &pos_buf, &partials];
                            if !uses_g {
                                bufs.push(&buf.logp_all);
                            }
                            bind(&ctx, &pipes.mstep, &bufs)
                        }],
                    )
                };
                batches.push(Batch {
                    n_images: nb,
                    first,
                    x: xi,
                    estep,
                    lse: bind(&ctx, &pipes.logsumexp, &[&pb, &buf.l, &buf.logp_all]),
                    posterior: uses_g.then(|| {
                        bind_parts(
                            &ctx,
                            &pipes.posterior,
                            vec![
                                pb.as_entire_binding(),
                                buf.l.as_entire_binding(),
                                buf.logp_all.as_entire_binding(),
                                // Without the uniform-buffer kernels' tail.
                                part(&buf.gpost, 0, max_batch as u64 * p * kp * 4),
                            ],
                        )
                    }),
                    mstep,
                    reduce: bind(
                        &ctx,
                        &pipes.reduce_stats,
                        &[&pb, &partials, &buf.t_acc, &buf.t_comp],
                    ),
                    features: bind(&ctx, &pipes.features, &[&pb, &buf.l, &buf.f]),
                    tri_mean: bind(&ctx, &pipes.tri_mean, &[&pb, xb, &off_buf, &buf.l, &buf.pm]),
                    features_tri: bind(&ctx, &pipes.features_tri, &[&pb, &buf.l, &buf.pm, &buf.f]),
                    estep_groups: (nb * g.positions()).div_ceil(tm) as u32,
                    n_chunks,
                });
            }
        }
        let gp = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params-global"),
                contents: bytemuck::bytes_of(&base),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let update_bg = bind(
            &ctx,
            &pipes.update,
            &[
                &gp,
                &buf.t_acc,
                &buf.t_comp,
                &buf.theta_next,
                &buf.bias_next,
                &buf.counts_next,
                &bad,
                &buf.theta_t_next,
            ],
        );
        let summary_bg = bind(
            &ctx,
            &pipes.summary,
            &[
                &gp,
                &buf.logp_all,
                &buf.t_acc,
                &buf.t_comp,
                &bad,
                &buf.summary,
            ],
        );
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(CalmError::GpuMemory(format!(
                "{} ran out of memory holding the {} and statistics ({e}); try a smaller batch, or a memory budget (GpuConfig::memory_budget) below what it has",
                ctx.info.name,
                if stream { "data slots" } else { "dataset" }
            )));
        }
        ctx.wait()?;
        let device_bytes = [
            &buf.theta,
            &buf.theta_t,
            &buf.theta_t_next,
            &buf.gpost,
            &buf.bias,
            &buf.theta_next,
            &buf.bias_next,
            &buf.counts,
            &buf.counts_next,
        ]
        .into_iter()
        .chain([
            &buf.l,
            &buf.logp_all,
            &buf.t_acc,
            &buf.t_comp,
            &buf.summary,
            &buf.f,
            &buf.pm,
        ])
        .chain([&partials, &off_buf, &pos_buf, &bad])
        .chain(buf.x.iter())
        .map(|b| b.size())
        .sum();
        Ok(Self {
            prior: Prior::uniform(g.k),
            grid,
            encoding: opts.encoding,
            device_bytes,
            source: stream.then_some(source),
            ctx,
            g,
            n,
            tiles,
            pipes,
            buf,
            batches,
            update_bg,
            summary_bg,
            max_batch,
            tuned,
            chosen_by,
            cancel: opts.cancel.clone(),
        })
    }

    /// Bytes of every buffer the engine allocated on the device.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    pub fn tiles(&self) -> Tiles {
        self.tiles
    }

    /// The implementation of the GEMM kernels this engine runs.
    pub fn variant(&self) -> Variant {
        self.pipes.variant
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
        crate::error::printable(&line, 2000)
    }

    /// The largest batch the engine runs (the user's, or less where the device requires).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// True when the data streams through batch-sized buffers instead of staying resident.
    pub fn streamed(&self) -> bool {
        self.source.is_some()
    }

    /// Calls `body` on every batch in order, the batch's images on the device by then: when the
    /// data streams, a reader thread reads and pads the next batches while the GPU works, and
    /// each is written to its slot just before its `body` (wgpu orders that write after the
    /// work already submitted that reads the slot).
    fn for_each_batch(&self, mut body: impl FnMut(&Batch) -> Result<()>) -> Result<()> {
        let Some(source) = &self.source else {
            return self.batches.iter().try_for_each(body);
        };
        let ranges: Vec<(usize, usize)> =
            self.batches.iter().map(|b| (b.first, b.n_images)).collect();
        let g = self.g;
        std::thread::scope(|scope| {
            // Two batches read ahead bound the host memory.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(2);
            let source = source.clone();
            scope.spawn(move || {
                let mut host = Vec::new();
                for (first, count) in ranges {
                    let r = read_padded(&g, source.as_ref(), first, count, &mut host);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            for b in &self.batches {
                let data = rx
                    .recv()
                    .map_err(|_| CalmError::Gpu("the data reader stopped early".into()))??;
                self.ctx
                    .queue
                    .write_buffer(&self.buf.x[b.x], 0, bytemuck::cast_slice(&data));
                body(b)?;
            }
            Ok(())
        })
    }

    fn record_estep(&self, pass: &mut wgpu::ComputePass, b: &Batch) {
        let tn = match self.pipes.variant {
            Variant::Staged => self.tiles.e_tn() as usize,
            Variant::Direct => 8,
            Variant::Uniform => self.tiles.u_tn as usize,
        };
        pass.set_pipeline(&self.pipes.estep);
        for bg in &b.estep {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(b.estep_groups, self.g.k.div_ceil(tn) as u32, 1);
        }
    }

    fn record_mstep(&self, pass: &mut wgpu::ComputePass, b: &Batch) {
        let g = self.g;
        let kp = g.kpad();
        // None where the staged M-step computes the posteriors itself (Tiles::m_fused).
        if let Some(posterior) = &b.posterior {
            pass.set_pipeline(&self.pipes.posterior);
            pass.set_bind_group(0, posterior, &[]);
            pass.dispatch_workgroups(
                g.positions().div_ceil(32) as u32,
                kp.div_ceil(32) as u32,
                b.n_images as u32,
            );
        }
        pass.set_pipeline(&self.pipes.mstep);
        let (x, y, z) = match self.pipes.variant {
            // R columns: B (column R of the partial sums) is summed by column tile 0.
            Variant::Staged => (
                g.r().div_ceil(self.tiles.m_tr() as usize),
                g.k.div_ceil(self.tiles.m_tk() as usize),
                b.n_chunks as usize,
            ),
            Variant::Direct => {
                let blocks = (g.r() + 1).div_ceil(8) * (kp / 8);
                (blocks.div_ceil(64), 1, b.n_chunks as usize)
            }
            // A dispatch per window; each adds to its own partial sum.
            Variant::Uniform => {
                let per = super::kernels::UBO_M_THREADS * self.tiles.u_rr;
                (
                    (g.r() + 1).div_ceil(per as usize),
                    g.k.div_ceil(self.tiles.u_tn as usize),
                    1,
                )
            }
        };
        for bg in &b.mstep {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(x as u32, y as u32, z as u32);
        }
    }

    /// Submits the statistics of every batch; calls `progress` as batches finish. At most
    /// `IN_FLIGHT` batches are queued, which keeps the GPU busy and the progress honest.
    fn accumulate(&self, progress: &mut dyn FnMut(usize)) -> Result<()> {
        let g = self.g;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&self.buf.t_acc, 0, None);
        enc.clear_buffer(&self.buf.t_comp, 0, None);
        let mut enc = Some(enc);
        let done = Arc::new(AtomicUsize::new(0));
        let mut in_flight = std::collections::VecDeque::new();
        self.for_each_batch(|b| {
            let mut e = enc
                .take()
                .unwrap_or_else(|| self.ctx.device.create_command_encoder(&Default::default()));
            {
                let mut pass = e.begin_compute_pass(&Default::default());
                self.record_estep(&mut pass, b);
                pass.set_pipeline(&self.pipes.logsumexp);
                pass.set_bind_group(0, &b.lse, &[]);
                pass.dispatch_workgroups(b.n_images as u32, 1, 1);
                self.record_mstep(&mut pass, b);
                pass.set_pipeline(&self.pipes.reduce_stats);
                pass.set_bind_group(0, &b.reduce, &[]);
                let groups = (g.k * (g.r() + 1)).div_ceil(256) as u32;
                pass.dispatch_workgroups(groups.min(65535), groups.div_ceil(65535), 1);
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
            pass.set_pipeline(&self.pipes.update);
            pass.set_bind_group(0, &self.update_bg, &[]);
            pass.dispatch_workgroups(self.g.k as u32, 1, 1);
            pass.set_pipeline(&self.pipes.summary);
            pass.set_bind_group(0, &self.summary_bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        self.ctx.queue.submit([enc.finish()]);
        let s: Vec<f32> = self.ctx.read_buffer(&self.buf.summary, 0, 16)?;
        Ok([s[0], s[1], s[2], s[3]])
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
        q.submit([]);
    }

    /// Reads back every intermediate the kernels left (for `validate` and tests).
    pub fn read_state(&self) -> Result<GpuState> {
        let (k, r, p) = (
            self.g.k as u64,
            self.g.r() as u64,
            self.g.positions() as u64,
        );
        let last = self.batches.last().map_or(0, |b| b.n_images) as u64;
        let acc: Vec<f32> = self.ctx.read_buffer(&self.buf.t_acc, 0, k * (r + 1) * 4)?;
        let comp: Vec<f32> = self.ctx.read_buffer(&self.buf.t_comp, 0, k * (r + 1) * 4)?;
        Ok(GpuState {
            l_last: self.ctx.read_buffer(&self.buf.l, 0, last * k * p * 4)?,
            logp_all: self
                .ctx
                .read_buffer(&self.buf.logp_all, 0, self.n as u64 * 4)?,
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
            for b in &self.batches {
                self.record_mstep(&mut pass, b);
                pass.set_pipeline(&self.pipes.reduce_stats);
                pass.set_bind_group(0, &b.reduce, &[]);
                let groups = (self.g.k * (self.g.r() + 1)).div_ceil(256) as u32;
                pass.dispatch_workgroups(groups.min(65535), groups.div_ceil(65535), 1);
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
            for b in &self.batches {
                self.record_estep(&mut pass, b);
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        self.ctx.wait()?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Features of the engine's dataset under the current `theta`: `(N, K * grid * grid)`, the
    /// log-sum-exp of `L` over each pooling region (`GpuOptions::grid`; 1 is SPEC's `f[n,k]`).
    pub fn features(&mut self, progress: &mut dyn FnMut(usize)) -> Result<Array2<f32>> {
        let per = self.g.k * self.grid * self.grid;
        let mut out = Array2::<f32>::zeros((self.n, per));
        let dst = out.as_slice_mut().expect("standard layout");
        self.for_each_batch(|b| {
            self.cancel.check()?;
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.record_estep(&mut pass, b);
                let regions = (self.grid * self.grid) as u32;
                match self.encoding {
                    Encoding::Lse => {
                        pass.set_pipeline(&self.pipes.features);
                        pass.set_bind_group(0, &b.features, &[]);
                    }
                    Encoding::Triangle => {
                        pass.set_pipeline(&self.pipes.tri_mean);
                        pass.set_bind_group(0, &b.tri_mean, &[]);
                        pass.dispatch_workgroups(
                            self.g.positions().div_ceil(64) as u32,
                            b.n_images as u32,
                            1,
                        );
                        pass.set_pipeline(&self.pipes.features_tri);
                        pass.set_bind_group(0, &b.features_tri, &[]);
                    }
                }
                pass.dispatch_workgroups(self.g.k as u32, b.n_images as u32, regions);
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

/// `theta` `(K, R)` as the E-step reads it: transposed to `(R, KP)`, rows padded with zeros.
fn transpose_padded(g: &Geometry, theta: &[f32]) -> Vec<f32> {
    let kp = g.kpad();
    let mut t = vec![0f32; g.r() * kp];
    for k in 0..g.k {
        for r in 0..g.r() {
            t[r * kp + k] = theta[k * g.r() + r];
        }
    }
    t
}

impl Engine for GpuEngine {
    fn describe(&self) -> String {
        let base = if self.streamed() {
            format!(
                "GPU: {}; data streamed in batches of {}",
                self.ctx.describe(),
                self.max_batch
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
        self.n
    }

    fn epoch(&mut self, progress: &mut dyn FnMut(usize)) -> Result<EpochStats> {
        self.accumulate(progress)?;
        let [hi, lo, s, finite] = self.finish_epoch()?;
        let finite = finite == 1.0;
        if finite {
            self.commit_update();
            if !self.prior.is_uniform() {
                // The update wrote SPEC's theta_t and bias; the E-step wants the prior's.
                let theta = self.theta()?;
                self.write_effective(&theta);
            }
        }
        Ok(EpochStats {
            loglik: hi as f64 + lo as f64,
            count_sum: s as f64,
            finite,
        })
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
