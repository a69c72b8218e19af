//! Fitting a layer from Rust: validated parameters ([`Calm::params`]), the [`Trainer`] that runs
//! the epochs, the stopping rule, revival, checkpoints and resume, and the fitted [`Layer`].
//!
//! ```no_run
//! use calm_gpu::{Calm, Device, Pooling, data};
//! # fn main() -> Result<(), calm_gpu::CalmError> {
//! let digits = data::embedded_digits(data::Split::Train);
//! let layer = Calm::params(64).width(20).pad(2).epochs(15).device(Device::Auto)
//!     .fit(digits.images.view())?;
//! let features = layer.features(digits.images.view(), Pooling::default())?; // (8000, 64)
//! layer.save("calm-model.safetensors")?;
//! # Ok(()) }
//! ```
//!
//! Progress and stopping belong to the caller: a [`Trainer`] reports every batch and epoch to
//! an [`Observer`] and stops at the next batch once its [`CancelToken`] is cancelled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, ArrayView4};

use crate::cancel::CancelToken;
use crate::data::{Dataset, ImageSource, Whitened, Whitening};
use crate::dist::{Comm, DistEngine, Gathered, Sharding, Traffic};
use crate::em::{self, Event, InitMethod, Outcome, Schedule};
use crate::engine::{Engine, Posterior};
use crate::error::{CalmError, Result};
use crate::features::Pooling;
use crate::geometry::{Geometry, LayerConfig};
use crate::model::{EpochRecord, FeatureRecipe, Model, ModelMeta};
use crate::prior::{Prior, PriorOptions};
use crate::run::Device;

pub use crate::error::ParamError;

/// The entry point: `Calm::params(k)` starts the parameters of a layer of `k` kernels.
pub struct Calm;

impl Calm {
    /// SPEC's defaults for everything but the number of kernels: kernels of 20 x 20, padding 2,
    /// 15 epochs, batches of 1,000, seed 0, N(0, 1) initialisation, the best device there is.
    pub fn params(kernels: usize) -> CalmParams {
        CalmParams::new(kernels)
    }
}

/// Everything that decides a fit. Built with chained setters, checked by [`CalmParams::check`]
/// (also done by [`CalmParams::fit`] and [`Trainer::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CalmParams {
    /// Kernels `K`, width `w` and padding `p`.
    pub layer: LayerConfig,
    /// EM iterations (passes over the data).
    pub epochs: usize,
    /// Images per batch: bounds memory only.
    pub batch: usize,
    /// Seed of the initial weights, of revival and of the whitening filter's patches.
    pub seed: u64,
    /// How `theta` starts when `init_theta` is not given.
    pub init_method: InitMethod,
    /// Starting weights `(K, C, w, w)` flattened, instead of `init_method`'s.
    pub init_theta: Option<Vec<f32>>,
    /// Re-seed unused or duplicate kernels after each epoch ([`Schedule::revive`]).
    pub revive: bool,
    /// Stop once the relative change of LL between epochs is at most this.
    pub tol: Option<f64>,
    /// Which of the mixing weights and the variance the M-step learns (SPEC: neither).
    pub prior: PriorOptions,
    /// The patches' variance `sigma^2` the fit starts from (SPEC: 1): fixed, unless
    /// `prior.variance` learns it. It is the posterior's temperature: `L` is divided by it.
    pub variance: Option<f64>,
    /// Patch-whitening width `W`: a ZCA filter fitted on `W x W` patches of the training data.
    pub whiten: Option<usize>,
    /// Over what each posterior is normalised (SPEC: per image; [`Posterior`]).
    pub posterior: Posterior,
    /// Contrast-normalise every patch with this `eps` before the layer sees it
    /// ([`Geometry::patch_norm`]; SPEC: raw patches).
    pub patch_norm: Option<f64>,
    /// Where the fit runs.
    pub device: Device,
    /// A GPU run's choices (kernels, tiles, memory, tuning file).
    pub gpu: crate::gpu::GpuConfig,
    /// How the fitted layer's features are meant to be computed, kept in the model.
    pub recipe: Option<FeatureRecipe>,
}

