//! Where work runs: the backend a user asks for, the engine for it, and features of a dataset.

use std::sync::Arc;

use ndarray::Array2;

use crate::cancel::CancelToken;
use crate::cpu::CpuEngine;
use crate::data::ImageSource;
use crate::engine::Engine;
use crate::error::Result;
use crate::features::{Encoding, Pooling};
use crate::geometry::Geometry;
use crate::gpu::{GpuBackend, GpuConfig, GpuContext, GpuEngine, GpuOptions};
use crate::prior::Prior;

/// Where a fit or the features run: a GPU API through wgpu, or the CPU engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// A hardware GPU if there is one, else the CPU engine
    #[default]
    Auto,
    /// A GPU through Vulkan.
    Vulkan,
    /// A GPU through Metal.
    Metal,
    /// A GPU through DirectX 12.
    Dx12,
    /// A GPU through OpenGL ES (wgpu's GL backend).
    Gl,
    /// The CPU engine (GEMM on all cores)
    Cpu,
}

impl Device {
    /// Every device, in the order `--help` lists them.
    pub const ALL: [Device; 6] = [
        Device::Auto,
        Device::Vulkan,
        Device::Metal,
        Device::Dx12,
        Device::Gl,
        Device::Cpu,
    ];

    /// The lowercase name (`auto`, `vulkan`, `metal`, `dx12`, `gl`, `cpu`).
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Vulkan => "vulkan",
            Device::Metal => "metal",
            Device::Dx12 => "dx12",
            Device::Gl => "gl",
            Device::Cpu => "cpu",
        }
    }

    /// The GPU backend this device asks for; `None` for the CPU engine.
    pub fn gpu(self) -> Option<GpuBackend> {
        match self {
            Device::Auto => Some(GpuBackend::Auto),
            Device::Vulkan => Some(GpuBackend::Vulkan),
            Device::Metal => Some(GpuBackend::Metal),
            Device::Dx12 => Some(GpuBackend::Dx12),
            Device::Gl => Some(GpuBackend::Gl),
            Device::Cpu => None,
        }
    }

    /// The GPU to use, or `None` for the CPU engine. `auto` takes a hardware GPU only (a software
    /// one such as lavapipe is far slower than the CPU engine); an explicit backend must exist.
    pub fn context(self) -> Result<Option<Arc<GpuContext>>> {
        self.context_with(&GpuConfig::default())
    }

    /// [`Device::context`] with the adapter, memory budget and checks of `gpu`.
    pub fn context_with(self, gpu: &GpuConfig) -> Result<Option<Arc<GpuContext>>> {
        Ok(match self {
            Device::Cpu => None,
            Device::Auto => GpuContext::open(GpuBackend::Auto, true, gpu)
                .ok()
                .map(Arc::new),
            b => Some(Arc::new(GpuContext::open(
                b.gpu().expect("a GPU backend"),
                false,
                gpu,
            )?)),
        })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    /// A name of [`Device::name`], in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        Device::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Device::ALL.iter().map(|d| d.name()).collect();
                format!("invalid device `{s}` (one of: {})", names.join(", "))
            })
    }
}

/// The EM engine for `backend` over `source`, starting from `theta`.
pub fn engine(
    backend: Device,
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: Vec<f32>,
    batch: usize,
) -> Result<Box<dyn Engine>> {
    engine_with(backend, &GpuConfig::default(), g, source, theta, batch)
}

/// [`engine`] with a GPU configured by `gpu`.
pub fn engine_with(
    backend: Device,
    gpu: &GpuConfig,
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: Vec<f32>,
    batch: usize,
) -> Result<Box<dyn Engine>> {
    Ok(match backend.context_with(gpu)? {
        Some(ctx) => Box::new(GpuEngine::new(
            ctx,
            g,
            source,
            &theta,
            GpuOptions::from_config(gpu, batch),
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
    backend: Device,
    g: Geometry,
    source: Arc<dyn ImageSource>,
    theta: &[f32],
    prior: &Prior,
    batch: usize,
    pooling: Pooling,
    gpu: &GpuConfig,
    cancel: &CancelToken,
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
    match backend.context_with(gpu)? {
        Some(ctx) => {
            let mut e = GpuEngine::new(
                ctx,
                g,
                source,
                theta,
                GpuOptions {
                    grid,
                    encoding,
                    cancel: cancel.clone(),
                    ..GpuOptions::from_config(gpu, batch)
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
            crate::cpu::fast::features(
                &g,
                source.as_ref(),
                &t,
                &b,
                batch,
                pooling,
                cancel,
                progress,
            )
        }
    }
}
