//! The device buffers of one engine, allocated to its [`MemoryPlan`], and the helpers that make
//! buffers and bind groups.

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use super::kernels::{Params, UBO_FLOATS, Variant};
use super::plan::MemoryPlan;
use crate::data::ImageSource;
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;

/// Storage buffers; the ones the uniform-buffer kernels read in windows are also UNIFORM.
pub const RW: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);
/// [`RW`] and UNIFORM: the buffers the uniform-buffer kernels bind in 64 KiB windows.
pub const RW_UNIFORM: wgpu::BufferUsages = RW.union(wgpu::BufferUsages::UNIFORM);

/// A device buffer of `bytes` bytes (at least 4) with `usage`, labelled `label`.
pub fn storage_as(
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

/// [`storage_as`] with [`RW`] usage.
pub fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    storage_as(ctx, label, bytes, RW)
}

/// A device buffer holding `data`, with `usage`, labelled `label`.
pub fn init_as(
    ctx: &GpuContext,
    label: &str,
    data: &[u8],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage,
        })
}

/// [`init_as`] with [`RW`] usage.
pub fn init(ctx: &GpuContext, label: &str, data: &[u8]) -> wgpu::Buffer {
    init_as(ctx, label, data, RW)
}

/// A binding of `size` bytes of `buffer` from `offset`.
pub fn part(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: std::num::NonZeroU64::new(size),
    })
}