impl CalmParams {
    /// [`Calm::params`]: SPEC's defaults with `kernels` kernels.
    pub fn new(kernels: usize) -> Self {
        Self {
            layer: LayerConfig {
                kernels,
                width: 20,
                pad: 2,
            },
            epochs: 15,
            batch: 1000,
            seed: 0,
            init_method: InitMethod::Normal,
            init_theta: None,
            revive: false,
            tol: None,
            prior: PriorOptions::default(),
            variance: None,
            posterior: Posterior::Image,
            patch_norm: None,
            whiten: None,
            device: Device::Auto,
            gpu: Default::default(),
            recipe: None,
        }
    }
    /// The single layer docs/results.md's ablation chose on validation splits of the digits
    /// and Fashion-MNIST (`calm-gpu train --preset recommended`): K 128 kernels of 8 x 8, no
    /// padding, 10 epochs, data-patch initialisation with revival, images whitened over 7 x 7
    /// patches, every patch then contrast-normalised with eps 0.01, and the recipe of the
    /// triangle encoding on a 4 x 4 grid, standardised.
    pub fn recommended() -> Self {
        Self::new(128)
            .width(8)
            .pad(0)
            .epochs(10)
            .init_method(InitMethod::Patches)
            .revive(true)
            .whiten(7)
            .patch_norm(0.01)
            .recipe(FeatureRecipe {
                grid: 4,
                encoding: crate::Encoding::Triangle,
                standardize: true,
            })
    }
    /// Kernels are `width x width`.
    pub fn width(mut self, width: usize) -> Self {
        self.layer.width = width;
        self
    }
    /// Zero padding on every side.
    pub fn pad(mut self, pad: usize) -> Self {
        self.layer.pad = pad;
        self
    }
    /// EM iterations (passes over the data).
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    /// Images per batch: bounds memory only (`theta` is fixed for the whole epoch).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
    /// Seed of the initial weights, of revival and of the whitening filter's patches.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// How `theta` starts (SPEC: [`InitMethod::Normal`]).
    pub fn init_method(mut self, method: InitMethod) -> Self {
        self.init_method = method;
        self
    }
    /// Start from these weights, `(K, C, w, w)`.
    pub fn init_theta(mut self, theta: Vec<f32>) -> Self {
        self.init_theta = Some(theta);
        self
    }
    /// Re-seed unused or duplicate kernels after each epoch ([`Schedule::revive`]).
    pub fn revive(mut self, on: bool) -> Self {
        self.revive = on;
        self
    }
    /// Stop once the relative change of LL between epochs is below `tol`.
    pub fn tol(mut self, tol: f64) -> Self {
        self.tol = Some(tol);
        self
    }
    /// Learn the mixing weights and/or the variance in the M-step (SPEC: neither).
    pub fn learn_prior(mut self, prior: PriorOptions) -> Self {
        self.prior = prior;
        self
    }
    /// Normalise each posterior per image (SPEC) or per patch ([`Posterior`]; the CPU engine
    /// only, for now).
    pub fn posterior(mut self, posterior: Posterior) -> Self {
        self.posterior = posterior;
        self
    }

    /// Contrast-normalise every patch, `(x - mean) / sqrt(var + eps)` over its values, in
    /// training and in the model's features ([`Geometry::patch_norm`]).
    pub fn patch_norm(mut self, eps: f64) -> Self {
        self.patch_norm = Some(eps);
        self
    }

    /// Start from the variance `sigma^2` (SPEC: 1), kept unless the prior learns it.
    pub fn variance(mut self, variance: f64) -> Self {
        self.variance = Some(variance);
        self
    }
    /// Whiten the images with a ZCA filter fitted on `width x width` patches.
    pub fn whiten(mut self, width: usize) -> Self {
        self.whiten = Some(width);
        self
    }
    /// Where the fit runs (default [`Device::Auto`]).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// A GPU run's choices (kernels, tiles, memory, tuning file, adapter).
    pub fn gpu(mut self, gpu: crate::gpu::GpuConfig) -> Self {
        self.gpu = gpu;
        self
    }
    /// Keep in the model how its features are meant to be computed ([`Layer::features_by_recipe`]).
    pub fn recipe(mut self, recipe: FeatureRecipe) -> Self {
        self.recipe = Some(recipe);
        self
    }

