//! The compute pipelines: one WGSL file per kernel (in `shaders/`), built once per device.
//!
//! Shapes are never baked into the shader text: they travel in the `Params` uniform. Only the
//! register-tile sizes of the two GEMM kernels are substituted (`{{RM}}` etc.), because WGSL needs
//! them as constants to size private and workgroup arrays.

use crate::error::{CalmError, Result};

const PARAMS: &str = include_str!("../../shaders/params.wgsl");
pub const ESTEP: &str = include_str!("../../shaders/estep.wgsl");
pub const ESTEP_DIRECT: &str = include_str!("../../shaders/estep_direct.wgsl");
pub const POSTERIOR: &str = include_str!("../../shaders/posterior.wgsl");
pub const MSTEP_DIRECT: &str = include_str!("../../shaders/mstep_direct.wgsl");
pub const LOGSUMEXP: &str = include_str!("../../shaders/logsumexp.wgsl");
pub const MSTEP: &str = include_str!("../../shaders/mstep.wgsl");
pub const REDUCE_STATS: &str = include_str!("../../shaders/reduce_stats.wgsl");
pub const UPDATE: &str = include_str!("../../shaders/update.wgsl");
pub const SUMMARY: &str = include_str!("../../shaders/summary.wgsl");
pub const FEATURES: &str = include_str!("../../shaders/features.wgsl");

/// Every kernel with its name, for validation and tests.
pub const ALL: [(&str, &str); 10] = [
    ("estep", ESTEP),
    ("estep_direct", ESTEP_DIRECT),
    ("posterior", POSTERIOR),
    ("mstep_direct", MSTEP_DIRECT),
    ("logsumexp", LOGSUMEXP),
    ("mstep", MSTEP),
    ("reduce_stats", REDUCE_STATS),
    ("update", UPDATE),
    ("summary", SUMMARY),
    ("features", FEATURES),
];

/// Mirrors `struct Params` in `shaders/params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_images: u32,
    pub x_offset: u32,
    pub k: u32,
    pub r: u32,
    pub positions: u32,
    pub wo: u32,
    pub wp: u32,
    pub img_stride: u32,
    pub logp_offset: u32,
    pub imgs_per_chunk: u32,
    pub n_chunks: u32,
    pub n_total: u32,
}

/// Register-tile shape of the two GEMM kernels; each workgroup is 16 x 16 threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// E-step: positions per thread, kernels per thread, reduction slice.
    pub e_rm: u32,
    pub e_rn: u32,
    pub e_bk: u32,
    /// M-step: kernels per thread, columns per thread, reduction slice.
    pub m_rk: u32,
    pub m_rr: u32,
    pub m_bk: u32,
}

impl Default for Tiles {
    /// 128 x 64 E-step tiles and 64 x 64 M-step tiles of 16 stages: 12 KiB of workgroup memory
    /// each, inside WebGPU's portable 16 KiB.
    fn default() -> Self {
        Self {
            e_rm: 8,
            e_rn: 4,
            e_bk: 16,
            m_rk: 4,
            m_rr: 4,
            m_bk: 16,
        }
    }
}

impl Tiles {
    /// Workgroup memory the two GEMM kernels need, in bytes.
    pub fn workgroup_bytes(&self) -> (u32, u32) {
        let e = self.e_bk * 16 * (self.e_rm + self.e_rn) * 4 + 16 * self.e_rm * 4;
        let m = self.m_bk * 16 * (self.m_rk + self.m_rr) * 4;
        (e, m)
    }

