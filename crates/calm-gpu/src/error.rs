//! The library's error type: every failure a user can cause becomes one line of text.

use crate::data::DataError;
use crate::geometry::GeometryError;
/// Kept here for callers that print errors; it lives in [`crate::text`].
pub use crate::text::printable;

#[derive(Debug, thiserror::Error)]
pub enum CalmError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// A parameter of [`crate::CalmParams`] that cannot be used, by field name.
    #[error(transparent)]
    Param(#[from] crate::fit::ParamError),
    /// The linear probe's inputs or settings.
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    #[error("{0}")]
    Gpu(String),
    /// The device cannot hold what the run needs.
    #[error("{0}")]
    GpuMemory(String),
    #[error("{0}")]
    Model(String),
    /// An output file exists and the caller did not ask to replace it.
    #[error("{path} already exists; pass force to replace it")]
    Exists { path: String },
    #[error("{0}")]
    Invalid(String),
    /// A timed run gave up after its warm-up epoch took longer than it was allowed
    /// (`bench::time_gpu`'s limit; `calm-gpu tune` skips such a candidate).
    #[error("the warm-up epoch took {warmup_s:.3} s, over the limit of {limit_s:.3} s")]
    SlowWarmup { warmup_s: f64, limit_s: f64 },
    /// A stop was requested (Ctrl-C) and the epoch in progress was abandoned.
    #[error("interrupted")]
    Interrupted,
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = CalmError> = std::result::Result<T, E>;

impl CalmError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
