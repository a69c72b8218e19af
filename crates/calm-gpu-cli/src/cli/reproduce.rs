//! `calm-gpu reproduce`: one of the paper's protocols end to end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use super::values;
use calm_gpu::Device;
use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::model::Model;
use calm_gpu::{LayerConfig, data, model};

use super::eval::{Baseline, EvalArgs, eval};
use super::outputs::check_output;
use super::show::{ShowArgs, show};
use super::train::{RunConfig, fit_run};
use super::{Preset, RECOMMENDED, check_positive};
use calm_gpu::CalmParams;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolName {
    /// MNIST: the four standard IDX files (raw or .gz) in --data-dir
    Mnist,
    /// Fashion-MNIST, same layout; default --data-dir is Debian's dataset-fashion-mnist
    Fashion,
    /// STL-10 binary: train_X.bin, train_y.bin, test_X.bin, test_y.bin and, if present,
    /// unlabeled_X.bin in --data-dir
    Stl10,
}

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct ReproduceArgs {
    /// The reference protocol to run (SPEC.md)
    #[arg(value_enum)]
    pub protocol: ProtocolName,
    /// Run calm-gpu's recommended configuration instead of the paper's (training and probe)
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Where the dataset's files are
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the model, results.md, results.json and the pictures go (default results/<protocol>)
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Where EM and the features run: a hardware GPU if auto finds one, else the CPU engine
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
    /// Override the protocol's number of epochs (e.g. for a quick look)
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override the protocol's batch size
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the initial weights (and of data-patch draws and revival)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With --preset recommended: the eps of its contrast-normalised patches (0.01), or off for
    /// raw patches, as `train --patch-norm`
    #[arg(long, value_name = "EPS|off", requires = "preset", value_parser = values::patch_norm())]
    pub patch_norm: Option<values::PatchNorm>,
    /// Replace earlier results in --out-dir
    #[arg(long)]
    pub force: bool,
}

/// The first of `names` that exists in `dir`.
fn find_in(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    for n in names {
        let p = dir.join(n);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{}: none of {} found", dir.display(), names.join(", "))
}

fn idx_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let f = |stem: &str| find_in(dir, &[&format!("{stem}.gz"), stem]);
    Ok([
        f("train-images-idx3-ubyte")?,
        f("train-labels-idx1-ubyte")?,
        f("t10k-images-idx3-ubyte")?,
        f("t10k-labels-idx1-ubyte")?,
    ])
}

/// What a protocol's run reads and writes, settled (and its outputs and label files checked)
/// before any work.
struct Plan {
    name: String,
    out: PathBuf,
    model_path: PathBuf,
    train_data: Vec<PathBuf>,
    /// Images and labels the probe is fitted on, and scored on.
    probe_train: (PathBuf, PathBuf),
    probe_test: (PathBuf, PathBuf),
    layer: LayerConfig,
    batch: usize,
    epochs: usize,
    pre: Preprocess,
    /// `--preset recommended` on MNIST-shaped data, which brings its own layer.
    mnist_preset: bool,
}

/// `calm-gpu reproduce`: a protocol's steps in order (train, show, probe, the results page).
pub(super) fn reproduce(a: ReproduceArgs) -> Result<()> {
    let plan = plan(&a)?;
    let train_secs = train_step(&a, &plan)?;
    let rows = probe_step(&a, &plan)?;
    let md = results_md(&a, &plan, &rows, train_secs)?;
    let out = &plan.out;
    model::write_atomic(&out.join("results.md"), md.as_bytes(), true)?;
    println!("wrote {}", out.join("results.md").display());
    Ok(())
}

