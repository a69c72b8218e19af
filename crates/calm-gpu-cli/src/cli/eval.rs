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
use calm_gpu::features::Pooling;
use calm_gpu::model::Model;
use calm_gpu::{data, em, model, run};

use super::outputs::{check_distinct, check_output};
use super::{Preset, RECOMMENDED, check_positive, model_geometry_for, model_preprocess, whitened};

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
    /// Also fit the same probe on other features: raw (the pixels) or random (untrained kernels
    /// with the model's K, w, p and seed). May be repeated.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    Raw,
    Random,
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

/// Makes the training and test features of one probe.
type FeaturePair<'a> = Box<dyn Fn() -> Result<(ndarray::Array2<f32>, ndarray::Array2<f32>)> + 'a>;

/// One probe: its name, feature count, report and time.
#[derive(serde::Serialize)]
pub struct EvalRow {
    pub features: String,
    pub dims: usize,
    pub seconds: f64,
    #[serde(flatten)]
    pub report: calm_gpu::probe::ProbeReport,
}

fn flatten(src: &dyn ImageSource) -> Result<ndarray::Array2<f32>> {
    let (c, h, w) = src.shape();
    let mut x = vec![0f32; src.len() * c * h * w];
    src.read_into(0, src.len(), &mut x)?;
    Ok(ndarray::Array2::from_shape_vec((src.len(), c * h * w), x)?)
}

// About 290 lines: the checks, the data, the feature sets and the probe table in order. It
// should be split like train (resolve settings, build features, probe, report); left for the
// next step of issue 19.
pub fn eval(mut a: EvalArgs) -> Result<Vec<EvalRow>> {
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
    let model = Model::load(&a.model)?;
    let pre = model_preprocess(&model)?;
    // The model's own recipe (train --preset recommended keeps one) unless a flag says otherwise.
    let (pool, encode, standardize) = match model.meta.features {
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
    let n_classes = ytr
        .iter()
        .chain(&yte)
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1)
        .max(2);
    let cfg = calm_gpu::probe::ProbeConfig {
        c: a.c,
        max_iter: a.max_iter,
        standardize,
        ..Default::default()
    };
    let g_tr = model_geometry_for(&model, xtr.as_ref())?;
    let g_te = model_geometry_for(&model, xte.as_ref())?;
    // Features of the probe's training and held-out images under `theta`.
    let pooling = Pooling {
        grid: pool,
        encoding: encode,
    };
    // The model's layer sees its images whitened as in training (when it was).
    let (wtr, wte) = (
        whitened(&model, xtr.clone())?,
        whitened(&model, xte.clone())?,
    );
    let gpu = super::gpu_config()?;
    let pair = |theta: &[f32],
                prior: &calm_gpu::prior::Prior,
                sets: (&Arc<dyn ImageSource>, &Arc<dyn ImageSource>)|
     -> Result<(ndarray::Array2<f32>, ndarray::Array2<f32>)> {
        let f = |g, x: &Arc<dyn ImageSource>| {
            let bar = super::progress_bar(false, x.len());
            if let Some(b) = &bar {
                b.set_message("features");
            }
            let f = run::features(
                a.backend,
                g,
                x.clone(),
                theta,
                prior,
                a.batch,
                pooling,
                &gpu,
                super::stop_token(),
                &mut |done| {
                    if let Some(b) = &bar {
                        b.set_position(done as u64);
                    }
                },
            );
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            f
        };
        Ok((f(g_tr, sets.0)?, f(g_te, sets.1)?))
    };
    let mut sets: Vec<(String, FeaturePair<'_>)> = vec![(
        format!(
            "calm (K={}{}{})",
            model.meta.layer.kernels,
            if pool > 1 {
                format!(", pool {0}x{0}", pool)
            } else {
                String::new()
            },
            if encode == Encoding::Lse {
                String::new()
            } else {
                format!(", {}", encode)
            }
        ),
        Box::new(|| pair(&model.theta, &model.prior_or_uniform(), (&wtr, &wte))),
    )];
    for b in &a.baseline {
        match b {
            Baseline::Raw => sets.push((
                "raw pixels".into(),
                Box::new(|| Ok((flatten(xtr.as_ref())?, flatten(xte.as_ref())?))),
            )),
            Baseline::Random => sets.push((
                format!(
                    "random kernels (K={}, seed {})",
                    model.meta.layer.kernels, model.meta.seed
                ),
                Box::new(|| {
                    pair(
                        &em::init_theta(&g_tr, model.meta.seed),
                        &calm_gpu::prior::Prior::uniform(g_tr.k),
                        (&xtr, &xte),
                    )
                }),
            )),
        }
    }
    println!(
        "probe: softmax regression, L2 with C = {}, L-BFGS to gradient {} or {} iterations; {} train / {} {held_out} images, {n_classes} classes",
        cfg.c,
        cfg.tol,
        cfg.max_iter,
        ytr.len(),
        yte.len()
    );
    let mut rows = Vec::new();
    for (name, make) in &sets {
        let t0 = std::time::Instant::now();
        let (ftr, fte) = make()?;
        let (_, report) =
            calm_gpu::probe::fit_and_evaluate(ftr.view(), &ytr, fte.view(), &yte, n_classes, &cfg)?;
        rows.push(EvalRow {
            features: name.clone(),
            dims: ftr.ncols(),
            seconds: t0.elapsed().as_secs_f64(),
            report,
        });
    }
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
    for r in &rows {
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
    if let Some(j) = &a.json {
        let text = serde_json::to_string_pretty(
            &serde_json::json!({ "model": a.model, "held_out": held_out, "pool": pool, "encode": encode, "standardize": standardize, "results": rows }),
        )?;
        model::write_atomic(j, text.as_bytes(), a.force)?;
    }
    Ok(rows)
}
