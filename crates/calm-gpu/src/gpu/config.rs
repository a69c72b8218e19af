//! What a caller decides about a GPU run, as one typed value: the kernel family and tiles (else
//! the tuning file's choice, else the built-in rule), naga's runtime checks, the device memory
//! to plan within, the tuning file and the adapter. The library reads no environment variable
//! (wgpu reads its own only where [`GpuConfig::wgpu_env`] says so); the CLI fills this from
//! `CALM_KERNELS`, `CALM_TILES`, `CALM_CHECKS`, `CALM_GPU_MEMORY`, `CALM_TUNE_FILE` and
//! `WGPU_ADAPTER_NAME`, and sets `wgpu_env` (docs/tuning.md).

use std::path::PathBuf;

use super::kernels::{Tiles, Variant};

/// A caller's choices for a GPU run (the module's text); [`GpuConfig::default`] chooses nothing:
/// the built-in rules, no tuning file, no extra checks, any adapter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuConfig {
    /// The kernel family; `None`: the tuning file's, else the adapter's default
    /// ([`Variant::builtin`]).
    pub kernels: Option<Variant>,
    /// Tile shapes; `None`: the tuning file's, else [`Tiles::for_shape`].
    pub tiles: Option<Tiles>,
    /// Compile naga's runtime checks (index clamping, loop bounding) into the two GEMM kernels
    /// too (the other kernels always have them).
    pub checks: bool,
    /// Device memory to plan within, in bytes; `None`: 90% of what the adapter reports.
    pub memory_budget: Option<u64>,
    /// The file `calm-gpu tune` writes, to look this adapter's and shape's choice up in;
    /// `None`: no lookup. Read only when neither `kernels` nor `tiles` is set.
    pub tune_file: Option<PathBuf>,
    /// Only adapters whose name contains this (case-insensitive), as wgpu's
    /// `WGPU_ADAPTER_NAME` convention.
    pub adapter_name: Option<String>,
    /// Of the adapters left (best first), the one at this index modulo their number: one GPU
    /// per process of a data-parallel job on a machine with several (the CLI passes the rank
    /// on the machine). `None`: the best.
    pub adapter_index: Option<usize>,
    /// Who set `kernels` or `tiles`, as the engine's description names it (the CLI: the
    /// variables it read); `None`: "chosen by the caller".
    pub chosen_by: Option<String>,
    /// Let wgpu read its own environment conventions for the instance (`WGPU_BACKEND`,
    /// `WGPU_VALIDATION`, `WGPU_DX12_COMPILER`, ...), as the CLI asks; off, the library reads
    /// no environment variable at all and wgpu's defaults hold.
    pub wgpu_env: bool,
    /// Open the device with what the tensor-core E-step needs ([`super::kernels::Variant::Coop`]: f16,
    /// subgroups and wgpu's experimental cooperative matrices) where the adapter offers all of it
    /// ([`super::GpuContext::coop`]); off (the default), the device has none of them and the
    /// tensor-core kernels are refused. The CLI turns it on unless `CALM_TENSOR_CORES=0`.
    pub cooperative_matrices: bool,
}
