//! `calm-gpu eval`: the paper's linear probe on a model's features, with the raw-pixel and random-kernel baselines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use super::values;
use calm_gpu::Device;
use calm_gpu::Encoding;
use calm_gpu::data::ImageSource;
use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::eval::{EvalConfig, EvalEvent, EvalRow, Labelled, evaluate_network};
use calm_gpu::features::Pooling;
use calm_gpu::net::Network;
use calm_gpu::{data, model};

use super::outputs::{check_distinct, check_output};
use super::{
    Preset, RECOMMENDED, check_network, check_positive, model_geometry_for, model_preprocess,
    network_fits,
};

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct EvalArgs {
    /// A model written by `calm-gpu train`
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// recommended: the triangle encoding over a 4x4 grid, standardised (docs/results.md)
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Labelled training images for the probe (default: the shipped digits' 8,000 training images)
    #[arg(long, value_name = "PATH")]
    pub train: Option<PathBuf>,
    /// Labels of --train, where its format does not carry them (IDX labels, .npy, STL-10 *_y.bin)
    #[arg(long, value_name = "PATH")]
    pub train_labels: Option<PathBuf>,
    /// Labelled test images (default: the shipped digits' 2,000 test images)
    #[arg(long, value_name = "PATH")]
    pub test: Option<PathBuf>,
    /// Labels of --test, where its format does not carry them (IDX labels, .npy, STL-10 *_y.bin)
    #[arg(long, value_name = "PATH")]
    pub test_labels: Option<PathBuf>,
    /// Also fit the same probe on other features: raw (the pixels), random (untrained N(0,1)
    /// kernels with the model's K, w, p and seed), patches (the data-patch initialisation, no EM
    /// epoch) or kmeans (k-means centroids of the same patches). random, patches and kmeans
    /// see the images whitened as the model's. May be repeated.
    #[arg(long, value_enum, value_name = "KIND")]
    pub baseline: Vec<Baseline>,
    /// Where the features are computed: a hardware GPU if auto finds one, else the CPU engine
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
    /// Images per batch when computing features; bounds memory only
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Inverse L2 strength of the probe (scikit-learn's C)
    #[arg(long, default_value_t = 1.0)]
    pub c: f64,
    /// Iteration cap of the probe's L-BFGS
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Standardise features before the probe (the paper's probe does not) [default: the model's
    /// recipe, else off]
    #[arg(long)]
    pub standardize: bool,
    /// Hold out the last FRACTION of the training images as a validation set and report accuracy
    /// on it instead of the test set (for choosing settings without looking at the test set)
    #[arg(long, value_name = "FRACTION")]
    pub val_split: Option<f64>,
    /// Pool L over a G x G grid of regions for the CALM and random-kernel features (1: SPEC's
    /// image-wide features) [default: the model's recipe, else 1]
    #[arg(long, value_name = "G")]
    pub pool: Option<usize>,
    /// Encoding of L before pooling, for the CALM and random-kernel features: lse (SPEC's
    /// log-sum-exp) or triangle (per patch, how much closer than average to each kernel; summed
    /// over each region)
    /// [default: the model's recipe, else lse]
    #[arg(long, value_parser = values::encoding())]
    pub encode: Option<Encoding>,
    /// Write the results (accuracies, confusion matrices, iterations) as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace --json if it exists
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    Raw,
    Random,
    Patches,
    Kmeans,
}

impl From<&Baseline> for calm_gpu::eval::Baseline {
    fn from(b: &Baseline) -> Self {
        match b {
            Baseline::Raw => Self::Raw,
            Baseline::Random => Self::Random,
            Baseline::Patches => Self::Patches,
            Baseline::Kmeans => Self::KMeans,
        }
    }
}

/// A labelled dataset for the probe, preprocessed as the model's training data was.
fn labelled(
    images: Option<&PathBuf>,
    labels: Option<&PathBuf>,
    split: data::Split,
    pre: Preprocess,
    what: &str,
) -> Result<(Arc<dyn ImageSource>, Vec<u8>)> {
    let Some(path) = images else {
        if labels.is_some() {
            bail!("--{what}-labels needs --{what}");
        }
        let d = data::embedded_digits(split);
        let y = d.labels.clone().expect("the shipped digits carry labels");
        if pre != Preprocess::Scale {
            bail!(
                "the model was trained with --preprocess {pre}; give --{what} data to evaluate it on"
            );
        }
        return Ok((Arc::new(d), y));
    };
    let d = data::load_with(path, Some(pre))?;
    let y = match (labels, &d.labels) {
        (Some(l), Some(_)) => bail!(
            "{}: this format carries its own labels, so --{what}-labels {} would replace them; drop --{what}-labels",
            path.display(),
            l.display()
        ),
        (Some(l), None) => data::load_labels(l)?,
        (None, Some(y)) => y.clone(),
        (None, None) => bail!(
            "{}: no labels in this format; give --{what}-labels",
            path.display()
        ),
    };
    if y.len() != d.len() {
        bail!(
            "{}: {} images but {} labels",
            path.display(),
            d.len(),
            y.len()
        );
    }
    Ok((Arc::new(d), y))
}

/// The observer that shows [`evaluate`]'s work on a terminal: a bar of images for each feature
/// set, then one of L-BFGS iterations for each probe (the fit of a large feature set takes
/// minutes).
fn progress_bars() -> impl FnMut(&EvalEvent) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut set = String::new();
    move |e| match *e {
        EvalEvent::FeaturesStarted { images, .. } => {
            bar = super::progress_bar(false, images);
            if let Some(b) = &bar {
                b.set_message("features");
            }
        }
        EvalEvent::Features { done } => {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        }
        EvalEvent::ProbeStarted {
            set: name,
            max_iter,
        } => {
            set = name.to_string();
            bar = super::progress_bar(false, max_iter);
            if let Some(b) = &bar {
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {pos}/{len} L-BFGS iterations (at most)  {elapsed}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(format!("probe on {set}"));
            }
        }
        EvalEvent::Probe(p) => {
            if let Some(b) = &bar {
                b.set_position(p.iteration as u64);
                b.set_message(format!("probe on {set}: loss {:.5}", p.loss));
            }
        }
        EvalEvent::FeaturesFinished | EvalEvent::ProbeFinished => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    }
}

/// The arguments after `--preset`, checked before any data is read.
fn checked(mut a: EvalArgs) -> Result<EvalArgs> {
    if let Some(p) = a.pool {
        check_positive("pool", p)?;
    }
    check_positive("max-iter", a.max_iter)?;
    // The probe refuses it too, but only after the features are computed (minutes on a large
    // set); say so before any work.
    if !(a.c > 0.0 && a.c.is_finite()) {
        bail!("--c must be a positive finite number (got {})", a.c);
    }
    if a.preset == Some(Preset::Recommended) {
        if a.pool.is_some_and(|p| p != 1) || a.encode.is_some_and(|e| e != Encoding::Lse) {
            bail!(
                "--preset recommended sets --pool {} --encode {}; drop --pool and --encode",
                RECOMMENDED.pool,
                RECOMMENDED.encoding
            );
        }
        a.pool = Some(RECOMMENDED.pool);
        a.encode = Some(RECOMMENDED.encoding);
        a.standardize = true;
    }
    check_positive("batch", a.batch)?;
    if a.val_split.is_some() && (a.test.is_some() || a.test_labels.is_some()) {
        bail!(
            "--val-split holds out part of the training set ({}), so --test is not used; drop --test and --test-labels, or --val-split",
            if a.train.is_some() {
                "--train"
            } else {
                "the shipped digits"
            }
        );
    }
    if let Some(j) = &a.json {
        check_output(j, a.force)?;
        let inputs: Vec<&Path> = std::iter::once(&a.model)
            .chain(&a.train)
            .chain(&a.train_labels)
            .chain(&a.test)
            .chain(&a.test_labels)
            .map(PathBuf::as_path)
            .collect();
        check_distinct(&inputs, &[j])?;
    }
    Ok(a)
}

/// The probe's training and held-out sets (the held-out one named "test" or "validation"),
/// preprocessed as the model's training data was.
fn probe_sets(a: &EvalArgs, pre: Preprocess) -> Result<(Labelled, Labelled, &'static str)> {
    let (xtr, ytr) = labelled(
        a.train.as_ref(),
        a.train_labels.as_ref(),
        data::Split::Train,
        pre,
        "train",
    )?;
    let (xtr, ytr, xte, yte, held_out) = match a.val_split {
        Some(f) => {
            if !(f > 0.0 && f < 1.0) {
                bail!("--val-split must be between 0 and 1 (got {f})");
            }
            if xtr.len() < 2 {
                bail!(
                    "--val-split needs at least 2 training images, one to fit and one to hold out (got {})",
                    xtr.len()
                );
            }
            let n_val = ((xtr.len() as f64 * f).round() as usize).clamp(1, xtr.len() - 1);
            let n_fit = xtr.len() - n_val;
            let fit: Arc<dyn ImageSource> = Arc::new(data::Subset::new(xtr.clone(), 0, n_fit)?);
            let val: Arc<dyn ImageSource> = Arc::new(data::Subset::new(xtr, n_fit, n_val)?);
            (
                fit,
                ytr[..n_fit].to_vec(),
                val,
                ytr[n_fit..].to_vec(),
                "validation",
            )
        }
        None => {
            let (xte, yte) = labelled(
                a.test.as_ref(),
                a.test_labels.as_ref(),
                data::Split::Test,
                pre,
                "test",
            )?;
            (xtr, ytr, xte, yte, "test")
        }
    };
    // One set given and the other the shipped digits: say so, and refuse where the shapes show
    // that the two cannot be the same kind of images.
    let shipped = match (&a.train, &a.test, a.val_split) {
        (Some(_), None, None) => Some(("--train", "tested on", "--test")),
        (None, Some(_), None) => Some(("--test", "fitted on", "--train")),
        _ => None,
    };
    if let Some((given, role, missing)) = shipped {
        if xtr.shape() != xte.shape() {
            bail!(
                "{given} images are {:?} (C, H, W) but the probe would be {role} the shipped digits {:?}; give {missing} too",
                if given == "--train" {
                    xtr.shape()
                } else {
                    xte.shape()
                },
                if given == "--train" {
                    xte.shape()
                } else {
                    xtr.shape()
                },
            );
        }
        eprintln!("note: the probe is {role} the shipped digits (no {missing} given)");
    }
    if a.baseline.contains(&Baseline::Raw) && xtr.shape() != xte.shape() {
        bail!(
            "training images are {:?} (C, H, W) but {held_out} images {:?}; the raw-pixel baseline needs one shape",
            xtr.shape(),
            xte.shape()
        );
    }
    let train = Labelled {
        images: xtr,
        labels: ytr,
    };
    let test = Labelled {
        images: xte,
        labels: yte,
    };
    Ok((train, test, held_out))
}

/// The table of probe results and the first row's confusion matrix.
fn print_rows(rows: &[EvalRow], held_out: &str) {
    println!(
        "{:<34} {:>6} {:>10} {:>10} {:>10} {:>9}",
        "features",
        "dims",
        "train acc",
        if held_out == "test" {
            "test acc"
        } else {
            "val acc"
        },
        "iterations",
        "seconds"
    );
    for r in rows {
        println!(
            "{:<34} {:>6} {:>9.2}% {:>9.2}% {:>6}{:<4} {:>9.1}",
            r.features,
            r.dims,
            100.0 * r.report.train_acc,
            100.0 * r.report.test_acc,
            r.report.iterations,
            if r.report.converged { "" } else { " cap" },
            r.seconds
        );
    }
    println!(
        "confusion matrix of {} on the {held_out} set (rows: true class, columns: predicted):",
        rows[0].features
    );
    for (i, row) in rows[0].report.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
        println!("  {i:>2} {}", cells.join(""));
    }
}

pub fn eval(a: EvalArgs) -> Result<Vec<EvalRow>> {
    let a = checked(a)?;
    let net = Network::load(&a.model)?;
    if !net.is_single() {
        check_network(&net, a.pool.is_some() || a.encode.is_some())?;
    }
    let model = net.first();
    let pre = model_preprocess(model)?;
    // The model's own recipe (train --preset recommended keeps one) unless a flag says otherwise.
    if let Some(head) = net.spec.links.get(net.spec.layers.len() - 1) {
        eprintln!("note: features by the network's head `{head}`");
    }
    let (pool, encode, standardize) = match model.meta.features {
        Some(r) if net.spec.has_head() => (r.grid, r.encoding, r.standardize),
        Some(r) if a.pool.is_none() && a.encode.is_none() && !a.standardize => {
            eprintln!(
                "note: features by the model's recipe: {r} (--pool, --encode and --standardize override)"
            );
            (r.grid, r.encoding, r.standardize)
        }
        _ => (
            a.pool.unwrap_or(1),
            a.encode.unwrap_or_default(),
            a.standardize,
        ),
    };
    let (train, test, held_out) = probe_sets(&a, pre)?;
    let (xtr, ytr, xte, yte) = (&train.images, &train.labels, &test.images, &test.labels);
    let n_classes = ytr
        .iter()
        .chain(yte)
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1)
        .max(2);
    let cfg = EvalConfig {
        device: a.backend,
        gpu: super::gpu_config()?,
        batch: a.batch,
        pooling: Pooling {
            grid: pool,
            encoding: encode,
        },
        probe: calm_gpu::probe::ProbeConfig {
            c: a.c,
            max_iter: a.max_iter,
            standardize,
            ..Default::default()
        },
        baselines: a.baseline.iter().map(|b| b.into()).collect(),
        kmeans: Default::default(),
        cancel: super::stop_token().clone(),
    };
    // The layer must fit both sets before any features are computed.
    for x in [xtr, xte] {
        match net.is_single() {
            true => drop(model_geometry_for(model, x.as_ref())?),
            false => network_fits(&net, x.as_ref())?,
        }
    }
    println!(
        "probe: softmax regression, L2 with C = {}, L-BFGS to gradient {} or {} iterations; {} train / {} {held_out} images, {n_classes} classes",
        cfg.probe.c,
        cfg.probe.tol,
        cfg.probe.max_iter,
        ytr.len(),
        yte.len()
    );
    let rows = evaluate_network(&net, &train, &test, &cfg, &mut progress_bars())?;
    print_rows(&rows, held_out);
    if let Some(j) = &a.json {
        let text = serde_json::to_string_pretty(
            &serde_json::json!({ "model": a.model, "held_out": held_out, "pool": pool, "encode": encode, "standardize": standardize, "results": rows }),
        )?;
        model::write_atomic(j, text.as_bytes(), a.force)?;
    }
    Ok(rows)
}
