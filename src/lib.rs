//! calm-gpu: convolutional Gaussian-mixture layers fitted by EM, on any GPU through WGSL, with a
//! CPU reference engine. `SPEC.md`'s names are used throughout: `theta`, `L`, `logp`, `gamma`,
//! counts `B`, statistics `T`, the log likelihood `LL`.

pub mod atomic;
pub mod data;
pub mod geometry;

pub use geometry::{Geometry, LayerConfig};
pub mod cpu;
pub mod engine;
pub mod error;

pub use engine::{Engine, EpochStats};
pub use error::{CalmError, Result};
pub mod bench;
pub mod em;
pub mod features;
pub mod gpu;
pub mod interrupt;
pub mod model;
pub mod prior;
pub mod probe;
pub mod run;
pub mod validate;
pub mod viz;
