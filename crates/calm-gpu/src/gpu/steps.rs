//! One struct per kernel: each owns its pipeline and its bind groups (built once, for every
//! batch of the [`MemoryPlan`]) and records its dispatches into a compute pass, in the manner of
//! wgpu's `repeated_compute` example. [`super::GpuEngine`] only sequences them:
//!
//! per batch `EStep` -> `LogSumExp` -> (`Posterior`) -> `MStep` -> `ReduceStats`;
//! per epoch `Update` -> `Summary`; for features `EStep` -> `Features`. A layer with
//! contrast-normalised patches adds the three passes of [`NormSteps`]: after `EStep`, after
//! `LogSumExp`, and after `MStep`.

use super::buffers::{Resident, bind, bind_parts, init_as, part};
use super::context::GpuContext;
use super::kernels::{Tiles, UBO_FLOATS, UBO_M_THREADS, Variant};
use super::pipelines::Pipelines;
use super::plan::MemoryPlan;
use crate::features::Encoding;
use crate::geometry::Geometry;

/// What every kernel is built from: the device, the shapes, the plan and its buffers, and the
/// kernels chosen.
pub struct Setup<'a> {
    /// The device.
    pub ctx: &'a GpuContext,
    /// The layer's shapes.
    pub g: &'a Geometry,
    /// The memory plan.
    pub plan: &'a MemoryPlan,
    /// The plan's buffers.
    pub buf: &'a Resident,
    /// The compiled kernels.
    pub pipes: &'a Pipelines,
    /// The GEMM kernels' tiles.
    pub tiles: &'a Tiles,
}

impl Setup<'_> {
    fn variant(&self) -> Variant {
        self.pipes.variant
    }

    /// Builds `per_batch(batch index, its x buffer)`'s dispatches for every batch.
    fn each_batch(
        &self,
        pipeline: &wgpu::ComputePipeline,
        mut per_batch: impl FnMut(usize, &wgpu::Buffer) -> Vec<(wgpu::BindGroup, [u32; 3])>,
    ) -> Recorded {
        let batches = self
            .plan
            .batches
            .iter()
            .enumerate()
            .map(|(i, b)| per_batch(i, &self.buf.x[b.x]))
            .collect();
        Recorded {
            pipeline: pipeline.clone(),
            batches,
        }
    }

    /// A kernel run once per epoch, not per batch: one bind group, one dispatch.
    fn once(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bufs: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Recorded {
        Recorded {
            pipeline: pipeline.clone(),
            batches: vec![vec![(bind(self.ctx, pipeline, bufs), workgroups)]],
        }
    }
}

/// A kernel's recorded work: its pipeline and, per batch, each dispatch's bind group and
/// workgroup counts.
struct Recorded {
    pipeline: wgpu::ComputePipeline,
    batches: Vec<Vec<(wgpu::BindGroup, [u32; 3])>>,
}

impl Recorded {
    fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        pass.set_pipeline(&self.pipeline);
        for (group, [x, y, z]) in &self.batches[batch] {
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(*x, *y, *z);
        }
    }
}

/// The uniform-buffer kernels' `Window` uniforms `(lo, rows, slot, first)`, each at the
/// adapter's uniform offset alignment: the buffer and a binding of window `i` in it.
struct Windows {
    buffer: wgpu::Buffer,
    stride: u64,
}

impl Windows {
    fn new(ctx: &GpuContext, windows: &[[u32; 4]]) -> Self {
        let stride = ctx.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let mut words = vec![0u32; windows.len().max(1) * stride / 4];
        for (i, w) in windows.iter().enumerate() {
            words[i * stride / 4..i * stride / 4 + 4].copy_from_slice(w);
        }
        let buffer = init_as(
            ctx,
            "windows",
            bytemuck::cast_slice(&words),
            wgpu::BufferUsages::UNIFORM,
        );
        Self {
            buffer,
            stride: stride as u64,
        }
    }

