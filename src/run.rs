//! Where work runs: the backend a user asks for, the engine for it, and features of a dataset.

use std::sync::Arc;

use ndarray::Array2;

use crate::cpu::CpuEngine;
use crate::data::ImageSource;
use crate::engine::Engine;
use crate::error::Result;
use crate::features::{Encoding, Pooling};
use crate::geometry::Geometry;
use crate::gpu::{GpuBackend, GpuContext, GpuEngine, GpuOptions};
use crate::prior::Prior;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A hardware GPU if there is one, else the CPU engine
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// The CPU engine (GEMM on all cores)
    Cpu,
}

impl Backend {
    pub fn gpu(self) -> Option<GpuBackend> {
        match self {
            Backend::Auto => Some(GpuBackend::Auto),
            Backend::Vulkan => Some(GpuBackend::Vulkan),
            Backend::Metal => Some(GpuBackend::Metal),
            Backend::Dx12 => Some(GpuBackend::Dx12),
            Backend::Gl => Some(GpuBackend::Gl),
            Backend::Cpu => None,
        }
    }

    /// The GPU to use, or `None` for the CPU engine. `auto` takes a hardware GPU only (a software
    /// one such as lavapipe is far slower than the CPU engine); an explicit backend must exist.
    pub fn context(self) -> Result<Option<Arc<GpuContext>>> {
        Ok(match self {
            Backend::Cpu => None,
            Backend::Auto => GpuContext::new(GpuBackend::Auto, true).ok().map(Arc::new),
            b => Some(Arc::new(GpuContext::new(
                b.gpu().expect("a GPU backend"),
                false,
            )?)),
        })
    }
}

/// The EM engine for `backend` over `source`, starting from `theta`.
pub fn engine(
    backend: Backend,
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: Vec<f32>,
    batch: usize,
) -> Result<Box<dyn Engine>> {
    Ok(match backend.context()? {
        Some(ctx) => Box::new(GpuEngine::new(
            ctx,
            g,
            source,
            &theta,
            GpuOptions {
                batch,
                ..Default::default()
            },
        )?),
        None => {
            crate::cpu::fast::check_host_memory(&g, batch)?;
            Box::new(CpuEngine::new(g, source, theta, batch))
        }
    })
}

/// Features of every image: `f[n,k] = logsumexp over (h,w) of L[n,k,h,w]` for `grid = 1` and
/// [`Encoding::Lse`] (SPEC's), else the encoding pooled over each of `grid x grid` regions,
/// `(N, K * grid * grid)`. `L` is the layer's under `prior` (its mixing weights and variance);
/// the triangle encoding uses the distances `||x_u - theta_k||` alone and ignores the prior.
#[allow(clippy::too_many_arguments)]
pub fn features(
    backend: Backend,
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: &[f32],
    prior: &Prior,
    batch: usize,
    pooling: Pooling,
    progress: &mut dyn FnMut(usize),
) -> Result<Array2<f32>> {
    let (grid, encoding) = (pooling.grid.max(1), pooling.encoding);
    g.check_pool_grid(grid)?;
    let uniform = Prior::uniform(g.k);
    let prior = if encoding == Encoding::Lse {
        prior
    } else {
        &uniform
    };
    match backend.context()? {
        Some(ctx) => {
            let mut e = GpuEngine::new(
                ctx,
                g,
                source,
                theta,
                GpuOptions {
                    batch,
                    grid,
                    encoding,
                    ..Default::default()
                },
            )?;
            if !prior.is_uniform() {
                e.set_prior(prior)?;
            }
            e.features(progress)
        }
        None => {
            let (t, b) = prior.effective(&g, theta);
            // Features hold no T: a batch of 1 counts the chunk buffers and a single T.
            crate::cpu::fast::check_host_memory(&g, 1)?;
            crate::cpu::fast::features(&g, source.as_ref(), &t, &b, batch, pooling, progress)
        }
    }
}
