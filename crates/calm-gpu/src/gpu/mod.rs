//! The GPU engine: WGSL compute shaders (`shaders/`) driven through wgpu on Vulkan, Metal, DX12
//! or GL.

pub mod config;
pub mod context;
pub mod engine;
pub mod kernels;
pub mod tune;

pub use config::GpuConfig;
pub use context::{GpuBackend, GpuContext, is_real_gpu, list_adapters};
pub use engine::{GpuEngine, GpuOptions, GpuState};
pub use kernels::Tiles;
