//! The device: adapter choice, limits, and the one readback helper.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use super::GpuConfig;
use crate::error::{CalmError, Result};

/// Which graphics API to run on. `Auto` takes the best real GPU on any API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuBackend {
    /// Every API wgpu has here; the best adapter among them.
    Auto,
    /// Vulkan.
    Vulkan,
    /// Metal.
    Metal,
    /// DirectX 12.
    Dx12,
    /// OpenGL ES (wgpu's GL backend).
    Gl,
}

impl GpuBackend {
    fn backends(self) -> wgpu::Backends {
        match self {
            GpuBackend::Auto => wgpu::Backends::all(),
            GpuBackend::Vulkan => wgpu::Backends::VULKAN,
            GpuBackend::Metal => wgpu::Backends::METAL,
            GpuBackend::Dx12 => wgpu::Backends::DX12,
            GpuBackend::Gl => wgpu::Backends::GL,
        }
    }
}

impl fmt::Display for GpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            GpuBackend::Auto => "auto",
            GpuBackend::Vulkan => "vulkan",
            GpuBackend::Metal => "metal",
            GpuBackend::Dx12 => "dx12",
            GpuBackend::Gl => "gl",
        };
        f.write_str(s)
    }
}

/// A wgpu instance on `backends`; with `from_env`, wgpu's environment conventions apply
/// (`WGPU_BACKEND`, when set, narrows the backends further).
fn instance(backends: wgpu::Backends, from_env: bool) -> wgpu::Instance {
    let mut desc = if from_env {
        wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    } else {
        wgpu::InstanceDescriptor::new_without_display_handle()
    };
    desc.backends = match from_env {
        true => wgpu::Backends::from_env().map_or(backends, |env| env & backends),
        false => backends,
    };
    // Where the driver reports a memory budget (Vulkan with VK_EXT_memory_budget, DX12), an
    // allocation past it fails as out-of-memory, which calm-gpu reports or streams around,
    // instead of the device being lost later.
    desc.memory_budget_thresholds.for_resource_creation = Some(95);
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see, on every backend, with the device memory it reports.
pub fn list_adapters() -> Vec<(wgpu::AdapterInfo, Option<u64>)> {
    list_adapters_with(&GpuConfig::default())
}

/// [`list_adapters`] with `config`'s instance settings ([`GpuConfig::wgpu_env`]).
pub fn list_adapters_with(config: &GpuConfig) -> Vec<(wgpu::AdapterInfo, Option<u64>)> {
    let inst = instance(wgpu::Backends::all(), config.wgpu_env);
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| (a.get_info(), reported_memory(&a)))
        .collect()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// True for a hardware GPU (not a software rasteriser such as lavapipe or llvmpipe).
pub fn is_real_gpu(info: &wgpu::AdapterInfo) -> bool {
    matches!(
        info.device_type,
        wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu
    )
}

/// A device and its queue, created once and shared by every kernel.
pub struct GpuContext {
    /// The wgpu device, opened with every limit the adapter allows.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter's name, backend and type.
    pub info: wgpu::AdapterInfo,
    /// The device's limits (the adapter's own).
    pub limits: wgpu::Limits,
    /// Bytes of device memory the adapter reports (Vulkan: its largest device-local heap);
    /// `None` where the API does not say.
    pub memory: Option<u64>,
    /// Bytes calm-gpu plans to use: [`GpuConfig::memory_budget`] if set, else 90% of `memory` (the
    /// driver, other programs and wgpu's staging buffers need the rest).
    pub budget: Option<u64>,
    /// Where `budget` comes from, for messages.
    pub budget_source: &'static str,
    /// naga's runtime checks in the two GEMM kernels too ([`GpuConfig::checks`]).
    pub gemm_checks: bool,
    /// The adapter's cooperative-matrix configurations (what `calm-gpu devices` prints; empty
    /// where it offers none).
    pub coop_properties: Vec<wgpu::CooperativeMatrixProperties>,
    /// Where the device was opened for the tensor-core E-step ([`GpuConfig::cooperative_matrices`]
    /// and an adapter that offers it all): its one subgroup size.
    pub coop: Option<CoopSupport>,
    /// The features the adapter offers (the device may have been opened with fewer).
    pub adapter_features: wgpu::Features,
    /// Every compute pipeline built on this device, by kernel name and WGSL text: `validate`
    /// and `tune` build one engine after another with the same kernels, and each engine would
    /// otherwise translate and compile all ten again.
    pipelines: Mutex<HashMap<(String, String), wgpu::ComputePipeline>>,
}

/// What the tensor-core E-step found on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopSupport {
    /// Invocations per subgroup, the same for every dispatch (the adapter's minimum and maximum
    /// agree): the kernel's workgroup is four subgroups.
    pub subgroup: u32,
}