/// Binds `parts` in binding order.
pub fn bind_parts(
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
pub fn bind(
    ctx: &GpuContext,
    pipe: &wgpu::ComputePipeline,
    bufs: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    bind_parts(
        ctx,
        pipe,
        bufs.iter().map(|b| b.as_entire_binding()).collect(),
    )
}

/// The largest pixel magnitude `variant`'s kernels take: f16's range for the tensor-core
/// E-step's splits ([`crate::cpu::coop::MAX_OPERAND`]), else any finite value.
pub fn pixel_bound(variant: Variant) -> f32 {
    match variant {
        Variant::Coop => crate::cpu::coop::MAX_OPERAND,
        _ => f32::MAX,
    }
}

/// Images `start .. start + count` of `source`, checked finite and within `bound`
/// ([`pixel_bound`]) and zero-padded (`host` is scratch space, reused).
pub fn read_padded(
    g: &Geometry,
    source: &dyn ImageSource,
    start: usize,
    count: usize,
    host: &mut Vec<f32>,
    bound: f32,
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
    if let Some(i) = host.iter().position(|v| v.abs() > bound) {
        return Err(CalmError::Invalid(format!(
            "image {} holds {}, beyond the {bound} the tensor-core kernels take (f16's range); scale the data or choose the FP32 kernels (CALM_KERNELS=staged)",
            start + i / per,
            host[i]
        )));
    }
    Ok(g.pad_images(host, count))
}

/// `theta` `(K, R)` as the E-step reads it: transposed to `(R, KP)`, rows padded with zeros.
pub fn transpose_padded(g: &Geometry, theta: &[f32]) -> Vec<f32> {
    let kp = g.kpad();
    let mut t = vec![0f32; g.r() * kp];
    for k in 0..g.k {
        for r in 0..g.r() {
            t[r * kp + k] = theta[k * g.r() + r];
        }
    }
    t
}

/// `sum_r theta[k, r]` of each kernel where the layer contrast-normalises its patches
/// (`norm_estep.wgsl`), else a single 0.
pub fn kernel_sums(g: &Geometry, theta: &[f32]) -> Vec<f32> {
    match g.patch_norm {
        Some(_) => theta.chunks_exact(g.r()).map(|t| t.iter().sum()).collect(),
        None => vec![0.0],
    }
}

/// Every buffer that lives for the whole run.
pub struct Resident {
    /// `theta` `(K, R)` of the epoch in progress.
    pub theta: wgpu::Buffer,
    /// The E-step's weights transposed to `(R, KP)`: `theta`, or its effective form under a
    /// prior ([`crate::prior::Prior::effective`]); zero rows after it for the uniform-buffer
    /// kernels.
    pub theta_t: wgpu::Buffer,
    /// The update's `theta` transposed, `(R, KP)`.
    pub theta_t_next: wgpu::Buffer,
    /// A batch's posteriors `G`, `(batch, P, KP)`; 16 unused bytes where the M-step forms them
    /// itself.
    pub gpost: wgpu::Buffer,
    /// The E-step's bias `(K)`: SPEC's `-0.5 ||theta_k||^2`, or its effective form under a prior.
    pub bias: wgpu::Buffer,
    /// The update's weights `(K, R)`, copied over `theta` when the epoch was finite.
    pub theta_next: wgpu::Buffer,
    /// The update's bias, `(K)`.
    pub bias_next: wgpu::Buffer,
    /// `B'` of the last applied update, `(K)`.
    pub counts: wgpu::Buffer,
    /// The update's `B'`, `(K)`.
    pub counts_next: wgpu::Buffer,
    /// A batch's `L`, `(batch, K, P)`.
    pub l: wgpu::Buffer,
    /// `logp` of every image of the epoch, `(N)`.
    pub logp_all: wgpu::Buffer,
    /// The epoch's statistics `(K, R + 1)`, column R holding B, summed compensated: the true sum
    /// is `t_acc - t_comp`.
    pub t_acc: wgpu::Buffer,
    /// The rounding error carried by `t_acc`'s compensated (Kahan) sum, `(K, R + 1)`.
    pub t_comp: wgpu::Buffer,
    /// `[LL hi, LL lo, S, finite]` of the last epoch.
    pub summary: wgpu::Buffer,
    /// A batch's features, `(batch, K, grid * grid)`.
    pub f: wgpu::Buffer,
    /// Triangle features: `||x_u||^2` and the mean distance per patch; contrast-normalised
    /// patches: each patch's mean and `1 / s` (`norm_estep.wgsl`); `(batch, P, 2)`.
    pub pm: wgpu::Buffer,
    /// Contrast-normalised patches: `sum_r theta_t[r, k]`, `(K)` (written with `theta_t`).
    pub ksum: wgpu::Buffer,
    /// The patch offset table ([`Geometry::patch_offsets`], zero-padded).
    pub off: wgpu::Buffer,
    /// The positions' offsets ([`Geometry::position_offsets`]), 128 zeros after them.
    pub pos: wgpu::Buffer,
    /// The M-step's partial sums, a chunk's each.
    pub partials: wgpu::Buffer,
    /// Kernels the update found degenerate.
    pub bad: wgpu::Buffer,
    /// Each batch's [`Params`] (a uniform).
    pub params: Vec<wgpu::Buffer>,
    /// The dataset's [`Params`], for the per-epoch kernels.
    pub params_global: wgpu::Buffer,
    /// The padded dataset (resident), or the batch-sized slots it streams through.
    pub x: Vec<wgpu::Buffer>,
}

impl Resident {
    /// Allocates the plan's buffers, uploads `theta` and (unless the plan streams) the padded
    /// dataset. With the uniform-buffer kernels ([`Variant::Uniform`]) their 64 KiB windows need
    /// zero tails after `theta_t`, `G` and the offset table; the tensor-core kernels take pixels
    /// within f16's range only ([`pixel_bound`]).
    pub fn allocate(
        ctx: &GpuContext,
        g: &Geometry,
        plan: &MemoryPlan,
        theta: &[f32],
        source: &dyn ImageSource,
        variant: Variant,
    ) -> Result<Self> {
        let uniform = variant == Variant::Uniform;
        let (k, r, p) = (g.k as u64, g.r() as u64, g.positions() as u64);
        let kp = g.kpad() as u64;
        let img_bytes = g.padded_len() as u64 * 4;
        let stat_bytes = k * (r + 1) * 4;
        let mb = plan.max_batch as u64;
        let ubo_tail = if uniform { UBO_FLOATS as u64 * 4 } else { 0 };
        let x = if plan.stream {
            plan.x_buffers
                .iter()
                .map(|&count| storage(ctx, "x-slot", count as u64 * img_bytes))
                .collect()
        } else {
            upload_dataset(ctx, g, plan, source, pixel_bound(variant))?
        };
        let mut off: Vec<u32> = g
            .patch_offsets()
            .map(|o| o as u32)
            // Zeros past R and P: the M-step's tile loads read them (in bounds, value unused)
            // instead of branching per element, up to a whole column tile past R.
            .chain(std::iter::repeat_n(0, plan.offset_pad))
            .collect();
        // The uniform-buffer E-step reads the table as one 64 KiB uniform binding.
        if uniform {
            off.resize(off.len().max(UBO_FLOATS), 0);
        }
        let pos: Vec<u32> = g
            .position_offsets()
            .map(|o| o as u32)
            .chain(std::iter::repeat_n(0, 128))
            .collect();
        let theta_t = {
            let mut t = transpose_padded(g, theta);
            if uniform {
                // Zero rows after theta_t so that the last window's 64 KiB binding fits.
                let last = (g.r() - 1) / plan.window_rows * plan.window_rows;
                t.resize(t.len().max(last * g.kpad() + UBO_FLOATS), 0.0);
            }
            init_as(ctx, "theta_t", bytemuck::cast_slice(&t), RW_UNIFORM)
        };
        let base = Params {
            k: g.k as u32,
            r: g.r() as u32,
            positions: g.positions() as u32,
            wo: g.wo as u32,
            wp: g.wp as u32,
            img_stride: g.padded_len() as u32,
            imgs_per_chunk: plan.images_per_chunk as u32,
            n_total: plan.n as u32,
            grid: plan.grid as u32,
            norm_eps: g.patch_norm.unwrap_or(0.0),
            ..Default::default()
        };
        let params = plan
            .batches
            .iter()
            .map(|b| {
                let prm = Params {
                    n_images: b.n_images as u32,
                    x_offset: b.offset as u32,
                    logp_offset: b.first as u32,
                    n_chunks: plan.n_chunks(g, b.n_images),
                    ..base
                };
                uniform_init(ctx, "params", &prm)
            })
            .collect();
        let grid = plan.grid as u64;
        Ok(Self {
            theta: init(ctx, "theta", bytemuck::cast_slice(theta)),
            theta_t,
            theta_t_next: storage(ctx, "theta_t_next", r * kp * 4),
            gpost: storage_as(
                ctx,
                "G",
                if plan.uses_g {
                    mb * p * kp * 4 + ubo_tail
                } else {
                    16 // bound nowhere
                },
                RW_UNIFORM,
            ),
            bias: init(ctx, "bias", bytemuck::cast_slice(&g.bias_f32(theta))),
            theta_next: storage(ctx, "theta_next", k * r * 4),
            bias_next: storage(ctx, "bias_next", k * 4),
            counts: storage(ctx, "counts", k * 4),
            counts_next: storage(ctx, "counts_next", k * 4),
            l: storage(ctx, "L", mb * k * p * 4),
            logp_all: storage(ctx, "logp_all", plan.n as u64 * 4),
            t_acc: storage(ctx, "t_acc", stat_bytes),
            t_comp: storage(ctx, "t_comp", stat_bytes),
            summary: storage(ctx, "summary", 16),
            f: storage(ctx, "features", mb * k * grid * grid * 4),
            pm: storage(
                ctx,
                "per-patch",
                if plan.per_patch { mb * p * 2 * 4 } else { 4 },
            ),
            ksum: init(ctx, "ksum", bytemuck::cast_slice(&kernel_sums(g, theta))),
            off: init_as(ctx, "off", bytemuck::cast_slice(&off), RW_UNIFORM),
            pos: init(ctx, "pos_off", bytemuck::cast_slice(&pos)),
            partials: storage(ctx, "partials", plan.max_chunks() * stat_bytes),
            bad: storage(ctx, "bad", k * 4),
            params,
            params_global: uniform_init(ctx, "params-global", &base),
            x,
        })
    }

    /// Bytes of every buffer allocated on the device.
    pub fn bytes(&self) -> u64 {
        [
            &self.theta,
            &self.theta_t,
            &self.theta_t_next,
            &self.gpost,
            &self.bias,
            &self.theta_next,
            &self.bias_next,
            &self.counts,
            &self.counts_next,
            &self.l,
            &self.logp_all,
            &self.t_acc,
            &self.t_comp,
            &self.summary,
            &self.f,
            &self.pm,
            &self.ksum,
            &self.off,
            &self.pos,
            &self.partials,
            &self.bad,
        ]
        .into_iter()
        .chain(self.x.iter())
        .chain(self.params.iter())
        .chain([&self.params_global])
        .map(|b| b.size())
        .sum()
    }
}

fn uniform_init(ctx: &GpuContext, label: &str, prm: &Params) -> wgpu::Buffer {
    init_as(
        ctx,
        label,
        bytemuck::bytes_of(prm),
        wgpu::BufferUsages::UNIFORM,
    )
}

/// The padded dataset in the plan's resident buffers, uploaded in pieces of about 64 MiB.
fn upload_dataset(
    ctx: &GpuContext,
    g: &Geometry,
    plan: &MemoryPlan,
    source: &dyn ImageSource,
    bound: f32,
) -> Result<Vec<wgpu::Buffer>> {
    let img_bytes = g.padded_len() as u64 * 4;
    let piece = ((64 << 20) / img_bytes as usize).max(1);
    let mut host = Vec::new();
    let mut start = 0;
    let mut bufs = Vec::new();
    for &count in &plan.x_buffers {
        let buf = storage(ctx, "x", count as u64 * img_bytes);
        let mut done = 0;
        while done < count {
            let m = piece.min(count - done);
            let padded = read_padded(g, source, start + done, m, &mut host, bound)?;
            ctx.queue
                .write_buffer(&buf, done as u64 * img_bytes, bytemuck::cast_slice(&padded));
            // Flush the staging memory now and then so a large upload stays bounded.
            ctx.queue.submit([]);
            done += m;
        }
        bufs.push(buf);
        start += count;
    }
    Ok(bufs)
}