    fn window(&self, i: usize) -> wgpu::BindingResource<'_> {
        part(&self.buffer, i as u64 * self.stride, 16)
    }
}

/// 64 KiB: one window of a uniform-buffer kernel's shared operand.
const UBO_BYTES: u64 = UBO_FLOATS as u64 * 4;

/// `L = X theta^T + bias` for a batch (`estep*.wgsl`). The uniform-buffer kernel reads
/// `theta_t` in windows of [`MemoryPlan::window_rows`] rows, a dispatch each, the first writing
/// `L` and the others adding to it.
pub struct EStep(Recorded);

impl EStep {
    /// Builds the E-step's bind groups and dispatches for every batch.
    pub fn new(s: &Setup) -> Self {
        let (g, buf, tiles) = (s.g, s.buf, s.tiles);
        let tn = match s.variant() {
            Variant::Staged => tiles.e_tn() as usize,
            Variant::Direct => 8,
            Variant::Uniform => tiles.u_tn as usize,
            Variant::Coop => tiles.coop.tn() as usize,
        };
        let tm = s.variant().estep_positions(tiles);
        let y = g.k.div_ceil(tn) as u32;
        let workgroups = |i: usize| {
            let nb = s.plan.batches[i].n_images;
            [(nb * g.positions()).div_ceil(tm) as u32, y, 1]
        };
        let pipe = &s.pipes.estep;
        if s.variant() != Variant::Uniform {
            return Self(s.each_batch(pipe, |i, x| {
                let bufs = [&buf.params[i], x, &buf.theta_t, &buf.bias, &buf.off, &buf.l];
                vec![(bind(s.ctx, pipe, &bufs), workgroups(i))]
            }));
        }
        // The same windows of R for every batch.
        let rows = s.plan.window_rows;
        let w_count = g.r().div_ceil(rows);
        let windows = Windows::new(
            s.ctx,
            &(0..w_count)
                .map(|w| {
                    [
                        (w * rows) as u32,
                        rows.min(g.r() - w * rows) as u32,
                        0,
                        (w == 0) as u32,
                    ]
                })
                .collect::<Vec<_>>(),
        );
        let at = |w: usize| (w * rows * g.kpad() * 4) as u64;
        Self(s.each_batch(pipe, |i, x| {
            (0..w_count)
                .map(|w| {
                    let group = bind_parts(
                        s.ctx,
                        pipe,
                        vec![
                            buf.params[i].as_entire_binding(),
                            x.as_entire_binding(),
                            part(&buf.theta_t, at(w), UBO_BYTES),
                            buf.bias.as_entire_binding(),
                            part(&buf.off, 0, UBO_BYTES),
                            buf.l.as_entire_binding(),
                            windows.window(w),
                        ],
                    );
                    (group, workgroups(i))
                })
                .collect()
        }))
    }

    /// Records batch `batch`'s E-step into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.0.record(pass, batch)
    }
}

/// `logp[n] = logsumexp L[n]` of each image of a batch, into `logp_all` (`logsumexp.wgsl`).
pub struct LogSumExp(Recorded);

impl LogSumExp {
    /// Builds the log-sum-exp's bind groups for every batch.
    pub fn new(s: &Setup) -> Self {
        let (buf, pipe) = (s.buf, &s.pipes.logsumexp);
        Self(s.each_batch(pipe, |i, _| {
            let group = bind(s.ctx, pipe, &[&buf.params[i], &buf.l, &buf.logp_all]);
            vec![(group, [s.plan.batches[i].n_images as u32, 1, 1])]
        }))
    }

    /// Records batch `batch`'s log-sum-exp into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.0.record(pass, batch)
    }
}

/// The posteriors `G = exp(L - logp)` of a batch, `(n_images, P, KP)` (`posterior.wgsl`).
/// `None` where the staged M-step computes them itself ([`Tiles::m_fused`]).
pub struct Posterior(Recorded);