    /// Checks what can be checked without the data; errors name the field.
    pub fn check(&self) -> std::result::Result<(), ParamError> {
        let positive = |field, v: usize| {
            if v == 0 {
                Err(ParamError::new(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        if let Some(t) = self.tol
            && !(t >= 0.0 && t.is_finite())
        {
            return Err(ParamError::new(
                "tol",
                format!("must be a non-negative number (got {t})"),
            ));
        }
        positive("kernels", self.layer.kernels)?;
        positive("width", self.layer.width)?;
        positive("batch", self.batch)?;
        positive("epochs", self.epochs)?;
        if self.whiten == Some(0) {
            return Err(ParamError::new("whiten", "must be at least 1"));
        }
        if let Some(v) = self.variance
            && !(v.is_finite() && v >= crate::prior::MIN_VARIANCE)
        {
            return Err(ParamError::new(
                "variance",
                format!(
                    "must be a positive number, at least {} (got {v})",
                    crate::prior::MIN_VARIANCE
                ),
            ));
        }
        if let Some(eps) = self.patch_norm {
            if !(eps.is_finite() && eps > 0.0 && eps <= f32::MAX as f64) {
                return Err(ParamError::new(
                    "patch_norm",
                    format!("must be a positive number (got {eps}): the variance's floor"),
                ));
            }
            if self.prior.variance {
                return Err(ParamError::new(
                    "patch_norm",
                    "cannot be combined with a learned variance (its M-step counts the image's pixels, not the normalised patches)",
                ));
            }
        }
        Ok(())
    }

    /// [`CalmParams::check`], then the layer against images of `(c, h, w)`: the kernels must fit,
    /// `init_theta` must be `(K, C, w, w)` and finite, the whitening patch must fit.
    pub fn check_shape(&self, c: usize, h: usize, w: usize) -> Result<Geometry> {
        self.check()?;
        let g =
            Geometry::new(self.layer, c, h, w)?.with_patch_norm(self.patch_norm.map(|e| e as f32));
        if let Some(theta) = &self.init_theta {
            if theta.len() != g.k * g.r() {
                return Err(ParamError::new(
                    "init_theta",
                    format!(
                        "holds {} values, but K, C, w, w of this layer are {:?}",
                        theta.len(),
                        [g.k, g.c, g.kw, g.kw]
                    ),
                )
                .into());
            }
            if theta.iter().any(|v| !v.is_finite()) {
                return Err(ParamError::new("init_theta", "holds NaN or infinity").into());
            }
        }
        if let Some(width) = self.whiten {
            Whitening::check_width(width, h, w)?;
        }
        Ok(g)
    }

    /// True when every choice is SPEC's protocol (N(0,1) init, no revival, no early stop, no
    /// whitening, SPEC's uniform prior): the paper's model.
    pub fn is_spec_protocol(&self) -> bool {
        self.init_method == InitMethod::Normal
            && self.whiten.is_none()
            && self.variance.is_none()
            && self.posterior == Posterior::Image
            && self.patch_norm.is_none()
            && self.schedule()
                == Schedule {
                    seed: self.seed,
                    ..Default::default()
                }
    }

    /// The EM loop's choices beyond plain batch EM.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            revive: self.revive,
            tol: self.tol,
            seed: self.seed,
            prior: self.prior,
        }
    }

    /// Fits a layer on `images` `(N, C, H, W)` (copied; already preprocessed) and returns it.
    pub fn fit(&self, images: ArrayView4<f32>) -> Result<Layer> {
        let data = Dataset::new(images.to_owned(), None);
        if data.images.shape()[0] == 0 {
            return Err(ParamError::new("images", "holds no images").into());
        }
        data.check_finite("images")?;
        self.fit_source(Arc::new(data))
    }

    /// [`CalmParams::fit`] over any [`ImageSource`] (a file streamed from disk, say).
    pub fn fit_source(&self, source: Arc<dyn ImageSource>) -> Result<Layer> {
        let mut t = Trainer::new(self, source)?;
        let outcome = t.run(&mut ())?;
        if outcome.interrupted {
            return Err(CalmError::Interrupted);
        }
        t.layer(outcome.stopped)
    }
}

/// What a Trainer tells its caller while it runs: epoch starts and ends, images done in the
/// epoch, revivals, the precision limit ([`Event`]).
pub trait Observer {
    /// Called with each event as it happens.
    fn on_event(&mut self, event: &Event);
}

/// No reports.
impl Observer for () {
    fn on_event(&mut self, _: &Event) {}
}

impl<F: FnMut(&Event)> Observer for F {
    fn on_event(&mut self, event: &Event) {
        self(event)
    }
}

/// Where the training data came from, as the model file records it.
#[derive(Clone, Debug, PartialEq)]
pub struct DataInfo {
    /// The inputs' names (file paths, or `embedded:digits-train`).
    pub names: Vec<String>,
    /// Preprocessing applied before training (`none`, `scale`, `zca-image`).
    pub preprocess: String,
}

impl Default for DataInfo {
    fn default() -> Self {
        Self {
            names: vec!["ndarray".into()],
            preprocess: "none".into(),
        }
    }
}

/// A training checkpoint: the model after the last complete epoch, every epoch's record, and
/// whatever the caller stored beside them (the CLI keeps its command line under `run`).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The model after the last complete epoch.
    pub model: Model,
    /// Every completed epoch's full record (seconds and GFLOP/s included), one per entry of the
    /// model's history.
    pub records: Vec<EpochRecord>,
}

impl Checkpoint {
    /// The file a checkpoint directory holds.
    pub const FILE: &str = "checkpoint.safetensors";