impl CoopSupport {
    /// Whether the tensor-core E-step with `tiles` fits the device's limits: its workgroup
    /// memory, and workgroups of `tiles.subgroups()` subgroups.
    pub fn fits(
        &self,
        tiles: &super::kernels::CoopTiles,
        limits: &wgpu::Limits,
    ) -> std::result::Result<(), String> {
        let bytes = tiles.workgroup_bytes();
        let threads = tiles.subgroups() * self.subgroup;
        if limits.max_compute_workgroup_storage_size < bytes
            || limits.max_compute_invocations_per_workgroup < threads
            || limits.max_compute_workgroup_size_x < threads
        {
            return Err(format!(
                "the tensor-core kernel with tiles c={tiles} needs {bytes} bytes of workgroup memory (the device allows {}) and workgroups of {threads} invocations (it allows {})",
                limits.max_compute_workgroup_storage_size,
                limits.max_compute_invocations_per_workgroup
            ));
        }
        Ok(())
    }
}

/// The features the tensor-core E-step needs.
fn coop_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
}

/// Whether `adapter` can run the tensor-core E-step, and why not: the features, a 16x16x16
/// configuration with f16 inputs and f32 accumulators, one subgroup size dividing 256, and the
/// workgroup memory and size its workgroup of four subgroups needs.
pub fn coop_support(
    features: wgpu::Features,
    properties: &[wgpu::CooperativeMatrixProperties],
    info: &wgpu::AdapterInfo,
    limits: &wgpu::Limits,
) -> std::result::Result<CoopSupport, String> {
    use wgpu::CooperativeScalarType as T;
    let missing: Vec<&str> = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
            "EXPERIMENTAL_COOPERATIVE_MATRIX",
        ),
    ]
    .into_iter()
    .filter(|(f, _)| !features.contains(*f))
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        return Err(format!("the adapter lacks {}", missing.join(", ")));
    }
    if !properties.iter().any(|p| {
        (p.m_size, p.n_size, p.k_size) == (16, 16, 16) && p.ab_type == T::F16 && p.cr_type == T::F32
    }) {
        return Err(
            "the adapter offers no 16x16x16 cooperative matrices of f16 with f32 accumulators"
                .into(),
        );
    }
    let sg = info.subgroup_min_size;
    if sg != info.subgroup_max_size || sg == 0 || 256 % sg != 0 {
        return Err(format!(
            "the adapter's subgroups have {}..{} invocations; the kernel needs one size that divides 256",
            info.subgroup_min_size, info.subgroup_max_size
        ));
    }
    let support = CoopSupport { subgroup: sg };
    support.fits(&super::kernels::CoopTiles::default(), limits)?;
    Ok(support)
}

/// The largest device-local heap of a Vulkan adapter, in bytes.
#[cfg(not(any(target_vendor = "apple", target_arch = "wasm32")))]
fn reported_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: only reads the physical device's memory properties through the instance that
    // created it; nothing is destroyed and the guard is dropped at the end of the block.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
        let props = hal
            .shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device());
        props
            .memory_heaps_as_slice()
            .iter()
            // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
            .filter(|h| h.flags.as_raw() & 1 != 0)
            .map(|h| h.size)
            .max()
    }
}

#[cfg(any(target_vendor = "apple", target_arch = "wasm32"))]
fn reported_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

impl GpuContext {
    /// Opens the best adapter of `backend`: a discrete GPU before an integrated one before a
    /// software one. With `require_real_gpu`, software adapters are refused (used by
    /// `--backend auto`).
    pub fn new(backend: GpuBackend, require_real_gpu: bool) -> Result<Self> {
        Self::open(backend, require_real_gpu, &GpuConfig::default())
    }

