//! What every EM engine (CPU reference, fast CPU, GPU) provides to the EM driver.

use crate::cancel::CancelToken;
use crate::error::Result;
use crate::geometry::Geometry;
use crate::prior::Prior;

pub use crate::cpu::reference::Stats;

/// Over what each posterior is normalised, which is the model's likelihood.
///
/// - `Image` (SPEC's model): one mixture over (kernel, position) per image, `gamma[n,k,u] =
///   exp(L[n,k,u] - logp[n])` with `logp[n] = logsumexp over (k,u)`, `LL = sum_n logp[n]`. An
///   image's posterior mass is 1, and it usually falls on about one (kernel, position) pair.
/// - `Patch`: every patch its own draw from a mixture over the kernels, a Gaussian mixture over
///   patches (whose hard limit is k-means), `gamma[n,k,u] = exp(L[n,k,u] - logp[n,u])` with
///   `logp[n,u] = logsumexp over k`, `LL = sum_{n,u} logp[n,u]`. Each patch's mass is 1, so
///   every patch moves the kernels. The E-step's `L` and the features are the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Posterior {
    /// Per image, over kernels and positions (SPEC).
    #[default]
    Image,
    /// Per patch, over kernels.
    Patch,
}

impl Posterior {
    /// `image` or `patch`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "image" => Ok(Posterior::Image),
            "patch" => Ok(Posterior::Patch),
            other => Err(format!("`{other}`: expected image or patch")),
        }
    }
}

/// The scalars one epoch produces, under the `theta` used during that epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// `LL = sum_n logp[n]`.
    pub loglik: f64,
    /// `S = sum_k B[k]`; equals the number of images up to rounding.
    pub count_sum: f64,
    /// False when any statistic or the updated `theta` is not finite; the engine then keeps the
    /// previous `theta` (SPEC's stopping rule).
    pub finite: bool,
}

/// One CALM layer being fitted by batch EM over a fixed dataset.
pub trait Engine {
    /// Which adapter or engine runs, for the user to read.
    fn describe(&self) -> String;
    /// The layer's shapes and padding.
    fn geometry(&self) -> Geometry;
    /// Number of images in the dataset.
    fn len(&self) -> usize;
    /// True when the dataset has no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One EM iteration: accumulate `B`, `T`, `LL` over every image under the current `theta`,
    /// then apply the update if everything is finite. `progress` is called with the number of
    /// images processed so far.
    fn epoch(&mut self, progress: &mut dyn FnMut(usize)) -> Result<EpochStats>;
    /// The statistics `B`, `T`, `LL` of images `[start, start + count)` under the current
    /// `theta`, without the update: the half of [`Engine::epoch`] that a data-parallel run
    /// ([`crate::dist`]) computes on every process before it sums them. `progress` is called
    /// with the images of the range done so far.
    fn stats(
        &mut self,
        start: usize,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Stats>;
    /// SPEC's update from statistics summed over every image of the epoch (by this engine's
    /// [`Engine::stats`] or by many processes'), applied when everything is finite: the other
    /// half of [`Engine::epoch`].
    fn apply(&mut self, stats: &Stats) -> Result<EpochStats>;
    /// True when [`Engine::epoch`] is the sum in batch order of [`Engine::stats`] over each batch
    /// (of [`Engine::batch`] images from image 0), each batch's statistics summed from zero and
    /// independent of the others, so that a data-parallel run that sums the same batches in the
    /// same order gives the same bits whatever its number of processes (the CPU engine). False
    /// when only the whole data's statistics are available that way (the GPU engine, which sums
    /// its batches on the device).
    fn exact_batches(&self) -> bool {
        false
    }
    /// Images per batch of [`Engine::exact_batches`].
    fn batch(&self) -> usize;
    /// Current weights `(K, C, w, w)` flattened.
    fn theta(&mut self) -> Result<Vec<f32>>;
    /// `B'` of the last applied update (all zero before the first).
    fn counts(&mut self) -> Result<Vec<f32>>;
    /// Replaces the weights between epochs (re-seeding unused kernels).
    fn set_theta(&mut self, theta: &[f32]) -> Result<()>;
    /// The mixing weights and variance the E-step uses from the next epoch on (kept across
    /// updates of `theta` until set again); [`Prior::uniform`] is SPEC's model.
    fn set_prior(&mut self, prior: &Prior) -> Result<()>;
    /// The mixing weights and variance of the next epoch.
    fn prior(&self) -> Prior;
    /// The posterior's normalisation from the next epoch on ([`Posterior`]). Engines that have
    /// only SPEC's per-image posterior refuse the other.
    fn set_posterior(&mut self, posterior: Posterior) -> Result<()> {
        match posterior {
            Posterior::Image => Ok(()),
            Posterior::Patch => Err(crate::error::CalmError::Invalid(format!(
                "the per-patch posterior runs on the CPU engine only, not on {} (use --backend cpu)",
                self.describe()
            ))),
        }
    }
    /// Stops [`Engine::epoch`] after the batch in progress once `cancel` is cancelled (with
    /// [`crate::CalmError::Interrupted`], `theta` left as the last complete epoch made it).
    fn set_cancel(&mut self, cancel: CancelToken);
    /// Whether this engine's token has been cancelled.
    fn cancelled(&self) -> bool;
}