    /// Reads `dir`'s checkpoint and checks its records against its history.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        Self::from_model(Model::load(&path)?, &path)
    }

    /// The checkpoint `model` (read from `path`) holds: its records, checked against its
    /// history.
    pub fn from_model(model: Model, path: &Path) -> Result<Self> {
        let bad = |what: String| CalmError::Model(format!("{}: {what}", path.display()));
        let records: Vec<EpochRecord> = model
            .extra
            .get("records")
            .ok_or_else(|| bad("not a training checkpoint (no epoch records)".into()))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("damaged epoch records: {e}")))
            })?;
        if records.len() != model.meta.history.len() {
            return Err(bad(format!(
                "damaged checkpoint: {} epoch records but a history of {} epochs",
                records.len(),
                model.meta.history.len()
            )));
        }
        Ok(Self { model, records })
    }

    /// One of the caller's entries (e.g. the CLI's `run`).
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.model.extra.get(key).map(String::as_str)
    }
}

/// Runs the epochs of one fit: builds the engine, fits the whitening filter, draws the initial
/// weights, applies the stopping rule and revival, writes checkpoints and resumes from them.
pub struct Trainer {
    params: CalmParams,
    g: Geometry,
    engine: Box<dyn Engine>,
    /// The training images as the engine sees them (whitened when asked).
    source: Arc<dyn ImageSource>,
    whitening: Option<Whitening>,
    history: Vec<EpochRecord>,
    /// A resumed run's counts, for a model written before this trainer ran an epoch.
    resumed_counts: Option<(usize, Vec<f32>)>,
    data: DataInfo,
    cancel: CancelToken,
    checkpoint_dir: Option<PathBuf>,
    checkpoint_extra: BTreeMap<String, String>,
    /// False on the ranks of a data-parallel fit but rank 0, which write no checkpoint.
    root: bool,
    traffic: Option<Arc<std::sync::Mutex<Traffic>>>,
}

impl Trainer {
    /// A fresh fit of `params` on `source`.
    pub fn new(params: &CalmParams, source: Arc<dyn ImageSource>) -> Result<Self> {
        Self::start(params, source, None)
    }

    /// Continues the fit `checkpoint` holds from its last complete epoch, with `params` (the
    /// run's own: the layer must be the checkpoint's) on the data it started with. The
    /// checkpoint's whitening filter and prior are used, and its records become the history.
    pub fn resume(
        params: &CalmParams,
        source: Arc<dyn ImageSource>,
        checkpoint: Checkpoint,
    ) -> Result<Self> {
        Self::start(params, source, Some(checkpoint))
    }