    /// [`GpuContext::new`] with `config`'s adapter name (a substring, case-insensitive), memory
    /// budget and runtime checks.
    pub fn open(backend: GpuBackend, require_real_gpu: bool, config: &GpuConfig) -> Result<Self> {
        let inst = instance(backend.backends(), config.wgpu_env);
        let mut adapters = pollster::block_on(inst.enumerate_adapters(backend.backends()));
        if let Some(name) = &config.adapter_name {
            let name = name.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&name));
        }
        if require_real_gpu {
            adapters.retain(|a| is_real_gpu(&a.get_info()));
        }
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        if let Some(i) = config.adapter_index
            && !adapters.is_empty()
        {
            let n = adapters.len();
            adapters.rotate_left(i % n);
        }
        let adapter = adapters.into_iter().next().ok_or_else(|| {
            CalmError::Gpu(format!(
                "no {} adapter found{}; `calm-gpu devices` lists what wgpu sees (install a driver, e.g. mesa-vulkan-drivers for a software Vulkan device, or use the CPU engine)",
                if require_real_gpu { "hardware GPU".to_string() } else { format!("{backend} GPU") },
                config.adapter_name.as_ref().map(|n| format!(" whose name contains `{n}`")).unwrap_or_default()
            ))
        })?;
        let info = adapter.get_info();
        let memory = reported_memory(&adapter);
        let (budget, budget_source) = match config.memory_budget {
            Some(b) => (Some(b), "the configured memory budget"),
            None => (
                memory.map(|m| m / 10 * 9),
                "90% of what the adapter reports",
            ),
        };
        // Ask for everything the adapter allows: bigger bindings and workgroup memory than
        // wgpu's portable defaults (128 MiB, 16 KiB) mean bigger batches and tiles.
        let limits = adapter.limits();
        let coop_properties = adapter.cooperative_matrix_properties();
        let adapter_features = adapter.features();
        let mut coop = match config.cooperative_matrices {
            true => coop_support(adapter.features(), &coop_properties, &info, &limits).ok(),
            false => None,
        };
        let open = |coop: bool| {
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("calm-gpu"),
                required_features: match coop {
                    true => coop_features(),
                    false => wgpu::Features::empty(),
                },
                required_limits: limits.clone(),
                experimental_features: match coop {
                    // SAFETY: wgpu's token for its experimental features (here the cooperative
                    // matrices): only the tensor-core E-step uses them, `validate` checks its
                    // results against the f64 reference, and GpuConfig::cooperative_matrices
                    // (CALM_TENSOR_CORES=0) opens the device without them.
                    true => unsafe { wgpu::ExperimentalFeatures::enabled() },
                    false => wgpu::ExperimentalFeatures::disabled(),
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))
        };
        let opened = match coop {
            // A driver that offers the features and then fails to open with them gets the
            // device without them.
            Some(_) => open(true).or_else(|_| {
                coop = None;
                open(false)
            }),
            None => open(false),
        };
        let (device, queue) = opened.map_err(|e| {
            CalmError::Gpu(format!(
                "could not open {} ({:?}): {e}",
                info.name, info.backend
            ))
        })?;
        Ok(Self {
            device,
            queue,
            info,
            limits,
            memory,
            budget,
            budget_source,
            gemm_checks: config.checks,
            coop_properties,
            coop,
            adapter_features,
            pipelines: Mutex::default(),
        })
    }

    /// The pipeline known by `key` (the kernel's name and everything its compilation depends
    /// on): built by `build` the first time, the same pipeline after that. A build that fails
    /// is not kept, so it fails again.
    pub fn pipeline(
        &self,
        key: (String, String),
        build: impl FnOnce(&wgpu::Device) -> Result<wgpu::ComputePipeline>,
    ) -> Result<wgpu::ComputePipeline> {
        // A poisoned lock only means another thread panicked while building; the map holds
        // finished pipelines only, so it is still sound.
        let cached = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(p) = cached {
            return Ok(p);
        }
        let built = build(&self.device)?;
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, built.clone());
        Ok(built)
    }

    /// How many distinct pipelines this device has built (for tests of the cache).
    pub fn pipelines_built(&self) -> usize {
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The adapter's cooperative matrices and subgroups in one line, for `calm-gpu devices` and
    /// the device script: each configuration as `MxNxK in->acc`, and whether the tensor-core
    /// E-step runs here.
    pub fn describe_coop(&self) -> String {
        let configs: Vec<String> = self
            .coop_properties
            .iter()
            .map(|p| {
                format!(
                    "{}x{}x{} {:?}->{:?}{}",
                    p.m_size,
                    p.n_size,
                    p.k_size,
                    p.ab_type,
                    p.cr_type,
                    if p.saturating_accumulation {
                        " sat"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        format!(
            "subgroups {}..{}; cooperative matrices: {}; tensor-core E-step: {}",
            self.info.subgroup_min_size,
            self.info.subgroup_max_size,
            if configs.is_empty() {
                "none".to_string()
            } else {
                configs.join(", ")
            },
            match self.coop {
                Some(c) => format!("yes (subgroup {})", c.subgroup),
                None => "no".into(),
            }
        )
    }

    /// Why the tensor-core E-step does not run on this device (for errors).
    pub fn coop_missing(&self) -> String {
        if self.coop.is_some() {
            return "it does".into();
        }
        match coop_support(
            self.device.features() | self.adapter_features,
            &self.coop_properties,
            &self.info,
            &self.limits,
        ) {
            Err(why) => why,
            Ok(_) => "the device was opened without cooperative matrices (CALM_TENSOR_CORES=0, GpuConfig::cooperative_matrices off, or the driver refused them)".into(),
        }
    }

    /// One line naming the adapter, for the user.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}{})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            if self.info.driver.is_empty() {
                String::new()
            } else {
                format!(", {} {}", self.info.driver, self.info.driver_info)
            }
        )
    }

    /// Copies `size` bytes of `buffer` from `offset` back to the host and waits for them.
    pub fn read_buffer<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        size: u64,
    ) -> Result<Vec<T>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        match pollster::block_on(rx.receive()) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(CalmError::Gpu(format!(
                    "reading results back from the GPU failed: {e}"
                )));
            }
            None => {
                return Err(CalmError::Gpu(
                    "reading results back from the GPU failed: no answer".into(),
                ));
            }
        }
        let out = {
            let view = staging.slice(..).get_mapped_range().map_err(|e| {
                CalmError::Gpu(format!("reading results back from the GPU failed: {e}"))
            })?;
            bytemuck::cast_slice(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| CalmError::Gpu(format!("waiting for the GPU failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adapter as NVIDIA's Vulkan driver describes an H100/H200: the three features, 16x16x16
    /// f16 -> f16 and f16 -> f32 configurations, subgroups of 32.
    fn nvidia() -> (
        wgpu::Features,
        Vec<wgpu::CooperativeMatrixProperties>,
        wgpu::AdapterInfo,
        wgpu::Limits,
    ) {
        use wgpu::CooperativeScalarType as T;
        let config = |cr| wgpu::CooperativeMatrixProperties {
            m_size: 16,
            n_size: 16,
            k_size: 16,
            ab_type: T::F16,
            cr_type: cr,
            saturating_accumulation: false,
        };
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan);
        info.subgroup_min_size = 32;
        info.subgroup_max_size = 32;
        let limits = wgpu::Limits {
            max_compute_workgroup_storage_size: 49152,
            max_compute_invocations_per_workgroup: 1024,
            max_compute_workgroup_size_x: 1024,
            ..wgpu::Limits::default()
        };
        (
            coop_features() | wgpu::Features::TIMESTAMP_QUERY,
            vec![config(T::F16), config(T::F32)],
            info,
            limits,
        )
    }

    #[test]
    fn the_tensor_core_estep_needs_every_part() {
        let (f, p, i, l) = nvidia();
        assert_eq!(
            coop_support(f, &p, &i, &l),
            Ok(CoopSupport { subgroup: 32 })
        );
        // Each missing part is named.
        let no_f16 = coop_support(f - wgpu::Features::SHADER_F16, &p, &i, &l).unwrap_err();
        assert!(no_f16.contains("SHADER_F16"), "{no_f16}");
        let only_f16_acc: Vec<_> = p
            .iter()
            .filter(|c| c.cr_type != wgpu::CooperativeScalarType::F32)
            .copied()
            .collect();
        assert!(
            coop_support(f, &only_f16_acc, &i, &l)
                .unwrap_err()
                .contains("f32 accumulators")
        );
        assert!(coop_support(f, &[], &i, &l).is_err());
        let mut intel = i.clone();
        (intel.subgroup_min_size, intel.subgroup_max_size) = (8, 32);
        assert!(
            coop_support(f, &p, &intel, &l)
                .unwrap_err()
                .contains("8..32")
        );
        let small = wgpu::Limits {
            max_compute_workgroup_storage_size: 16384,
            ..l.clone()
        };
        assert!(
            coop_support(f, &p, &i, &small)
                .unwrap_err()
                .contains("workgroup memory")
        );
        // AMD's 64-wide subgroups: workgroups of 256.
        let mut amd = i.clone();
        (amd.subgroup_min_size, amd.subgroup_max_size) = (64, 64);
        assert_eq!(
            coop_support(f, &p, &amd, &l),
            Ok(CoopSupport { subgroup: 64 })
        );
    }
}
