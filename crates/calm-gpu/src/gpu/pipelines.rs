//! The compute pipelines of an engine: each kernel's WGSL generated for the tiles
//! ([`super::codegen`]) and built once per device ([`GpuContext::pipeline`] keeps them).

use super::codegen::{coop_estep_source, source};
use super::kernels::{
    ESTEP, ESTEP_DIRECT, ESTEP_UBO, FEATURES, FEATURES_TRI, LOGSUMEXP, MSTEP, MSTEP_DIRECT,
    MSTEP_UBO, NORM_CORRECT, NORM_ESTEP, NORM_SHIFT, POSTERIOR, REDUCE_STATS, SUMMARY, TRI_MEAN,
    Tiles, UPDATE, Variant,
};
use crate::error::{CalmError, Result};
use crate::gpu::GpuContext;

/// The compute pipelines of one engine: the GEMM kernels of its [`Variant`] and the others.
pub struct Pipelines {
    /// The implementation of the two GEMM kernels.
    pub variant: Variant,
    /// The E-step, `L` of a batch.
    pub estep: wgpu::ComputePipeline,
    /// A batch's posteriors `G` (unused where the staged M-step forms them itself).
    pub posterior: wgpu::ComputePipeline,
    /// A batch's `logp`.
    pub logsumexp: wgpu::ComputePipeline,
    /// The M-step, a batch's partial sums of `T` and `B`.
    pub mstep: wgpu::ComputePipeline,
    /// Adds a batch's partial sums to the epoch's statistics.
    pub reduce_stats: wgpu::ComputePipeline,
    /// The end-of-epoch update.
    pub update: wgpu::ComputePipeline,
    /// The epoch's `LL`, `S` and finiteness.
    pub summary: wgpu::ComputePipeline,
    /// Log-sum-exp features over each pooling region.
    pub features: wgpu::ComputePipeline,
    /// Triangle features, pass 1.
    pub tri_mean: wgpu::ComputePipeline,
    /// Triangle features, pass 2.
    pub features_tri: wgpu::ComputePipeline,
    /// The three passes of contrast-normalised patches, where the layer has them.
    pub norm: Option<NormPipelines>,
}

/// The passes that make the raw patches' E-step and M-step the contrast-normalised patches'
/// ([`crate::Geometry::patch_norm`]; `shaders/norm_*.wgsl`).
pub struct NormPipelines {
    /// Moments of every patch, `L` made the normalised patches'.
    pub estep: wgpu::ComputePipeline,
    /// `L` shifted by `log(1 / s)` for the M-step.
    pub shift: wgpu::ComputePipeline,
    /// The M-step's partial sums corrected.
    pub correct: wgpu::ComputePipeline,
}

/// Builds kernel `name` from `text`. naga's runtime checks (index clamping, loop bounding) are
/// left out of the two GEMM kernels unless `checks` ([`super::GpuConfig::checks`]): both guard
/// every tile edge explicitly, `validate` and the GPU-vs-CPU tests check them on every shape
/// class, and the checks (loop bounding above all) keep drivers from unrolling the register
/// block.
fn build(
    device: &wgpu::Device,
    name: &str,
    text: &str,
    checks: bool,
) -> Result<wgpu::ComputePipeline> {
    // A driver that fails to compile a pipeline reports an internal error; caught here, it is
    // this kernel's error (one line, and `calm-gpu tune` moves on to the next candidate)
    // instead of wgpu's uncaptured-error panic.
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(text.into()),
    };
    let module = if matches!(name, "estep" | "mstep" | "estep_ubo" | "mstep_ubo") && !checks {
        // SAFETY: these two kernels index only within bounds they check explicitly (tile edges
        // against K, R, P and the batch; offset tables padded by a tile; the last, partial share
        // of a stage's loads clamped by `prefetch`), and every loop has a uniform,
        // finite trip count; `validate` and tests/gpu_vs_cpu.rs run them on every shape class.
        unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
    } else {
        device.create_shader_module(desc)
    };
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        // Every kernel writes its workgroup memory before reading it.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(CalmError::Gpu(format!(
            "shader {name} failed to build: {e}"
        )));
    }
    if let Some(e) = pollster::block_on(internal.pop()) {
        return Err(CalmError::Gpu(format!(
            "the driver failed to build shader {name}: {e}"
        )));
    }
    Ok(pipeline)
}

impl Pipelines {
    /// The kernels for `tiles` and `variant` (and the normalisation's where `patch_norm`), from
    /// `ctx`'s pipelines where it has them.
    pub fn new(
        ctx: &GpuContext,
        tiles: &Tiles,
        variant: Variant,
        patch_norm: bool,
    ) -> Result<Self> {
        let checks = if ctx.gemm_checks { " checked" } else { "" };
        let b = |name: &str, kernel| {
            let text = source(kernel, tiles);
            ctx.pipeline((format!("{name}{checks}"), text.clone()), |device| {
                build(device, name, &text, ctx.gemm_checks)
            })
        };
        let (estep, mstep) = match variant {
            Variant::Staged => (b("estep", ESTEP)?, b("mstep", MSTEP)?),
            Variant::Direct => (
                b("estep_direct", ESTEP_DIRECT)?,
                b("mstep_direct", MSTEP_DIRECT)?,
            ),
            Variant::Uniform => (b("estep_ubo", ESTEP_UBO)?, b("mstep_ubo", MSTEP_UBO)?),
            Variant::Coop => {
                let Some(coop) = ctx.coop else {
                    return Err(CalmError::Gpu(format!(
                        "the tensor-core kernels do not run on {}: {}",
                        ctx.info.name,
                        ctx.coop_missing()
                    )));
                };
                coop.fits(&tiles.coop, &ctx.limits)
                    .map_err(CalmError::Gpu)?;
                let text = coop_estep_source(coop.subgroup, &tiles.coop);
                let estep = ctx.pipeline(("estep_coop".into(), text.clone()), |device| {
                    build(device, "estep_coop", &text, true)
                })?;
                (estep, b("mstep", MSTEP)?)
            }
        };
        Ok(Self {
            variant,
            estep,
            posterior: b("posterior", POSTERIOR)?,
            logsumexp: b("logsumexp", LOGSUMEXP)?,
            mstep,
            reduce_stats: b("reduce_stats", REDUCE_STATS)?,
            update: b("update", UPDATE)?,
            summary: b("summary", SUMMARY)?,
            features: b("features", FEATURES)?,
            tri_mean: b("tri_mean", TRI_MEAN)?,
            features_tri: b("features_tri", FEATURES_TRI)?,
            norm: match patch_norm {
                true => Some(NormPipelines {
                    estep: b("norm_estep", NORM_ESTEP)?,
                    shift: b("norm_shift", NORM_SHIFT)?,
                    correct: b("norm_correct", NORM_CORRECT)?,
                }),
                false => None,
            },
        })
    }
}