fn plan(a: &ReproduceArgs) -> Result<Plan> {
    let name = format!("{:?}", a.protocol).to_lowercase();
    let dir = match (&a.data_dir, a.protocol) {
        (Some(d), _) => d.clone(),
        (None, ProtocolName::Fashion) => PathBuf::from("/usr/share/datasets/fashion-mnist"),
        (None, _) => bail!("--data-dir is needed for {name}"),
    };
    let out = a
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("results").join(&name));
    if out.exists() && !out.is_dir() {
        bail!("--out-dir {} is a file; name a directory", out.display());
    }
    // Before any folder is made or file read.
    for (name, v) in [("epochs", a.epochs), ("batch", a.batch)] {
        if let Some(v) = v {
            check_positive(name, v)?;
        }
    }
    if let Some(values::PatchNorm(Some(eps))) = a.patch_norm {
        CalmParams::new(1)
            .patch_norm(eps)
            .check()
            .map_err(super::train::flag_error)?;
    }
    let model_path = out.join("model.safetensors");
    // (train data, train images + labels for the probe, test images + labels, K, w, p, batch, epochs, preprocess)
    let (train_data, probe_train, probe_test, layer, batch, epochs, pre) = match a.protocol {
        ProtocolName::Mnist | ProtocolName::Fashion => {
            let [xtr, ytr, xte, yte] = idx_files(&dir)?;
            (
                vec![xtr.clone()],
                (xtr, ytr),
                (xte, yte),
                LayerConfig {
                    kernels: 64,
                    width: 20,
                    pad: 2,
                },
                1000,
                15,
                Preprocess::Scale,
            )
        }
        ProtocolName::Stl10 => {
            let xtr = find_in(&dir, &["train_X.bin"])?;
            let ytr = find_in(&dir, &["train_y.bin"])?;
            let xte = find_in(&dir, &["test_X.bin"])?;
            let yte = find_in(&dir, &["test_y.bin"])?;
            let mut train = vec![xtr.clone()];
            if let Ok(u) = find_in(&dir, &["unlabeled_X.bin"]) {
                train.push(u);
            }
            (
                train,
                (xtr, ytr),
                (xte, yte),
                LayerConfig {
                    kernels: 200,
                    width: 15,
                    pad: 0,
                },
                200,
                10,
                Preprocess::ZcaImage,
            )
        }
    };
    // Everything this run writes is refused up front without --force (nothing trained first),
    // and the probe's label files are read before the training they would follow.
    for f in [
        "model.safetensors",
        "metrics.jsonl",
        "loglik.png",
        "kernels.png",
        "results.json",
        "results.md",
    ] {
        check_output(&out.join(f), a.force)?;
    }
    for (images, labels) in [&probe_train, &probe_test] {
        let y = data::load_labels(labels)?;
        let n = data::open_source(images, Some(Preprocess::None))?.len();
        if y.len() != n {
            bail!(
                "{}: {n} images but {} labels in {}",
                images.display(),
                y.len(),
                labels.display()
            );
        }
    }
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let mnist_preset = a.preset == Some(Preset::Recommended) && a.protocol != ProtocolName::Stl10;
    let (layer, epochs) = if mnist_preset {
        (RECOMMENDED.layer, a.epochs.unwrap_or(RECOMMENDED.epochs))
    } else {
        (layer, a.epochs.unwrap_or(epochs))
    };
    let batch = a.batch.unwrap_or(batch);
    Ok(Plan {
        name,
        out,
        model_path,
        train_data,
        probe_train,
        probe_test,
        layer,
        batch,
        epochs,
        pre,
        mnist_preset,
    })
}

/// Trains the protocol's model through the library's Trainer with what `train` writes around
/// it (the model, metrics and the LL plot in the output folder); returns the seconds it took.
fn train_step(a: &ReproduceArgs, plan: &Plan) -> Result<f64> {
    let Plan {
        name,
        layer,
        batch,
        epochs,
        pre,
        ..
    } = plan;
    println!(
        "== {name}: training K={} w={} p={}, batch {batch}, {epochs} epochs, preprocess {pre}{}",
        layer.kernels,
        layer.width,
        layer.pad,
        if a.preset.is_some() {
            " (--preset recommended)"
        } else {
            ""
        }
    );
    let t0 = std::time::Instant::now();
    let cfg = run_config(a, plan);
    // The environment's GPU configuration joins here, as for `train`.
    let params = cfg.params()?;
    fit_run(cfg, params, None, false)?;
    let train_secs = t0.elapsed().as_secs_f64();
    Ok(train_secs)
}

/// The library's parameters of the protocol's training (`--preset recommended`: whitening,
/// data-patch initialisation, revival and the feature recipe), and the run that writes the
/// model, its metrics and its LL plot into the output folder.
fn run_config(a: &ReproduceArgs, plan: &Plan) -> RunConfig {
    let base = if a.preset == Some(Preset::Recommended) {
        CalmParams::recommended()
    } else {
        CalmParams::new(plan.layer.kernels)
    };
    let params = CalmParams {
        layer: plan.layer,
        ..base
    }
    .batch(plan.batch)
    .epochs(plan.epochs)
    .seed(a.seed)
    .device(a.backend);
    let patch_norm = match a.patch_norm {
        Some(values::PatchNorm(eps)) => eps,
        // STL-10 keeps raw patches, as its layer (nothing measured them normalised).
        None if !plan.mnist_preset => None,
        None => params.patch_norm,
    };
    let params = CalmParams {
        patch_norm,
        ..params
    };
    RunConfig::from_params(
        &params,
        &plan.train_data,
        plan.pre,
        &plan.model_path,
        Some(&plan.out.join("metrics.jsonl")),
        Some(&plan.out.join("loglik.png")),
        a.force,
    )
}