    /// Parses `e=RMxRNxBK,m=RKxRRxBK` (the `CALM_TILES` variable, for tuning).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            CalmError::Invalid(format!(
                "tiles `{s}`: expected e=RMxRNxBK,m=RKxRRxBK, multiples of 4"
            ))
        };
        let mut t = Tiles::default();
        for part in s.split(',') {
            let (name, v) = part.split_once('=').ok_or_else(bad)?;
            let nums: Vec<u32> = v
                .split('x')
                .map(|n| n.trim().parse().map_err(|_| bad()))
                .collect::<Result<_>>()?;
            if nums.len() != 3
                || nums.iter().any(|&n| n == 0 || n > 64)
                || nums[0] % 4 != 0
                || nums[1] % 4 != 0
            {
                return Err(bad());
            }
            match name.trim() {
                "e" => (t.e_rm, t.e_rn, t.e_bk) = (nums[0], nums[1], nums[2]),
                "m" => (t.m_rk, t.m_rr, t.m_bk) = (nums[0], nums[1], nums[2]),
                _ => return Err(bad()),
            }
        }
        Ok(t)
    }
}

impl std::fmt::Display for Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "e={}x{}x{},m={}x{}x{}",
            self.e_rm, self.e_rn, self.e_bk, self.m_rk, self.m_rr, self.m_bk
        )
    }
}

/// The full WGSL text of a kernel: the shared `Params` header, then the kernel with its tile
/// constants substituted.
pub fn source(kernel: &str, tiles: &Tiles) -> String {
    let body = kernel
        .replace("{{RM}}", &tiles.e_rm.to_string())
        .replace("{{RN}}", &tiles.e_rn.to_string())
        .replace("{{RK}}", &tiles.m_rk.to_string())
        .replace("{{RR}}", &tiles.m_rr.to_string())
        .replace(
            "{{BK}}",
            &if kernel.contains("{{RM}}") {
                tiles.e_bk
            } else {
                tiles.m_bk
            }
            .to_string(),
        );
    format!("{PARAMS}\n{body}")
}

/// Which implementation of the two GEMM kernels to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Tiles staged through workgroup memory (`estep.wgsl`, `mstep.wgsl`): for real GPUs.
    Staged,
    /// Register blocks read straight from device memory (`*_direct.wgsl`): for software
    /// adapters, where workgroup memory and barriers are slow.
    Direct,
}

impl Variant {
    /// Direct on CPU adapters (lavapipe, llvmpipe, WARP), staged elsewhere; `CALM_KERNELS`
    /// (`staged` or `direct`) overrides.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Result<Self> {
        match std::env::var("CALM_KERNELS").as_deref() {
            Ok("staged") => Ok(Variant::Staged),
            Ok("direct") => Ok(Variant::Direct),
            Ok(other) => Err(CalmError::Invalid(format!(
                "CALM_KERNELS={other}: expected staged or direct"
            ))),
            Err(_) if info.device_type == wgpu::DeviceType::Cpu => Ok(Variant::Direct),
            Err(_) => Ok(Variant::Staged),
        }
    }
}

pub struct Pipelines {
    pub variant: Variant,
    pub estep: wgpu::ComputePipeline,
    pub posterior: wgpu::ComputePipeline,
    pub logsumexp: wgpu::ComputePipeline,
    pub mstep: wgpu::ComputePipeline,
    pub reduce_stats: wgpu::ComputePipeline,
    pub update: wgpu::ComputePipeline,
    pub summary: wgpu::ComputePipeline,
    pub features: wgpu::ComputePipeline,
}

fn build(device: &wgpu::Device, name: &str, text: &str) -> Result<wgpu::ComputePipeline> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(text.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(CalmError::Gpu(format!(
            "shader {name} failed to build: {e}"
        )));
    }
    Ok(pipeline)
}

impl Pipelines {
    pub fn new(device: &wgpu::Device, tiles: &Tiles, variant: Variant) -> Result<Self> {
        let b = |name, kernel| build(device, name, &source(kernel, tiles));
        let (estep, mstep) = match variant {
            Variant::Staged => (b("estep", ESTEP)?, b("mstep", MSTEP)?),
            Variant::Direct => (
                b("estep_direct", ESTEP_DIRECT)?,
                b("mstep_direct", MSTEP_DIRECT)?,
            ),
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
        })
    }
}