impl Posterior {
    /// Builds the posterior pass for every batch; `None` where the plan has no `G` buffer.
    pub fn new(s: &Setup) -> Option<Self> {
        if !s.plan.uses_g {
            return None;
        }
        let (g, buf, pipe) = (s.g, s.buf, &s.pipes.posterior);
        // Without the uniform-buffer kernels' tail.
        let g_bytes = (s.plan.max_batch * g.positions() * g.kpad() * 4) as u64;
        Some(Self(s.each_batch(pipe, |i, _| {
            let group = bind_parts(
                s.ctx,
                pipe,
                vec![
                    buf.params[i].as_entire_binding(),
                    buf.l.as_entire_binding(),
                    buf.logp_all.as_entire_binding(),
                    part(&buf.gpost, 0, g_bytes),
                ],
            );
            let workgroups = [
                g.positions().div_ceil(32) as u32,
                g.kpad().div_ceil(32) as u32,
                s.plan.batches[i].n_images as u32,
            ];
            vec![(group, workgroups)]
        })))
    }

    /// Records batch `batch`'s posteriors into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.0.record(pass, batch)
    }
}

/// A batch's statistics `T = G^T X` and `B`, in partial sums of a chunk of images each
/// (`mstep*.wgsl`). The uniform-buffer kernel reads `G` in windows of positions, a dispatch
/// each; the windows add to the batch's `n_chunks` partial sums in turn (window w to sum
/// `w * n_chunks / windows`), the first window of each sum writing it.
pub struct MStep(Recorded);

impl MStep {
    /// Builds the M-step's bind groups and dispatches for every batch.
    pub fn new(s: &Setup) -> Self {
        let (g, buf, tiles, plan) = (s.g, s.buf, s.tiles, s.plan);
        let pipe = &s.pipes.mstep;
        let n_chunks = |i: usize| plan.n_chunks(g, plan.batches[i].n_images);
        let kp = g.kpad();
        match s.variant().mstep() {
            Variant::Staged | Variant::Direct | Variant::Coop => {
                Self(s.each_batch(pipe, |i, x| {
                    // The staged M-step reads G, or (Tiles::m_fused) L and logp.
                    let g_src = if plan.uses_g { &buf.gpost } else { &buf.l };
                    let mut bufs =
                        vec![&buf.params[i], g_src, x, &buf.off, &buf.pos, &buf.partials];
                    if !plan.uses_g {
                        bufs.push(&buf.logp_all);
                    }
                    let workgroups = if s.variant().mstep() == Variant::Staged {
                        // R columns: B (column R of the partial sums) is summed by column tile 0.
                        [
                            g.r().div_ceil(tiles.m_tr() as usize) as u32,
                            g.k.div_ceil(tiles.m_tk() as usize) as u32,
                            n_chunks(i),
                        ]
                    } else {
                        let blocks = (g.r() + 1).div_ceil(8) * (kp / 8);
                        [blocks.div_ceil(64) as u32, 1, n_chunks(i)]
                    };
                    vec![(bind(s.ctx, pipe, &bufs), workgroups)]
                }))
            }
            Variant::Uniform => {
                let rows = plan.window_rows;
                // Every batch's windows, one after another.
                let mut all = Vec::new();
                let mut first_window = Vec::new();
                for (i, b) in plan.batches.iter().enumerate() {
                    first_window.push(all.len());
                    let tot = b.n_images * g.positions();
                    let count = tot.div_ceil(rows);
                    let slot = |w: usize| w * n_chunks(i) as usize / count;
                    for w in 0..count {
                        let first = w == 0 || slot(w) != slot(w - 1);
                        all.push([
                            (w * rows) as u32,
                            rows.min(tot - w * rows) as u32,
                            slot(w) as u32,
                            first as u32,
                        ]);
                    }
                }
                let windows = Windows::new(s.ctx, &all);
                let at = |w: usize| (w * rows * kp * 4) as u64;
                let per = UBO_M_THREADS * tiles.u_rr;
                let workgroups = [
                    (g.r() + 1).div_ceil(per as usize) as u32,
                    g.k.div_ceil(tiles.u_tn as usize) as u32,
                    1,
                ];
                Self(s.each_batch(pipe, |i, x| {
                    let count = (plan.batches[i].n_images * g.positions()).div_ceil(rows);
                    (0..count)
                        .map(|w| {
                            let group = bind_parts(
                                s.ctx,
                                pipe,
                                vec![
                                    buf.params[i].as_entire_binding(),
                                    part(&buf.gpost, at(w), UBO_BYTES),
                                    x.as_entire_binding(),
                                    buf.off.as_entire_binding(),
                                    buf.partials.as_entire_binding(),
                                    windows.window(first_window[i] + w),
                                ],
                            );
                            (group, workgroups)
                        })
                        .collect()
                }))
            }
        }
    }

