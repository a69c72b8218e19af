//! The library's error type: every failure a user can cause becomes one line of text.

use crate::data::DataError;
use crate::geometry::GeometryError;
/// Kept here for callers that print errors; it lives in [`crate::text`].
pub use crate::text::printable;

/// Every error the library returns; its `Display` is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum CalmError {
    /// Reading or preprocessing data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A layer shape that cannot be used on these images, or a pooling grid that does not fit.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// A parameter of [`crate::CalmParams`] that cannot be used, by field name.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The linear probe's inputs or settings.
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    /// The GPU run cannot be set up or failed: no adapter, a limit the adapter lacks, a shader
    /// that does not build, a failed wait or read-back.
    #[error("{0}")]
    Gpu(String),
    /// The device cannot hold what the run needs.
    #[error("{0}")]
    GpuMemory(String),
    /// A model or checkpoint file that cannot be read or written (named in the text).
    #[error("{0}")]
    Model(String),
    /// An output file exists and the caller did not ask to replace it.
    #[error("{path} already exists; pass force to replace it")]
    Exists {
        /// The file.
        path: String,
    },
    /// A request or a state that cannot be served, said in the text.
    #[error("{0}")]
    Invalid(String),
    /// A timed run gave up after its warm-up epoch took longer than it was allowed
    /// (`bench::time_gpu`'s limit; `calm-gpu tune` skips such a candidate).
    #[error("the warm-up epoch took {warmup_s:.3} s, over the limit of {limit_s:.3} s")]
    SlowWarmup {
        /// Seconds the warm-up epoch took.
        warmup_s: f64,
        /// The limit, in seconds.
        limit_s: f64,
    },
    /// A stop was requested (Ctrl-C) and the epoch in progress was abandoned.
    #[error("interrupted")]
    Interrupted,
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The library's result: [`CalmError`] unless told otherwise.
pub type Result<T, E = CalmError> = std::result::Result<T, E>;

impl CalmError {
    /// [`CalmError::Io`] for `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// A parameter that cannot be used, named as the builder method that set it (`kernels`,
/// `width`, `epochs`, ...); the CLI names the matching flag instead.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct ParamError {
    /// The builder method (and [`crate::CalmParams`] field) at fault.
    pub field: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

impl ParamError {
    /// The error for `field`, saying `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
