//! The GPU engine's memory plan: how many images a batch holds, whether the dataset stays
//! resident or streams, which buffer each batch reads, and what all of it costs in device
//! memory. Decided from the adapter's limits before anything is allocated, so an impossible run
//! is refused with the numbers that make it so; no GPU is needed to compute it.

use super::kernels::{Tiles, UBO_FLOATS, Variant, ubo_rows};
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;

/// Batch-sized device buffers that a dataset larger than the memory budget streams through:
/// one being read by the kernels while the next is written.
pub const STREAM_SLOTS: usize = 2;

/// What the plan is made for: the adapter's limits and budget, and the caller's wishes.
pub struct PlanInput<'a> {
    /// The device's limits.
    pub limits: &'a wgpu::Limits,
    /// The adapter's name, for messages.
    pub adapter: &'a str,
    /// Device memory to plan within, and where that number comes from (for messages).
    pub budget: Option<(u64, &'a str)>,
    /// Pretend storage bindings and buffers can hold at most this many bytes.
    pub binding_cap: Option<u64>,
    /// The largest batch the caller wants.
    pub batch: usize,
    /// Stream even where the dataset would fit.
    pub stream: bool,
    /// Pooling regions per axis of the features (at least 1).
    pub grid: usize,
    /// Whether the features use the triangle encoding (its norms and means buffer).
    pub triangle: bool,
    /// The implementation of the GEMM kernels.
    pub variant: Variant,
    /// The GEMM kernels' tiles.
    pub tiles: Tiles,
}

/// One batch: `n_images` images from dataset image `first`, read from `x` buffer `x` at image
/// `offset` in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRange {
    /// Which `x` buffer holds the batch.
    pub x: usize,
    /// Its first image's index in that buffer.
    pub offset: usize,
    /// Its first image's index in the dataset.
    pub first: usize,
    /// Images in the batch.
    pub n_images: usize,
}

/// The plan: every size the engine allocates follows from it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Images in the dataset.
    pub n: usize,
    /// The largest batch.
    pub max_batch: usize,
    /// True when the data streams through [`STREAM_SLOTS`] batch-sized buffers.
    pub stream: bool,
    /// Images each `x` buffer holds: the dataset's pieces, or the streaming slots.
    pub x_buffers: Vec<usize>,
    /// The batches of an epoch, in order.
    pub batches: Vec<BatchRange>,
    /// Images per M-step chunk (each chunk writes its own partial sums).
    pub images_per_chunk: usize,
    /// Whether the posteriors go through the `G` buffer and the posterior pass (all but the
    /// staged M-step with [`Tiles::m_fused`], which computes them while loading).
    pub uses_g: bool,
    /// Rows of a uniform-buffer kernel's window ([`ubo_rows`]); 0 for the other variants.
    pub window_rows: usize,
    /// Zeros after the patch offset table: the M-step's tile loads read up to a column tile
    /// past R.
    pub offset_pad: usize,
    /// Pooling regions per axis of the features.
    pub grid: usize,
    /// Whether the features use the triangle encoding.
    pub triangle: bool,
    /// Whether the engine holds a value pair per patch of a batch (`pm`, `(batch, P, 2)`): the
    /// triangle features' norms and means, or the moments of contrast-normalised patches.
    pub per_patch: bool,
    /// Bytes of device memory planned, the data included.
    pub bytes: u64,
}

