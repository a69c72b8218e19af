//! calm-gpu: convolutional Gaussian-mixture (CALM) layers fitted by EM, on any GPU through WGSL
//! compute shaders (wgpu: Vulkan, Metal, DX12, GL), with a fast CPU engine and an f64
//! reference. `SPEC.md`'s names are used throughout: `theta`, `L`, `logp`, `gamma`, counts `B`,
//! statistics `T`, the log likelihood `LL`.
//!
//! ```no_run
//! use calm_gpu::{Calm, Device, Pooling, data};
//! # fn main() -> Result<(), calm_gpu::CalmError> {
//! let digits = data::embedded_digits(data::Split::Train); // (8000, 1, 28, 28)
//! let layer = Calm::params(64).epochs(15).device(Device::Auto).fit(digits.images.view())?;
//! let f = layer.features(digits.images.view(), Pooling::default())?; // (8000, 64)
//! layer.save("calm-model.safetensors")?;
//! # Ok(()) }
//! ```
//!
//! Where to look:
//! - [`fit`]: [`Calm::params`] and [`CalmParams`], the [`Trainer`] (epochs, stopping rule,
//!   revival, checkpoints, resume; reports to an [`Observer`], stops on a [`CancelToken`]) and
//!   the fitted [`Layer`].
//! - [`model`]: the safetensors file ([`Model::load`], [`Model::features`]).
//! - [`geometry`]: SPEC's shapes, padding and FLOP count, shared by every engine.
//! - [`em`]: the EM driver generic over an [`Engine`]; [`cpu`] and [`gpu`] are the engines.
//! - [`data`]: readers (IDX, `.npy`, STL-10, CIFAR-10, image folders) and preprocessing.
//! - [`eval`]: the probe on a model's features beside baselines; [`probe`]: the paper's linear
//!   probe; [`validate`] and [`bench`](mod@bench): the GPU checks and timings;
//!   [`autotune`]: the sweep that tunes the kernels to an adapter.

#![warn(missing_docs)]

pub mod atomic;
pub mod autotune;
pub mod bench;
pub mod cancel;
pub mod cpu;
pub mod data;
pub mod dist;
pub mod em;
pub mod engine;
pub mod error;
pub mod eval;
pub mod features;
pub mod fit;
pub mod geometry;
pub mod gpu;
pub mod interrupt;
pub mod kmeans;
pub mod model;
pub mod net;
pub mod peak;
pub mod prior;
pub mod probe;
pub mod run;
pub mod text;
pub mod validate;
#[cfg(feature = "png")]
pub mod viz;

pub use cancel::CancelToken;
pub use engine::{Engine, EpochStats, Posterior};
pub use error::{CalmError, Result};
pub use features::{Encoding, Pooling};
pub use fit::{Calm, CalmParams, Checkpoint, DataInfo, Layer, Observer, ParamError, Trainer};
pub use geometry::{Geometry, LayerConfig};
pub use gpu::GpuConfig;
pub use model::Model;
pub use run::Device;

/// The array crate of this API: `fit`, `theta` and `features` take and give its arrays.
pub use ndarray;
/// The wgpu the GPU engine is built on (its adapter and device types appear in this API).
pub use wgpu;

/// The README's library example, compiled and run as a doctest.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
