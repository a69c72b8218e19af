//! The GPU engine: WGSL compute shaders (`shaders/`) driven through wgpu on Vulkan, Metal, DX12
//! or GL.

//!
//! - [`context`]: the adapter and device; [`config`]: the caller's typed configuration.
//! - [`kernels`]: the WGSL kernels, their tiles and variants; [`pipelines`]: built per device;
//!   [`codegen`]: the tile constants and register blocks the GEMM kernels are generated with.
//! - [`tune`]: which kernels an engine runs (the caller's, the tuning file's, the built-in
//!   rule) and the tuning file.
//! - [`plan`]: the memory plan; [`buffers`]: the device buffers it sizes.
//! - [`steps`]: one struct per kernel, which owns its bind groups and records its dispatches.
//! - [`engine`]: the engine, which sequences the steps batch by batch and epoch by epoch.

pub mod buffers;
pub mod codegen;
pub mod config;
pub mod context;
pub mod engine;
pub mod kernels;
pub mod pipelines;
pub mod plan;
pub mod steps;
pub mod tune;

pub use config::GpuConfig;
pub use context::{
    CoopSupport, GpuBackend, GpuContext, is_real_gpu, list_adapters, list_adapters_with,
};
pub use engine::{GpuEngine, GpuOptions, GpuState};
pub use kernels::Tiles;