impl MemoryPlan {
    /// The plan for `n` images of `g`'s shape. Errors: one image does not fit a binding, or the
    /// budget cannot hold even a batch of one.
    pub fn new(g: &Geometry, n: usize, input: &PlanInput) -> Result<Self> {
        let (variant, tiles) = (input.variant, &input.tiles);
        let uniform = variant == Variant::Uniform;
        let window_rows = if uniform {
            ubo_rows(g.kpad(), tiles.u_tn)
        } else {
            0
        };
        let uses_g = !(variant.mstep() == Variant::Staged && tiles.m_fused);
        let offset_pad = (tiles.m_tr() as usize).max(1100);
        let limits = input.limits;
        let (k, r, p) = (g.k as u64, g.r() as u64, g.positions() as u64);
        let kp = g.kpad() as u64;
        let mut cap = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(c) = input.binding_cap {
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
            .min(limits.max_buffer_size.saturating_sub(g_tail) / (kp * p * 4))
            as usize;
        let by_partials = (cap / stat_bytes) as usize * ipc;
        // Positions per E-step workgroup, for the 65,535-workgroup limit.
        let tm = variant.estep_positions(tiles);
        let by_dispatch = (65535usize * tm / g.positions()).min(65535);
        let mut max_batch = input
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
                input.adapter,
                cap >> 20,
                g.k,
                g.ho,
                g.wo
            )));
        }

        // Everything but the data scales with the batch; the data is either all resident or
        // `STREAM_SLOTS` batches. The uniform-buffer kernels' `Window` uniforms, 256 bytes each
        // at the most, for every batch: the E-step's windows and the M-step's, about
        // n * P / rows in all.
        let windows = |mb: usize| -> u64 {
            if !uniform {
                return 0;
            }
            let batches = n.div_ceil(mb.max(1)) as u64;
            let e_windows = g.r().div_ceil(window_rows) as u64;
            256 * ((n as u64 * p).div_ceil(window_rows as u64) + batches * (e_windows + 1))
        };
        let grid = input.grid.max(1) as u64;
        let per_patch = input.triangle || g.patch_norm.is_some();
        let fixed = |mb: usize| -> u64 {
            let mb64 = mb as u64;
            let chunks = mb64.div_ceil(ipc as u64);
            // theta, theta_next; theta_t, theta_t_next; bias, bias_next, counts, counts_next, bad
            2 * k * r * 4 + 2 * r * kp * 4 + 5 * k * 4
                + if uses_g { mb64 * p * kp * 4 } else { 0 } // G
                + mb64 * k * p * 4 // L
                + mb64 * k * grid * grid * 4 // features
                + if per_patch { mb64 * p * 2 * 4 } else { 0 } // triangle's norms and means, or moments
                + if g.patch_norm.is_some() { k * 4 } else { 0 } // the kernels' sums
                + (2 + chunks) * stat_bytes // t_acc, t_comp, partials
                + n as u64 * 4 // logp_all
                + (r + offset_pad as u64 + p + 128) * 4 + 16 // offsets, summary
                + if uniform { 3 * UBO_FLOATS as u64 * 4 } else { 0 } // 64 KiB window tails
                + windows(mb)
        };
        let mut stream = input.stream;
        let resident = |mb: usize| fixed(mb) + n as u64 * img_bytes;
        let streamed = |mb: usize| fixed(mb) + (STREAM_SLOTS * mb) as u64 * img_bytes;
        if let Some((b, source)) = input.budget {
            if !stream && resident(max_batch) > b {
                stream = true;
            }
            if stream {
                while max_batch > 1 && streamed(max_batch) > b {
                    max_batch = max_batch * 3 / 4;
                }
                if streamed(max_batch) > b {
                    return Err(CalmError::GpuMemory(format!(
                        "{} needs at least {} MiB of device memory for K={}, {}x{} positions and {} images, but plans within {} MiB ({source}); use a smaller K or kernel, or fewer images",
                        input.adapter,
                        streamed(1).div_ceil(1 << 20),
                        g.k,
                        g.ho,
                        g.wo,
                        n,
                        b >> 20,
                    )));
                }
            }
        }

        let (x_buffers, batches) = layout(n, max_batch, per_x_buffer, stream);
        Ok(Self {
            n,
            bytes: if stream {
                streamed(max_batch)
            } else {
                resident(max_batch)
            },
            max_batch,
            stream,
            x_buffers,
            batches,
            images_per_chunk: ipc,
            uses_g,
            window_rows,
            offset_pad,
            grid: input.grid.max(1),
            triangle: input.triangle,
            per_patch,
        })
    }

    /// The M-step's partial sums for a batch of `nb` images: a chunk of
    /// [`MemoryPlan::images_per_chunk`] images each, and for the uniform-buffer kernels at
    /// most one per M-step window (every partial sum gets at least one window).
    pub fn n_chunks(&self, g: &Geometry, nb: usize) -> u32 {
        let mut n_chunks = nb.div_ceil(self.images_per_chunk);
        if self.window_rows > 0 {
            n_chunks = n_chunks.min((nb * g.positions()).div_ceil(self.window_rows));
        }
        n_chunks as u32
    }

    /// The most partial sums any batch writes.
    pub fn max_chunks(&self) -> u64 {
        self.max_batch.div_ceil(self.images_per_chunk) as u64
    }
}

