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
    /// Every compute pipeline built on this device, by kernel name and WGSL text: `validate`
    /// and `tune` build one engine after another with the same kernels, and each engine would
    /// otherwise translate and compile all ten again.
    pipelines: Mutex<HashMap<(String, String), wgpu::ComputePipeline>>,
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("calm-gpu"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| {
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
