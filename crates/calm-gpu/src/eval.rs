//! The paper's linear probe on a model's features, beside the same probe on baseline features:
//! the pixels, and untrained kernels through the model's own pipeline. What `calm-gpu eval` and
//! `calm-gpu reproduce` run; a feature learner earns its place by its margin over the baselines.
//!
//! ```no_run
//! use std::sync::Arc;
//! use calm_gpu::eval::{Baseline, EvalConfig, Labelled, evaluate};
//! use calm_gpu::{Model, data};
//! # fn main() -> Result<(), calm_gpu::CalmError> {
//! let model = Model::load("calm-model.safetensors".as_ref())?;
//! let set = |split| {
//!     let d = data::embedded_digits(split);
//!     let labels = d.labels.clone().unwrap();
//!     Labelled { images: Arc::new(d), labels }
//! };
//! let cfg = EvalConfig { baselines: vec![Baseline::Random], ..EvalConfig::for_model(&model) };
//! let rows = evaluate(&model, &set(data::Split::Train), &set(data::Split::Test), &cfg, &mut |_| {})?;
//! println!("{}: {:.2}%", rows[0].features, 100.0 * rows[0].report.test_acc);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use ndarray::Array2;

use crate::cancel::CancelToken;
use crate::data::ImageSource;
use crate::data::whiten::Whitening;
use crate::error::{CalmError, Result};
use crate::features::{Encoding, Pooling};
use crate::geometry::Geometry;
use crate::gpu::GpuConfig;
use crate::model::Model;
use crate::net::Network;
use crate::prior::Prior;
use crate::probe::{ProbeConfig, ProbeProgress, ProbeReport};
use crate::run::Device;

/// Features the probe also sees, to compare the model's with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// The images' pixels, flattened.
    Raw,
    /// N(0, 1) kernels with the model's K, w, p and seed, through the model's whitening,
    /// encoding and pooling (SPEC's prior). For a model without whitening (the paper's
    /// protocol) these are the paper code's random features.
    Random,
    /// The data-patch initialisation with the model's seed and no EM epoch: K patches of the
    /// (whitened) training images, through the model's whitening, encoding and pooling.
    Patches,
    /// k-means centroids of patches of the (whitened) training images with the model's K and w
    /// ([`crate::kmeans`]), through the model's whitening, encoding and pooling: with the
    /// triangle encoding, Coates' k-means pipeline.
    KMeans,
}

/// Images with their class labels (`labels[i] < 256` for image `i`).
#[derive(Clone)]
pub struct Labelled {
    /// The images.
    pub images: Arc<dyn ImageSource>,
    /// One class per image.
    pub labels: Vec<u8>,
}

/// How to evaluate: where the features are computed, how they are pooled, the probe.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Where the features are computed.
    pub device: Device,
    /// The GPU choices, where the features run on a GPU.
    pub gpu: GpuConfig,
    /// Images per batch of the feature computation (bounds memory only).
    pub batch: usize,
    /// How `L` becomes each image's features (for the model and the random baseline).
    pub pooling: Pooling,
    /// The probe; `standardize` there standardises the features.
    pub probe: ProbeConfig,
    /// Baselines to probe after the model's features, in this order.
    pub baselines: Vec<Baseline>,
    /// How the k-means baseline is fitted.
    pub kmeans: crate::kmeans::KMeansConfig,
    /// Stops the feature computation after the batch in progress.
    pub cancel: CancelToken,
}

impl EvalConfig {
    /// The model's recipe (its pooling and standardisation; SPEC's image-wide log-sum-exp
    /// features and the paper's probe when it has none), on the best device, no baselines.
    pub fn for_model(model: &Model) -> Self {
        let recipe = model.meta.features;
        Self {
            device: Device::Auto,
            gpu: GpuConfig::default(),
            batch: 1000,
            pooling: recipe.map(|r| r.pooling()).unwrap_or_default(),
            probe: ProbeConfig {
                standardize: recipe.is_some_and(|r| r.standardize),
                ..Default::default()
            },
            baselines: Vec::new(),
            kmeans: Default::default(),
            cancel: CancelToken::new(),
        }
    }
}