/// The kernels' picture, then the probe on the model's features and the baselines'.
fn probe_step(a: &ReproduceArgs, plan: &Plan) -> Result<Vec<calm_gpu::eval::EvalRow>> {
    let Plan {
        name,
        out,
        model_path,
        probe_train,
        probe_test,
        batch,
        ..
    } = plan;
    let batch = *batch;
    // The model is new now: results of an earlier run in this folder (--force) describe a model
    // that is gone, and go before the probe, so that a run stopped during it leaves no
    // mismatched pair behind (the probe writes them again).
    for f in ["results.json", "results.md"] {
        let p = out.join(f);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
        }
    }
    show(ShowArgs {
        model: model_path.clone(),
        out: Some(out.join("kernels.png")),
        plot: None,
        per_row: 8,
        scale: None,
        force: true,
    })?;
    println!(
        "== {name}: linear probe on CALM features and on the baselines: raw pixels, random kernels, data patches, k-means"
    );
    let rows = eval(EvalArgs {
        model: model_path.clone(),
        preset: a.preset,
        train: Some(probe_train.0.clone()),
        train_labels: Some(probe_train.1.clone()),
        test: Some(probe_test.0.clone()),
        test_labels: Some(probe_test.1.clone()),
        baseline: vec![
            Baseline::Raw,
            Baseline::Random,
            Baseline::Patches,
            Baseline::Kmeans,
        ],
        backend: a.backend,
        batch,
        c: 1.0,
        max_iter: 1000,
        standardize: false,
        pool: None,
        encode: None,
        val_split: None,
        json: Some(out.join("results.json")),
        force: true,
    })?;
    Ok(rows)
}

/// The results page: the run, the probe table, the kernels' use and the two pictures.
fn results_md(
    a: &ReproduceArgs,
    plan: &Plan,
    rows: &[calm_gpu::eval::EvalRow],
    train_secs: f64,
) -> Result<String> {
    let Plan {
        name,
        model_path,
        train_data,
        layer,
        batch,
        epochs,
        mnist_preset,
        ..
    } = plan;
    let m = Model::load(model_path)?;
    let last = m.meta.history.last();
    let mut md = match a.preset {
        None => format!("# calm-gpu: the {name} protocol\n\n"),
        Some(_) => format!(
            "# calm-gpu: the {name} protocol, calm-gpu's recommended configuration\n\nImages whitened over 7x7 patches, data-patch initialisation, revival{}{}; the probe sees the triangle encoding summed over a 4x4 grid, standardised.\n\n",
            if *mnist_preset {
                ", K 128 kernels of 8x8 without padding"
            } else {
                ", the protocol's layer"
            },
            match m.patch_norm() {
                Some(eps) => format!(", every patch contrast-normalised (--patch-norm {eps})"),
                None => String::new(),
            }
        ),
    };
    md.push_str(&format!(
        "`calm-gpu reproduce {name}` on {}. Data: {}.\n\n",
        m.meta.engine,
        train_data
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    md.push_str(&format!(
        "Training: {} images, K = {}, w = {}, p = {}, batch {batch}, {} of {epochs} epochs, preprocessing {}, seed {}; {:.1} s in all; final LL per image {}.{}\n\n",
        m.meta.images,
        layer.kernels,
        layer.width,
        layer.pad,
        m.meta.history.len(),
        m.meta.preprocess,
        a.seed,
        train_secs,
        last.map_or("-".into(), |h| format!("{:.4}", h.loglik / m.meta.images as f64)),
        m.meta.stopped.as_ref().map(|s| format!(" Stopped early: {s}.")).unwrap_or_default()
    ));
    md.push_str(
        "Linear probe (softmax regression, L2 with C = 1 as scikit-learn's default, L-BFGS):\n\n",
    );
    md.push_str("| features | dims | train accuracy | test accuracy | probe iterations |\n|---|---|---|---|---|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:.2}% | {:.2}% | {}{} |\n",
            r.features,
            r.dims,
            100.0 * r.report.train_acc,
            100.0 * r.report.test_acc,
            r.report.iterations,
            if r.report.converged { "" } else { " (cap)" }
        ));
    }
    let usage = model::kernel_use(&m.theta, &m.counts);
    md.push_str(&format!(
        "\nKernels with count < 1 (unused): {} of {}; distinct (none within 1% relative distance of another): {}.\n\n",
        usage.unused,
        m.counts.len(),
        usage.distinct
    ));
    md.push_str("![kernels](kernels.png)\n\n![log likelihood](loglik.png)\n");
    Ok(md)
}
