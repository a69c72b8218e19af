//! The library's choices as clap sees them: each enum mirrors one of the library's (same
//! variants, same names), so `--help` lists and explains the values while the library stays
//! free of clap.

use clap::ValueEnum;
use clap::builder::TypedValueParser;

/// `--backend`: [`calm_gpu::Device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A hardware GPU if there is one, else the CPU engine
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// The CPU engine (GEMM on all cores)
    Cpu,
}

impl From<Backend> for calm_gpu::Device {
    fn from(b: Backend) -> Self {
        use calm_gpu::Device as D;
        match b {
            Backend::Auto => D::Auto,
            Backend::Vulkan => D::Vulkan,
            Backend::Metal => D::Metal,
            Backend::Dx12 => D::Dx12,
            Backend::Gl => D::Gl,
            Backend::Cpu => D::Cpu,
        }
    }
}

/// `--init-method`: [`calm_gpu::em::InitMethod`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InitMethod {
    /// SPEC's (and the paper's): every entry i.i.d. N(0, 1).
    Normal,
    /// Each kernel a patch of the (padded) data at a random image and position, so every kernel
    /// starts where data is and gets a share of the posterior.
    Patches,
    /// The k-means centroids of 50,000 of the data's patches (k-means++, then Lloyd), as
    /// `eval --baseline kmeans` fits them: EM refines the classic dictionary
    Kmeans,
}

impl From<InitMethod> for calm_gpu::em::InitMethod {
    fn from(m: InitMethod) -> Self {
        match m {
            InitMethod::Normal => Self::Normal,
            InitMethod::Patches => Self::Patches,
            InitMethod::Kmeans => Self::KMeans,
        }
    }
}

/// `--encode`: [`calm_gpu::Encoding`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    /// SPEC's (and the paper's): log-sum-exp of L over the region, `log sum_u exp L[k,u]`
    #[default]
    Lse,
    /// Triangle encoding (Coates, Lee & Ng 2011) summed over the region: `max(0, mean_j d_j(u)
    /// - d_k(u))` with `d_k(u) = ||x_u - theta_k||`, the patch's distance to each kernel (its
    /// log likelihood under kernel k is `-d^2 / 2` up to a constant)
    Triangle,
}

impl From<Encoding> for calm_gpu::Encoding {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::Lse => Self::Lse,
            Encoding::Triangle => Self::Triangle,
        }
    }
}

impl From<calm_gpu::Encoding> for Encoding {
    fn from(e: calm_gpu::Encoding) -> Self {
        match e {
            calm_gpu::Encoding::Lse => Self::Lse,
            calm_gpu::Encoding::Triangle => Self::Triangle,
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        calm_gpu::Encoding::from(*self).fmt(f)
    }
}

/// Parses `--backend` into the library's [`calm_gpu::Device`].
pub fn device() -> impl clap::builder::TypedValueParser<Value = calm_gpu::Device> {
    clap::builder::EnumValueParser::<Backend>::new().map(calm_gpu::Device::from)
}

/// Parses `--init-method` into the library's [`calm_gpu::em::InitMethod`].
pub fn init_method() -> impl clap::builder::TypedValueParser<Value = calm_gpu::em::InitMethod> {
    clap::builder::EnumValueParser::<InitMethod>::new().map(calm_gpu::em::InitMethod::from)
}

/// Parses `--encode` into the library's [`calm_gpu::Encoding`].
pub fn encoding() -> impl clap::builder::TypedValueParser<Value = calm_gpu::Encoding> {
    clap::builder::EnumValueParser::<Encoding>::new().map(calm_gpu::Encoding::from)
}

/// `--patch-norm EPS|off`: the `eps` of contrast-normalised patches, or `None` (`off`: raw
/// patches, to turn off `--preset recommended`'s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatchNorm(pub Option<f64>);

/// Parses `--patch-norm`: a number (the library checks its range) or `off`.
pub fn patch_norm() -> impl clap::builder::TypedValueParser<Value = PatchNorm> {
    |s: &str| match s {
        "off" => Ok(PatchNorm(None)),
        _ => s
            .parse::<f64>()
            .map(|v| PatchNorm(Some(v)))
            .map_err(|_| "expected a positive number or off".to_string()),
    }
}

/// Parses `--net` into the library's [`calm_gpu::net::NetSpec`]; the error names the part of
/// the spec that is wrong.
pub fn net_spec() -> impl clap::builder::TypedValueParser<Value = calm_gpu::net::NetSpec> {
    |s: &str| {
        s.parse::<calm_gpu::net::NetSpec>()
            .map_err(|e| e.reason.to_string())
    }
}