/// What [`evaluate`] is doing, for a progress display: each feature set's images, then each
/// probe's iterations.
#[derive(Clone, Copy, Debug)]
pub enum EvalEvent<'a> {
    /// Features of `images` images begin, for the set named `set` ("calm (K=64)", ...).
    FeaturesStarted {
        /// The feature set's name.
        set: &'a str,
        /// Images to compute features of.
        images: usize,
    },
    /// Images done of the features in progress.
    Features {
        /// Images done so far.
        done: usize,
    },
    /// The features in progress are done (or failed).
    FeaturesFinished,
    /// The probe on `set`'s features begins, with at most `max_iter` iterations.
    ProbeStarted {
        /// The feature set's name.
        set: &'a str,
        /// The probe's iteration limit.
        max_iter: usize,
    },
    /// The probe's progress after one of its iterations.
    Probe(&'a ProbeProgress),
    /// The probe in progress is done (or failed).
    ProbeFinished,
}

/// One probe's result: the features' name and size, its report and the time it all took.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalRow {
    /// The feature set's name, e.g. `calm (K=64)`, `raw pixels`.
    pub features: String,
    /// Features per image.
    pub dims: usize,
    /// Seconds the features and the probe took together.
    pub seconds: f64,
    /// The probe's accuracies and fit.
    #[serde(flatten)]
    pub report: ProbeReport,
}

/// Fits the probe on `train`'s features and scores it on `test`'s: the model's features first,
/// then each of `cfg.baselines`, a row each. The classes are the labels seen (at least 2).
pub fn evaluate(
    model: &Model,
    train: &Labelled,
    test: &Labelled,
    cfg: &EvalConfig,
    observe: &mut dyn FnMut(&EvalEvent),
) -> Result<Vec<EvalRow>> {
    check_sets(train, test, &cfg.baselines)?;
    let n_classes = n_classes(train, test);
    let geometry = |x: &Arc<dyn ImageSource>| {
        let (c, h, w) = x.shape();
        model.geometry_for(c, h, w)
    };
    let (g_tr, g_te) = (geometry(&train.images)?, geometry(&test.images)?);
    let mut rows = Vec::new();
    let mut sets = vec![model_set_name(model, cfg.pooling)];
    sets.extend(cfg.baselines.iter().map(|b| baseline_name(model, *b)));
    for (i, name) in sets.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let pair = match i.checked_sub(1).map(|b| cfg.baselines[b]) {
            None => {
                let (wtr, wte) = (
                    model.whitened(train.images.clone())?,
                    model.whitened(test.images.clone())?,
                );
                let prior = model.prior_or_uniform();
                let sets = [(g_tr, &wtr), (g_te, &wte)];
                features_pair(name, &model.theta, &prior, sets, cfg, observe)?
            }
            Some(Baseline::Raw) => (
                flatten(train.images.as_ref())?,
                flatten(test.images.as_ref())?,
            ),
            Some(b) => {
                let (wtr, wte) = (
                    model.whitened(train.images.clone())?,
                    model.whitened(test.images.clone())?,
                );
                let theta = untrained_theta(b, &g_tr, wtr.as_ref(), model.meta.seed, cfg)?;
                let prior = Prior::uniform(g_tr.k);
                let sets = [(g_tr, &wtr), (g_te, &wte)];
                features_pair(name, &theta, &prior, sets, cfg, observe)?
            }
        };
        rows.push(probe_row(
            name, pair, train, test, n_classes, cfg, t0, observe,
        )?);
    }
    Ok(rows)
}

/// The kernels of the untrained twin `b` (not [`Baseline::Raw`]) of a layer `g` on `images`
/// (its input, whitened as the layer's): N(0, 1) draws, data patches or k-means centroids.
fn untrained_theta(
    b: Baseline,
    g: &Geometry,
    images: &dyn ImageSource,
    seed: u64,
    cfg: &EvalConfig,
) -> Result<Vec<f32>> {
    Ok(match b {
        Baseline::Raw => unreachable!("the pixels have no kernels"),
        Baseline::Random => crate::em::init_theta(g, seed),
        Baseline::Patches => crate::em::random_patches(g, images, seed, g.k)?,
        Baseline::KMeans => crate::kmeans::kmeans_patches(g, images, seed, &cfg.kmeans)?.theta,
    })
}