/// Which buffer holds each image and which images each batch takes: `stream`ed, batches of
/// `max_batch` cycle through the [`STREAM_SLOTS`]; resident, buffers of up to `per_x_buffer`
/// whole images, batches never straddling two.
fn layout(
    n: usize,
    max_batch: usize,
    per_x_buffer: usize,
    stream: bool,
) -> (Vec<usize>, Vec<BatchRange>) {
    if stream {
        let n_batches = n.div_ceil(max_batch);
        let slots = STREAM_SLOTS.min(n_batches);
        let batches = (0..n_batches)
            .map(|i| BatchRange {
                x: i % slots,
                offset: 0,
                first: i * max_batch,
                n_images: max_batch.min(n - i * max_batch),
            })
            .collect();
        (vec![max_batch; slots], batches)
    } else {
        // Resident buffers of whole images; batches never straddle two of them.
        let (mut x_buffers, mut batches) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let count = per_x_buffer.min(n - start);
            let mut s = 0;
            while s < count {
                let nb = max_batch.min(count - s);
                batches.push(BatchRange {
                    x: x_buffers.len(),
                    offset: s,
                    first: start + s,
                    n_images: nb,
                });
                s += nb;
            }
            x_buffers.push(count);
            start += count;
        }
        (x_buffers, batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::LayerConfig;

    fn mnist() -> Geometry {
        let layer = LayerConfig {
            kernels: 64,
            width: 20,
            pad: 2,
        };
        Geometry::new(layer, 1, 28, 28).unwrap()
    }

    fn input(limits: &wgpu::Limits, budget: Option<u64>, batch: usize) -> PlanInput<'_> {
        PlanInput {
            limits,
            adapter: "test adapter",
            budget: budget.map(|b| (b, "a test budget")),
            binding_cap: None,
            batch,
            stream: false,
            grid: 1,
            triangle: false,
            variant: Variant::Staged,
            tiles: Tiles::default(),
        }
    }

    #[test]
    fn batches_cover_every_image_once_in_order() {
        let limits = wgpu::Limits::default();
        let g = mnist();
        for (n, batch, cap) in [
            (1000, 300, None),
            (1000, 1000, Some(300 * 1024 * 4)),
            (7, 2, None),
        ] {
            let mut i = input(&limits, None, batch);
            i.binding_cap = cap;
            let plan = MemoryPlan::new(&g, n, &i).unwrap();
            let mut next = 0;
            for b in &plan.batches {
                assert_eq!(b.first, next);
                assert!(b.n_images >= 1 && b.n_images <= plan.max_batch);
                assert!(b.offset + b.n_images <= plan.x_buffers[b.x]);
                next += b.n_images;
            }
            assert_eq!(next, n);
            assert_eq!(
                plan.x_buffers.iter().sum::<usize>(),
                n,
                "resident: every image once"
            );
        }
    }

    #[test]
    fn a_budget_below_the_dataset_streams_and_shrinks_the_batch() {
        let limits = wgpu::Limits::default();
        let g = mnist();
        let resident = MemoryPlan::new(&g, 60_000, &input(&limits, None, 1000)).unwrap();
        assert!(!resident.stream);
        let budget = resident.bytes / 4;
        let plan = MemoryPlan::new(&g, 60_000, &input(&limits, Some(budget), 1000)).unwrap();
        assert!(plan.stream);
        assert!(
            plan.bytes <= budget,
            "{} planned within {budget}",
            plan.bytes
        );
        assert_eq!(plan.x_buffers, vec![plan.max_batch; STREAM_SLOTS]);
        let tiny = MemoryPlan::new(&g, 60_000, &input(&limits, Some(1 << 19), 1000));
        let e = tiny.unwrap_err().to_string();
        assert!(
            e.contains("needs at least") && e.contains("a test budget"),
            "{e}"
        );
    }
}