    /// One rank's part of a data-parallel fit ([`crate::dist`]): `shard` holds this rank's
    /// batches of the `n` training images ([`Sharding`] with `params.batch`, e.g. a
    /// [`crate::dist::ShardView`]), and every rank of `comm` calls this, then [`Trainer::run`],
    /// alike. Every rank ends with the same model; only rank 0 writes checkpoints. With
    /// `checkpoint`, resumes it (written with any number of ranks).
    pub fn sharded(
        params: &CalmParams,
        shard: Arc<dyn ImageSource>,
        n: usize,
        comm: Arc<dyn Comm>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self> {
        let sharding = Sharding::new(n, params.batch, comm.rank(), comm.size())?;
        sharding.check_shard(shard.len())?;
        let global: Arc<dyn ImageSource> =
            Arc::new(Gathered::new(shard.clone(), sharding, comm.clone()));
        let mut traffic = None;
        let mut t = Self::start_on(params, global, shard, checkpoint, |engine| {
            let d = DistEngine::new(engine, comm.clone(), sharding)?;
            traffic = Some(d.traffic());
            Ok(Box::new(d))
        })?;
        t.root = sharding.rank == 0;
        t.traffic = traffic;
        Ok(t)
    }

    fn start(
        params: &CalmParams,
        source: Arc<dyn ImageSource>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self> {
        Self::start_on(params, source.clone(), source, checkpoint, Ok)
    }

    /// `source` is the whole data (read by the whitening filter, the initialisation and
    /// revival), `local` what this process's engine runs over (the same, or its shard), `wrap`
    /// what the engine is wrapped in (the data-parallel engine, or nothing).
    fn start_on(
        params: &CalmParams,
        source: Arc<dyn ImageSource>,
        local: Arc<dyn ImageSource>,
        checkpoint: Option<Checkpoint>,
        wrap: impl FnOnce(Box<dyn Engine>) -> Result<Box<dyn Engine>>,
    ) -> Result<Self> {
        let (c, h, w) = source.shape();
        let g = params.check_shape(c, h, w)?;
        if source.is_empty() {
            return Err(ParamError::new("images", "holds no images").into());
        }
        if let Some(ck) = &checkpoint {
            let m = &ck.model.meta;
            if m.layer != params.layer || (m.channels, m.height, m.width) != (c, h, w) {
                return Err(CalmError::Invalid(
                    "the checkpoint's layer or image shape does not match its data any more".into(),
                ));
            }
        }
        // Patch whitening: the checkpoint's filter, else fitted on the training images.
        let whitening = match (&checkpoint, params.whiten) {
            (Some(ck), _) if ck.model.whiten.is_some() => ck.model.whiten.clone(),
            (_, Some(width)) => Some(Whitening::fit(source.as_ref(), width, params.seed)?),
            _ => None,
        };
        let whitened = |s: Arc<dyn ImageSource>| -> Result<Arc<dyn ImageSource>> {
            Ok(match &whitening {
                Some(wh) => Arc::new(Whitened::new(s, Arc::new(wh.clone()))?),
                None => s,
            })
        };
        let (source, local) = (whitened(source)?, whitened(local)?);
        let (theta, history, resumed_counts, prior) = match checkpoint {
            Some(ck) => (
                ck.model.theta,
                ck.records.clone(),
                Some((ck.records.len(), ck.model.counts)),
                ck.model.prior,
            ),
            None => (
                match &params.init_theta {
                    Some(theta) => theta.clone(),
                    None => {
                        em::initial_theta(&g, params.init_method, source.as_ref(), params.seed)?
                    }
                },
                Vec::new(),
                None,
                params.variance.map(|v| Prior {
                    inv_var: (1.0 / v) as f32,
                    log_weight: vec![0.0; g.k],
                }),
            ),
        };
        let mut engine = wrap(crate::run::engine_with(
            params.device,
            &params.gpu,
            g,
            local,
            theta,
            params.batch,
        )?)?;
        if let Some(p) = &prior {
            engine.set_prior(p)?;
        }
        engine.set_posterior(params.posterior)?;
        Ok(Self {
            params: params.clone(),
            g,
            engine,
            source,
            whitening,
            history,
            resumed_counts,
            data: DataInfo::default(),
            cancel: CancelToken::new(),
            checkpoint_dir: None,
            checkpoint_extra: BTreeMap::new(),
            root: true,
            traffic: None,
        })
    }

    /// Stops at the next batch once `token` (or a clone) is cancelled.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.engine.set_cancel(token.clone());
        self.cancel = token;
        self
    }

    /// Names the data in the model's metadata.
    pub fn with_data_info(mut self, data: DataInfo) -> Self {
        self.data = data;
        self
    }

    /// Writes a checkpoint into `dir` after every epoch (atomically).
    pub fn checkpoint_every_epoch(mut self, dir: PathBuf) -> Self {
        self.checkpoint_dir = Some(dir);
        self
    }

    /// Entries every checkpoint keeps beside the trainer's own (the CLI stores its command line
    /// there), read back with [`Checkpoint::extra`].
    pub fn checkpoint_extra(mut self, extra: BTreeMap<String, String>) -> Self {
        self.checkpoint_extra = extra;
        self
    }

    /// Which adapter or engine runs, for the user to read.
    pub fn describe(&self) -> String {
        self.engine.describe()
    }

    /// The layer's shapes and padding on the training images.
    pub fn geometry(&self) -> Geometry {
        self.g
    }

    /// Number of training images.
    pub fn len(&self) -> usize {
        self.source.len()
    }

    /// True when there are no training images (never, for a trainer that was built).
    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    /// A data-parallel fit's exchanges so far, on this rank (`None` for one process).
    pub fn traffic(&self) -> Option<Traffic> {
        self.traffic
            .as_ref()
            .map(|t| *t.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The epochs completed so far (a resumed run's included).
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// The whitening filter the images go through, if any.
    pub fn whitening(&self) -> Option<&Whitening> {
        self.whitening.as_ref()
    }

    /// Runs the epochs left, reporting to `observer`. Returns how it ended: all epochs, the
    /// stopping rule (converged, precision limit) or a cancellation, after which
    /// [`Trainer::save_checkpoint`] keeps a state that resumes exactly.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Outcome> {
        let first = self.history.len() + 1;
        let history = std::mem::take(&mut self.history);
        let dir = self.checkpoint_dir.clone().filter(|_| self.root);
        let extra = self.checkpoint_extra.clone();
        let meta = self.meta_parts();
        let resumed = self.resumed_counts.clone();
        let mut after = |engine: &mut dyn Engine, history: &[EpochRecord]| -> Result<()> {
            if let Some(dir) = &dir {
                let m = build_model(&meta, engine, history, None, &resumed)?;
                write_checkpoint(dir, m, history, &extra).map_err(|e| {
                    CalmError::Invalid(format!("writing the checkpoint failed: {e}"))
                })?;
            }
            Ok(())
        };
        let outcome = em::run_with(
            self.engine.as_mut(),
            Some(self.source.as_ref()),
            self.params.schedule(),
            history,
            first,
            self.params.epochs,
            &mut |ev| observer.on_event(&ev),
            &mut after,
        );
        let outcome = outcome?;
        self.history = outcome.history.clone();
        Ok(outcome)
    }

    fn meta_parts(&self) -> MetaParts {
        MetaParts {
            params: self.params.clone(),
            g: self.g,
            images: self.source.len(),
            data: self.data.clone(),
            whitening: self.whitening.clone(),
        }
    }

    /// The model as it stands: the weights after the last complete epoch, its history, and
    /// `stopped` (why training ended early, if it did).
    pub fn model(&mut self, stopped: Option<String>) -> Result<Model> {
        let meta = self.meta_parts();
        build_model(
            &meta,
            self.engine.as_mut(),
            &self.history,
            stopped,
            &self.resumed_counts,
        )
    }

    /// The fitted layer: [`Trainer::model`] with the timed history and the device.
    pub fn layer(&mut self, stopped: Option<String>) -> Result<Layer> {
        Ok(Layer {
            model: self.model(stopped)?,
            history: self.history.clone(),
            device: self.params.device,
            gpu: self.params.gpu.clone(),
        })
    }

    /// Writes a checkpoint of the state now into `dir` (e.g. after a cancellation).
    /// On the ranks of a data-parallel fit but rank 0 it writes nothing.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        if !self.root {
            return Ok(());
        }
        let m = self.model(None)?;
        write_checkpoint(dir, m, &self.history, &self.checkpoint_extra)
    }
}

/// What a model's metadata is made of besides the engine's state.
struct MetaParts {
    params: CalmParams,
    g: Geometry,
    images: usize,
    data: DataInfo,
    whitening: Option<Whitening>,
}

fn build_model(
    p: &MetaParts,
    engine: &mut dyn Engine,
    history: &[EpochRecord],
    stopped: Option<String>,
    resumed_counts: &Option<(usize, Vec<f32>)>,
) -> Result<Model> {
    let params = &p.params;
    let schedule = params.schedule();
    let options = (params.init_method != InitMethod::Normal
        || params.whiten.is_some()
        || schedule.revive
        || schedule.tol.is_some()
        || schedule.prior.any()
        || params.variance.is_some()
        || params.posterior != Posterior::Image
        || params.patch_norm.is_some())
    .then(|| {
        let mut o = serde_json::json!({ "init_method": params.init_method, "schedule": schedule });
        if let Some(wd) = params.whiten {
            o["whiten"] = wd.into();
        }
        if let Some(v) = params.variance {
            o["variance"] = v.into();
        }
        if params.posterior != Posterior::Image {
            o["posterior"] = serde_json::to_value(params.posterior).unwrap_or_default();
        }
        if let Some(eps) = params.patch_norm {
            o["patch_norm"] = eps.into();
        }
        o
    });
    Ok(Model {
        meta: ModelMeta {
            layer: params.layer,
            channels: p.g.c,
            height: p.g.h,
            width: p.g.w,
            seed: params.seed,
            batch: params.batch,
            epochs_requested: params.epochs,
            preprocess: p.data.preprocess.clone(),
            engine: engine.describe(),
            images: p.images,
            data: p.data.names.clone(),
            history: history.iter().map(Into::into).collect(),
            stopped,
            calm_gpu_version: env!("CARGO_PKG_VERSION").into(),
            options,
            features: params.recipe,
        },
        theta: engine.theta()?,
        // An engine that has run no epoch has no counts: a model written before this process
        // ran one (a checkpoint of a finished run) takes the checkpoint's.
        counts: match resumed_counts {
            Some((epochs, counts)) if *epochs == history.len() => counts.clone(),
            _ => engine.counts()?,
        },
        prior: (schedule.prior.any() || params.variance.is_some()).then(|| engine.prior()),
        whiten: p.whitening.clone(),
        extra: Default::default(),
    })
}

fn write_checkpoint(
    dir: &Path,
    mut m: Model,
    history: &[EpochRecord],
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    m.extra.extend(extra.clone());
    let records = serde_json::to_string(history).map_err(|e| CalmError::Invalid(e.to_string()))?;
    m.extra.insert("records".into(), records);
    m.save(&dir.join(Checkpoint::FILE), true)
}

/// A fitted layer: the model ([`Layer::model`]) with the timed history of its fit.
#[derive(Clone, Debug)]
pub struct Layer {
    model: Model,
    history: Vec<EpochRecord>,
    device: Device,
    gpu: crate::gpu::GpuConfig,
}

impl Layer {
    /// A saved model as a layer (no timings in its history), run on `device`.
    pub fn from_model(model: Model, device: Device) -> Self {
        Self {
            model,
            history: Vec::new(),
            device,
            gpu: Default::default(),
        }
    }