/// [`evaluate`] for a network: its features (the head's map, or the top layer's by
/// `cfg.pooling`), then each baseline, a row each. Every twin is the same network with untrained
/// kernels of its kind in every layer ([`twin`], built on `train`'s images). A one-layer network
/// without a head is [`evaluate`] on its layer.
pub fn evaluate_network(
    net: &Network,
    train: &Labelled,
    test: &Labelled,
    cfg: &EvalConfig,
    observe: &mut dyn FnMut(&EvalEvent),
) -> Result<Vec<EvalRow>> {
    if net.is_single() {
        return evaluate(net.first(), train, test, cfg, observe);
    }
    if !net.is_complete() {
        return Err(CalmError::Invalid(format!(
            "the network has {} of its {} layers fitted; finish its training first",
            net.layers.len(),
            net.spec.layers.len()
        )));
    }
    check_sets(train, test, &cfg.baselines)?;
    let n_classes = n_classes(train, test);
    let top = net.layers.len() - 1;
    let mut rows = Vec::new();
    let mut sets = vec![format!(
        "calm net (K={})",
        net.layers[top].meta.layer.kernels
    )];
    sets.extend(cfg.baselines.iter().map(|b| match b {
        Baseline::Raw => baseline_name(net.first(), *b),
        _ => format!("{} net", baseline_name(&net.layers[top], *b)),
    }));
    for (i, name) in sets.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let pair = match i.checked_sub(1).map(|b| cfg.baselines[b]) {
            Some(Baseline::Raw) => (
                flatten(train.images.as_ref())?,
                flatten(test.images.as_ref())?,
            ),
            b => {
                let twin_net;
                let n = match b {
                    None => net,
                    Some(b) => {
                        twin_net = twin(net, b, train.images.clone(), cfg)?;
                        &twin_net
                    }
                };
                let mut one = |x: &Arc<dyn ImageSource>| {
                    observe(&EvalEvent::FeaturesStarted {
                        set: name,
                        images: x.len(),
                    });
                    let f = n.features(
                        cfg.device,
                        &cfg.gpu,
                        x.clone(),
                        cfg.pooling,
                        &cfg.cancel,
                        &mut |done| observe(&EvalEvent::Features { done }),
                    );
                    observe(&EvalEvent::FeaturesFinished);
                    f
                };
                (one(&train.images)?, one(&test.images)?)
            }
        };
        rows.push(probe_row(
            name, pair, train, test, n_classes, cfg, t0, observe,
        )?);
    }
    Ok(rows)
}

/// The untrained twin `kind` (not [`Baseline::Raw`]) of `net`, built layer by layer on `images`
/// (the network's images, preprocessed): each layer's kernels are drawn from its own input as
/// the twin's layers below compute it ([`untrained_theta`]), under SPEC's uniform prior. Layer 1
/// keeps the network's whitening filter (fitted on the same kind of images); a deeper layer's
/// filter, and every link's standardisation, are fitted again on the twin's maps.
pub fn twin(
    net: &Network,
    kind: Baseline,
    images: Arc<dyn ImageSource>,
    cfg: &EvalConfig,
) -> Result<Network> {
    let mut t = Network {
        spec: net.spec.clone(),
        layers: Vec::new(),
        norms: Vec::new(),
    };
    let mut x = images;
    for (l, m) in net.layers.iter().enumerate() {
        let mut layer = m.clone();
        layer.prior = None;
        if l > 0
            && let Some(wh) = &m.whiten
        {
            layer.whiten = Some(Whitening::fit(x.as_ref(), wh.width, m.meta.seed)?);
        }
        let (c, h, w) = x.shape();
        let g = layer.geometry_for(c, h, w)?;
        let wx = layer.whitened(x.clone())?;
        layer.theta = untrained_theta(kind, &g, wx.as_ref(), m.meta.seed, cfg)?;
        layer.counts = vec![0.0; g.k];
        layer.meta.history.clear();
        t.layers.push(layer);
        if l + 1 < net.layers.len() || t.spec.links.get(l).is_some_and(|k| k.norm) {
            let fit = crate::net::NormFit::solo(x.len(), m.meta.batch.max(1))?;
            let (next, norm) = t.link_stage(l, x, Some(&fit), &cfg.cancel, &mut |_| {})?;
            t.norms.push(norm);
            x = next;
        } else if l < t.spec.links.len() {
            t.norms.push(None);
            break;
        }
    }
    Ok(t)
}

