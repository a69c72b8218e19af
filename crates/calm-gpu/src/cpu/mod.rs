//! CPU engines: the f64 reference (plain loops, the twin of every shader) and the fast engine
//! (the same two products through a GEMM crate on all cores), and the twin of the tensor-core
//! E-step's arithmetic ([`coop`]).

pub mod coop;
pub mod fast;
pub mod reference;

pub use fast::CpuEngine;