    /// The weights `(K, C, w, w)`, PyTorch's conv2d weight layout.
    pub fn theta(&self) -> Array4<f32> {
        self.model.theta()
    }

    /// `B'` of the last update, `(K)`.
    pub fn counts(&self) -> Array1<f32> {
        Array1::from(self.model.counts.clone())
    }

    /// Every epoch of the fit, with its LL, seconds and GFLOP/s.
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// The fitted model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The fitted model, giving the layer up.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// Features of `images` `(N, C, H, W)` (preprocessed as the training images were; the
    /// layer's whitening filter is applied here): `(N, K * grid^2)`.
    pub fn features(&self, images: ArrayView4<f32>, pooling: Pooling) -> Result<Array2<f32>> {
        let data = Dataset::new(images.to_owned(), None);
        data.check_finite("images")?;
        self.model.features(
            self.device,
            &self.gpu,
            Arc::new(data),
            pooling,
            &CancelToken::new(),
            &mut |_| {},
        )
    }

    /// Features as the model's recipe says ([`CalmParams::recipe`]), else SPEC's image-wide
    /// log-sum-exp. (Standardisation, if the recipe asks for it, belongs to the probe.)
    pub fn features_by_recipe(&self, images: ArrayView4<f32>) -> Result<Array2<f32>> {
        let pooling = self
            .model
            .meta
            .features
            .map(|r| r.pooling())
            .unwrap_or_default();
        self.features(images, pooling)
    }

    /// Writes the model as safetensors (replacing `path`), as `calm-gpu train` does.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.model.save(path.as_ref(), true)
    }
}