/// The probe's sets hold a label per image; the raw-pixel baseline needs one image shape.
fn check_sets(train: &Labelled, test: &Labelled, baselines: &[Baseline]) -> Result<()> {
    for (set, what) in [(train, "training"), (test, "held-out")] {
        if set.labels.len() != set.images.len() {
            return Err(CalmError::Invalid(format!(
                "{what} set: {} images but {} labels",
                set.images.len(),
                set.labels.len()
            )));
        }
    }
    if baselines.contains(&Baseline::Raw) && train.images.shape() != test.images.shape() {
        return Err(CalmError::Invalid(format!(
            "training images are {:?} (C, H, W) but held-out images {:?}; the raw-pixel baseline needs one shape",
            train.images.shape(),
            test.images.shape()
        )));
    }
    Ok(())
}

/// The classes: the labels seen, at least 2.
fn n_classes(train: &Labelled, test: &Labelled) -> usize {
    train
        .labels
        .iter()
        .chain(&test.labels)
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1)
        .max(2)
}

/// Fits the probe on `pair.0` (the training images' features) and scores it on `pair.1`: the
/// row of the feature set `name`, whose work began at `t0`.
#[allow(clippy::too_many_arguments)]
fn probe_row(
    name: &str,
    pair: (Array2<f32>, Array2<f32>),
    train: &Labelled,
    test: &Labelled,
    n_classes: usize,
    cfg: &EvalConfig,
    t0: std::time::Instant,
    observe: &mut dyn FnMut(&EvalEvent),
) -> Result<EvalRow> {
    observe(&EvalEvent::ProbeStarted {
        set: name,
        max_iter: cfg.probe.max_iter,
    });
    let fitted = crate::probe::fit_and_evaluate_observed(
        pair.0.view(),
        &train.labels,
        pair.1.view(),
        &test.labels,
        n_classes,
        &cfg.probe,
        &mut |p| observe(&EvalEvent::Probe(p)),
    );
    observe(&EvalEvent::ProbeFinished);
    Ok(EvalRow {
        features: name.to_string(),
        dims: pair.0.ncols(),
        seconds: t0.elapsed().as_secs_f64(),
        report: fitted?.1,
    })
}

/// "calm (K=64, pool 4x4, triangle)": the model's features as the rows name them.
fn model_set_name(model: &Model, pooling: Pooling) -> String {
    format!(
        "calm (K={}{}{})",
        model.meta.layer.kernels,
        if pooling.grid > 1 {
            format!(", pool {0}x{0}", pooling.grid)
        } else {
            String::new()
        },
        if pooling.encoding == Encoding::Lse {
            String::new()
        } else {
            format!(", {}", pooling.encoding)
        }
    )
}

fn baseline_name(model: &Model, b: Baseline) -> String {
    match b {
        Baseline::Raw => "raw pixels".into(),
        Baseline::Random => format!(
            "random kernels (K={}, seed {})",
            model.meta.layer.kernels, model.meta.seed
        ),
        Baseline::Patches => format!(
            "data patches (K={}, seed {})",
            model.meta.layer.kernels, model.meta.seed
        ),
        Baseline::KMeans => format!(
            "k-means (K={}, seed {})",
            model.meta.layer.kernels, model.meta.seed
        ),
    }
}

/// The features of the probe's training and held-out images under `theta`.
fn features_pair(
    name: &str,
    theta: &[f32],
    prior: &Prior,
    sets: [(Geometry, &Arc<dyn ImageSource>); 2],
    cfg: &EvalConfig,
    observe: &mut dyn FnMut(&EvalEvent),
) -> Result<(Array2<f32>, Array2<f32>)> {
    let mut one = |(g, x): (Geometry, &Arc<dyn ImageSource>)| {
        observe(&EvalEvent::FeaturesStarted {
            set: name,
            images: x.len(),
        });
        let f = crate::run::features(
            cfg.device,
            g,
            x.clone(),
            theta,
            prior,
            cfg.batch,
            cfg.pooling,
            &cfg.gpu,
            &cfg.cancel,
            &mut |done| observe(&EvalEvent::Features { done }),
        );
        observe(&EvalEvent::FeaturesFinished);
        f
    };
    let [a, b] = sets;
    Ok((one(a)?, one(b)?))
}

/// The pixels of every image of `src`, one row each.
fn flatten(src: &dyn ImageSource) -> Result<Array2<f32>> {
    let (c, h, w) = src.shape();
    let mut x = vec![0f32; src.len() * c * h * w];
    src.read_into(0, src.len(), &mut x)?;
    Ok(Array2::from_shape_vec((src.len(), c * h * w), x).expect("one row per image"))
}