    /// Records batch `batch`'s M-step into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.0.record(pass, batch)
    }
}

/// Adds a batch's partial sums to the epoch's statistics, compensated (`t_acc`, `t_comp`;
/// `reduce_stats.wgsl`).
pub struct ReduceStats(Recorded);

impl ReduceStats {
    /// Builds the reduction's bind groups for every batch.
    pub fn new(s: &Setup) -> Self {
        let (g, buf, pipe) = (s.g, s.buf, &s.pipes.reduce_stats);
        let groups = (g.k * (g.r() + 1)).div_ceil(256) as u32;
        Self(s.each_batch(pipe, |i, _| {
            let bufs = [&buf.params[i], &buf.partials, &buf.t_acc, &buf.t_comp];
            vec![(
                bind(s.ctx, pipe, &bufs),
                [groups.min(65535), groups.div_ceil(65535), 1],
            )]
        }))
    }

    /// Records the reduction of batch `batch`'s partial sums into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.0.record(pass, batch)
    }
}

/// The M-step's update from the epoch's statistics: `theta_next`, its transpose, `bias_next`,
/// `counts_next` and the degenerate kernels (`update.wgsl`).
pub struct Update(Recorded);

impl Update {
    /// Builds the update's bind group.
    pub fn new(s: &Setup) -> Self {
        let buf = s.buf;
        Self(s.once(
            &s.pipes.update,
            &[
                &buf.params_global,
                &buf.t_acc,
                &buf.t_comp,
                &buf.theta_next,
                &buf.bias_next,
                &buf.counts_next,
                &buf.bad,
                &buf.theta_t_next,
            ],
            [s.g.k as u32, 1, 1],
        ))
    }

    /// Records the update into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass) {
        self.0.record(pass, 0)
    }
}

/// The epoch's `[LL hi, LL lo, S, finite]` (`summary.wgsl`).
pub struct Summary(Recorded);

impl Summary {
    /// Builds the summary's bind group.
    pub fn new(s: &Setup) -> Self {
        let buf = s.buf;
        Self(s.once(
            &s.pipes.summary,
            &[
                &buf.params_global,
                &buf.logp_all,
                &buf.t_acc,
                &buf.t_comp,
                &buf.bad,
                &buf.summary,
            ],
            [1, 1, 1],
        ))
    }

    /// Records the summary into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass) {
        self.0.record(pass, 0)
    }
}

/// A batch's features from its `L`: the log-sum-exp over each pooling region
/// (`features.wgsl`), or the triangle encoding (`tri_mean.wgsl`, which needs the patches'
/// norms and mean distances, then `features_tri.wgsl`).
pub struct Features(Vec<Recorded>);

impl Features {
    /// Builds the feature kernels of `encoding` for every batch.
    pub fn new(s: &Setup, encoding: Encoding) -> Self {
        let (g, buf, plan) = (s.g, s.buf, s.plan);
        let regions = (plan.grid * plan.grid) as u32;
        let nb = |i: usize| plan.batches[i].n_images as u32;
        let pool = |pipe: &wgpu::ComputePipeline, triangle: bool| {
            s.each_batch(pipe, |i, _| {
                let bufs: &[&wgpu::Buffer] = if triangle {
                    &[&buf.params[i], &buf.l, &buf.pm, &buf.f]
                } else {
                    &[&buf.params[i], &buf.l, &buf.f]
                };
                vec![(bind(s.ctx, pipe, bufs), [g.k as u32, nb(i), regions])]
            })
        };
        match encoding {
            Encoding::Lse => Self(vec![pool(&s.pipes.features, false)]),
            Encoding::Triangle => {
                let pipe = &s.pipes.tri_mean;
                let mean = s.each_batch(pipe, |i, x| {
                    let bufs = [&buf.params[i], x, &buf.off, &buf.l, &buf.pm];
                    let workgroups = [g.positions().div_ceil(64) as u32, nb(i), 1];
                    vec![(bind(s.ctx, pipe, &bufs), workgroups)]
                });
                Self(vec![mean, pool(&s.pipes.features_tri, true)])
            }
        }
    }

    /// Records batch `batch`'s feature kernels into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        for kernel in &self.0 {
            kernel.record(pass, batch);
        }
    }
}

/// The three passes of contrast-normalised patches (`norm_*.wgsl`), around the raw patches'
/// kernels: after the E-step its `L` becomes the normalised patches' (and each patch's mean and
/// `1 / s` are kept in `pm`); after the log-sum-exp `L` is shifted by `log(1 / s)`, so that the
/// M-step sums `gamma x / s`; after the M-step its partial sums are corrected to
/// `sum gamma (x - m) / s` and `sum gamma`.
pub struct NormSteps {
    estep: Recorded,
    shift: Recorded,
    correct: Recorded,
}

impl NormSteps {
    /// Builds the three passes for every batch; `None` where the layer has raw patches.
    pub fn new(s: &Setup) -> Option<Self> {
        let pipes = s.pipes.norm.as_ref()?;
        let (g, buf, plan) = (s.g, s.buf, s.plan);
        let per_patch = |i: usize| {
            [
                g.positions().div_ceil(64) as u32,
                plan.batches[i].n_images as u32,
                1,
            ]
        };
        let estep = s.each_batch(&pipes.estep, |i, x| {
            let bufs = [
                &buf.params[i],
                x,
                &buf.off,
                &buf.ksum,
                &buf.bias,
                &buf.l,
                &buf.pm,
            ];
            vec![(bind(s.ctx, &pipes.estep, &bufs), per_patch(i))]
        });
        let shift = s.each_batch(&pipes.shift, |i, _| {
            let bufs = [&buf.params[i], &buf.pm, &buf.l];
            vec![(bind(s.ctx, &pipes.shift, &bufs), per_patch(i))]
        });
        let correct = s.each_batch(&pipes.correct, |i, _| {
            let bufs = [
                &buf.params[i],
                &buf.l,
                &buf.logp_all,
                &buf.pm,
                &buf.partials,
            ];
            let chunks = plan.n_chunks(g, plan.batches[i].n_images);
            vec![(bind(s.ctx, &pipes.correct, &bufs), [g.k as u32, chunks, 1])]
        });
        Some(Self {
            estep,
            shift,
            correct,
        })
    }

    /// Records batch `batch`'s pass after the E-step.
    pub fn record_estep(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.estep.record(pass, batch)
    }

    /// Records batch `batch`'s pass between the log-sum-exp and the M-step.
    pub fn record_shift(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.shift.record(pass, batch)
    }

    /// Records batch `batch`'s pass after the M-step.
    pub fn record_correct(&self, pass: &mut wgpu::ComputePass, batch: usize) {
        self.correct.record(pass, batch)
    }
}
