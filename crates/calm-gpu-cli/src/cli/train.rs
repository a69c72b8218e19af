//! `calm-gpu train`: a fresh run from the arguments or the run a checkpoint describes, with the optional preprocessed-data cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

mod net;

use super::values;
use calm_gpu::data::ImageSource;
use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::em::Event;
use calm_gpu::model::{FeatureRecipe, Model};
use calm_gpu::net::NetSpec;
use calm_gpu::prior::PriorOptions;
use calm_gpu::{CalmParams, Checkpoint, DataInfo, Device, LayerConfig, Trainer, data, em, model};

use super::outputs::{check_distinct, check_output, create_parent};
use super::show::write_plot;
use super::{
    Preset, RECOMMENDED, absolute, backend_from_name, install_ctrl_c, load_data, progress_bar,
};

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// Training data: MNIST/Fashion-MNIST IDX (raw or .gz, pixels / 255) or .npy float32 (N,C,H,W) or
    /// (N,H,W). May be given several times (same image shape). Without it, the 8,000 real MNIST
    /// digits shipped inside calm-gpu are used.
    #[arg(long, value_name = "PATH")]
    pub data: Vec<PathBuf>,
    /// Where to run [default: auto; with --resume, the checkpoint's]
    #[arg(long, value_parser = values::device())]
    pub backend: Option<Device>,
    /// Number of kernels K [default: 64; 128 with --preset recommended]
    #[arg(long)]
    pub kernels: Option<usize>,
    /// Kernel width w (kernels are w x w) [default: 20; 8 with --preset recommended]
    #[arg(long)]
    pub width: Option<usize>,
    /// Zero padding p [default: 2; 0 with --preset recommended]
    #[arg(long)]
    pub pad: Option<usize>,
    /// Images per batch; bounds memory only (theta is fixed for the whole epoch)
    /// [default: 1000]
    #[arg(long)]
    pub batch: Option<usize>,
    /// EM iterations (passes over the data) [default: 15; 10 with --preset recommended]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed of the initial weights (N(0,1) draws or data patches) and of revival
    /// [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start from these weights instead: a .npy float32 (K,C,w,w) or a saved model
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// The model file to write (safetensors)
    /// [default: calm-model.safetensors]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write one JSON object per epoch to this file (JSON lines)
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Replace --out and --metrics if they exist (otherwise an existing file is refused)
    #[arg(long)]
    pub force: bool,
    /// Print only the final summary
    #[arg(long, short)]
    pub quiet: bool,
    /// Write a checkpoint here after every epoch (atomically); `--resume DIR` continues from it.
    /// Without it, Ctrl-C still leaves one in `<out>.checkpoint/`.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// How theta starts: normal (i.i.d. N(0,1), SPEC's) or patches (random patches of the data)
    /// [default: normal; patches with --preset recommended]
    #[arg(long, value_parser = values::init_method())]
    pub init_method: Option<em::InitMethod>,
    /// After each epoch, re-seed kernels with count < 1, or that copy another kernel (within
    /// 1%), with the data patches worst explained by the other kernels; if the last epoch leaves such kernels, up to 3 more epochs
    /// run to train their replacements
    #[arg(long)]
    pub revive: bool,
    /// Stop early once LL changes by less than this fraction between epochs
    #[arg(long, value_name = "FRACTION")]
    pub tol: Option<f64>,
    /// Whiten the images with a ZCA filter fitted on W x W patches of the training data (applied
    /// as a convolution; kept in the model and applied again by features and eval)
    #[arg(long, value_name = "W")]
    pub whiten: Option<usize>,
    /// Learn mixing weights over the kernels in the M-step (SPEC: uniform); kept in the model
    #[arg(long)]
    pub learn_weights: bool,
    /// Learn the patches' variance in the M-step (SPEC: 1), i.e. the posterior's temperature;
    /// kept in the model
    #[arg(long)]
    pub learn_variance: bool,
    /// The patches' variance sigma^2 the fit starts from (SPEC: 1), kept fixed unless
    /// --learn-variance: the posterior's temperature (L is divided by it); kept in the model
    #[arg(long, value_name = "F")]
    pub variance: Option<f64>,
    /// Over what each posterior is normalised: image (SPEC: one mixture over kernels and
    /// positions per image) or patch (every patch its own mixture over the kernels, a Gaussian
    /// mixture over patches; the CPU engine only, for now); kept in the model
    #[arg(long, value_enum)]
    pub posterior: Option<PosteriorArg>,
    /// Contrast-normalise every patch before the layer sees it, (x - mean) / sqrt(var + EPS)
    /// over its values (Coates, Lee & Ng 2011), in training and in the model's features; kept
    /// in the model. EPS is in the units of the patches' variance: 0.01 suits pixels / 255
    /// whitened over 7x7 patches [default: off; 0.01 with --preset recommended]
    #[arg(long, value_name = "EPS|off", value_parser = values::patch_norm())]
    pub patch_norm: Option<values::PatchNorm>,
    /// paper: every choice exactly as SPEC.md (N(0,1) init, no revival, fixed epochs); refuses
    /// options that would change that
    #[arg(long, value_enum, conflicts_with = "preset")]
    pub protocol: Option<TrainProtocol>,
    /// recommended: the configuration docs/results.md's ablation chose: images whitened over
    /// 7x7 patches, K 128 kernels of 8x8 without padding, every patch contrast-normalised
    /// (--patch-norm 0.01), data-patch initialisation with revival, 10 epochs (explicit
    /// --kernels/--width/--pad/--epochs/--whiten/--patch-norm still apply);
    /// evaluate with `eval --preset recommended`
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Preprocessing of every image: scale (x / 255), zca-image (per-image, per-channel ZCA, the
    /// STL-10 protocol's), none. Default: scale for 8-bit data, none for float data. Recorded in
    /// the model and applied again by `features` and `eval`.
    #[arg(long, value_name = "KIND")]
    pub preprocess: Option<Preprocess>,
    /// Draw LL per image against epoch into this PNG at the end
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Continue the run checkpointed in DIR from its last complete epoch, with its arguments.
    /// The command line that started the run may be given beside it: its training options must
    /// equal the checkpoint's (one that differs is named); --quiet, --plot, --force and
    /// --backend may change (a run checkpointed on a GPU may finish on the CPU)
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Write the preprocessed images once to this float32 .npy (plus FILE.json naming the data
    /// it holds) and read them from it every epoch: for preprocessing that costs more than the
    /// epoch (zca-image on STL-10's 105,000 images), when the data streams (CPU engine, or a GPU
    /// with less memory than the data). A later run with the same data reuses the file
    #[arg(long, value_name = "FILE.npy")]
    pub cache: Option<PathBuf>,
    /// A deep network of CALM layers, fitted greedily layer by layer (each on the one below's
    /// outputs) and written into --out as one file; e.g. "64x5p2 | tri max4s2p1 norm | 256x3p1 |
    /// tri max4s2p1". Parts are separated by `|`: a layer `KxW[pP] [whiteW] [varF]` (K kernels of
    /// W x W, padding P, its input whitened over W x W patches, its variance F: the posterior's
    /// temperature, default --variance), then a link to the next layer: an
    /// encoding of the layer's map (`tri`: the triangle relu(mean distance - distance); `tri^Q`
    /// raised to the power Q; `post`: the posterior; `logp`: L itself), an optional pooling
    /// (`maxN`, `avgN` or `lseN`, followed by `sS` for stride S [default N] and `pP` for padding P), and an
    /// optional `norm` (each channel standardised). A link after the last layer is the feature
    /// head: `features` and `eval` read its map flattened. The other options apply to every
    /// layer (--whiten to layer 1 only)
    #[arg(long, value_name = "SPEC", value_parser = values::net_spec(),
          conflicts_with_all = ["kernels", "width", "pad", "init", "protocol"])]
    pub net: Option<NetSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrainProtocol {
    /// SPEC.md's batch EM exactly, as the paper's code runs it
    Paper,
}

/// Everything a run needs to be repeated or resumed; kept in its checkpoints.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct RunConfig {
    data: Vec<PathBuf>,
    backend: String,
    kernels: usize,
    width: usize,
    pad: usize,
    batch: usize,
    epochs: usize,
    seed: u64,
    init: Option<PathBuf>,
    out: PathBuf,
    metrics: Option<PathBuf>,
    force: bool,
    checkpoint_dir: Option<PathBuf>,
    #[serde(default)]
    plot: Option<PathBuf>,
    #[serde(default)]
    preprocess: Option<Preprocess>,
    #[serde(default)]
    init_method: em::InitMethod,
    #[serde(default)]
    schedule: em::Schedule,
    #[serde(default)]
    cache: Option<PathBuf>,
    #[serde(default)]
    whiten: Option<usize>,
    #[serde(default)]
    variance: Option<f64>,
    #[serde(default)]
    posterior: calm_gpu::Posterior,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patch_norm: Option<f64>,
    /// The size in bytes of each `data` file when the run started (`None` for the shipped
    /// digits), so that `--resume` does not go on with other data under the same names.
    #[serde(default)]
    data_bytes: Option<Vec<Option<u64>>>,
    /// How the model's features are meant to be computed (`--preset recommended`'s).
    #[serde(default)]
    features: Option<FeatureRecipe>,
    /// `--net`: the layers and links of a deep network (`kernels`, `width` and `pad` are its
    /// first layer's).
    #[serde(default)]
    net: Option<NetSpec>,
}

/// The size of each data file now (`None` where it cannot be read, and for a folder of
/// images, whose own size says nothing about its files).
fn data_bytes(data: &[PathBuf]) -> Vec<Option<u64>> {
    data.iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
        })
        .collect()
}

/// What a `--cache` file holds: the inputs (path, size, modification time) and preprocessing.
fn cache_key(names: &[String], pre: Preprocess) -> serde_json::Value {
    let inputs: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let meta = std::fs::metadata(n).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            input_key(n, meta.map(|m| m.len()), modified)
        })
        .collect();
    serde_json::json!({ "inputs": inputs, "preprocess": pre.to_string() })
}

/// One input of a cache key. The modification time is kept as integer nanoseconds: a key must
/// read back from its JSON file equal to itself, and serde_json does not promise that a float
/// (seconds as f64) parses back to the same bits (CI once refused a run's own cache that way).
fn input_key(
    path: &str,
    bytes: Option<u64>,
    modified: Option<std::time::Duration>,
) -> serde_json::Value {
    serde_json::json!({
        "path": path,
        "bytes": bytes,
        "modified_ns": modified.map(|d| d.as_nanos().to_string()),
    })
}

/// `src` read through the float32 `.npy` cache at `path`, written first if absent (atomically,
/// with a `.json` key beside it); a cache of other data is refused rather than used.
fn cached(
    path: &Path,
    src: Arc<dyn ImageSource>,
    names: &[String],
    pre: Preprocess,
    quiet: bool,
) -> Result<Arc<dyn ImageSource>> {
    let key_path = PathBuf::from(format!("{}.json", path.display()));
    let key = cache_key(names, pre);
    if path.is_dir() {
        bail!(
            "--cache {} is a directory; give a file name",
            path.display()
        );
    }
    if path.exists() {
        let stored: Option<serde_json::Value> = std::fs::read(&key_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if stored.as_ref() != Some(&key) {
            if !key_path.exists() {
                bail!(
                    "--cache {}: the file exists but {} (what it holds) does not, so it was not written by calm-gpu's cache; name another file",
                    path.display(),
                    key_path.display()
                );
            }
            bail!(
                "--cache {}: it holds other data or preprocessing than this run's (see {}); delete both or name another file",
                path.display(),
                key_path.display()
            );
        }
    } else {
        check_output(path, false)?;
        create_parent(path)?;
        if !quiet {
            println!(
                "caching {} preprocessed images in {} (once)",
                src.len(),
                path.display()
            );
        }
        let tmp = PathBuf::from(format!("{}.partial", path.display()));
        data::npy::write_source_f32(&tmp, src.as_ref(), 256, |_| {})?;
        model::write_atomic(
            &key_path,
            serde_json::to_string_pretty(&key)?.as_bytes(),
            true,
        )?;
        std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    }
    let file = data::NpyFile::open(path)?;
    if file.len() != src.len() || file.shape() != src.shape() {
        bail!(
            "--cache {}: holds {} images of {:?}, the data {} of {:?}; delete it or name another file",
            path.display(),
            file.len(),
            file.shape(),
            src.len(),
            src.shape()
        );
    }
    Ok(Arc::new(file))
}

/// `--posterior`'s values ([`calm_gpu::Posterior`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PosteriorArg {
    /// SPEC's: per image, over kernels and positions
    Image,
    /// Per patch, over kernels (a Gaussian mixture over patches)
    Patch,
}

impl From<PosteriorArg> for calm_gpu::Posterior {
    fn from(p: PosteriorArg) -> Self {
        match p {
            PosteriorArg::Image => calm_gpu::Posterior::Image,
            PosteriorArg::Patch => calm_gpu::Posterior::Patch,
        }
    }
}

/// `calm-gpu train`: the run's outputs checked and locked, then its trainer built, then run and
/// written, in the order in which a refused run leaves nothing behind (tests/cli.rs checks it).
pub(super) fn train(a: TrainArgs) -> Result<()> {
    let quiet = a.quiet;
    let protocol = a.protocol;
    let (cfg, resume) = run_config(a)?;
    let params = cfg.params()?;
    if protocol == Some(TrainProtocol::Paper) && !params.is_spec_protocol() {
        bail!(
            "--protocol paper keeps SPEC's choices: drop --init-method, --revive, --tol, --whiten, --learn-weights, --learn-variance, --variance, --posterior and --patch-norm"
        );
    }
    match (&cfg.net, resume) {
        (Some(spec), resume) if is_deep(spec) => {
            let dir = match resume {
                Resume::Net(dir) => Some(dir),
                _ => None,
            };
            let params = calm_gpu::net::NetParams::new(spec.clone(), params);
            net::fit_net(cfg, params, dir, quiet)
        }
        (_, Resume::Layer(ck)) => fit_run(cfg, params, Some(*ck), quiet),
        _ => fit_run(cfg, params, None, quiet),
    }
}

/// Trains the run `cfg` describes through the library's [`Trainer`] (`params`, from
/// [`RunConfig::params`]), continuing `resume` where given, with everything `train` writes
/// around it: locks, metrics, the Ctrl-C checkpoint, the model and its plot.
pub(super) fn fit_run(
    cfg: RunConfig,
    params: CalmParams,
    resume: Option<Checkpoint>,
    quiet: bool,
) -> Result<()> {
    params.check().map_err(flag_error)?;
    // In an MPI job only rank 0 prints and writes.
    let root = super::parallel::is_root();
    let outputs = match root {
        true => Some(Outputs::claim(&cfg, resume.is_some(), quiet)?),
        false => None,
    };
    let quiet = quiet || !root;
    let trainer = start(&cfg, params, resume.clone(), quiet)?;
    run_and_write(trainer, &cfg, resume.is_some(), outputs, quiet)
}

/// Where a run writes besides its model, and the locks it holds until it returns.
struct Outputs {
    /// `--checkpoint-dir`, else `<out>.checkpoint` (written only on Ctrl-C).
    checkpoint_dir: PathBuf,
    _locks: [Option<calm_gpu::atomic::OutputLock>; 2],
}

impl Outputs {
    /// Checks every output before any work (`--force` to replace), and takes the locks: one run
    /// at a time per model file and per checkpoint directory.
    fn claim(cfg: &RunConfig, resuming: bool, quiet: bool) -> Result<Self> {
        check_output(&cfg.out, cfg.force)?;
        if let (Some(m), false) = (&cfg.metrics, resuming) {
            check_output(m, cfg.force)?;
        }
        if let Some(p) = &cfg.plot {
            check_output(p, cfg.force)?;
        }
        // Where checkpoints go: --checkpoint-dir after every epoch, else `<out>.checkpoint` on
        // Ctrl-C. A new run does not reuse a --checkpoint-dir that holds another run's checkpoint
        // without --force; an interrupted run's `<out>.checkpoint` only gets a note (scripts that
        // train "if the model is missing" must still run again after a Ctrl-C).
        let checkpoint_dir = cfg.checkpoint_dir.clone().unwrap_or_else(|| {
            let mut d = cfg.out.clone().into_os_string();
            d.push(".checkpoint");
            PathBuf::from(d)
        });
        let checkpoint_file = checkpoint_dir.join(Checkpoint::FILE);
        if !resuming && checkpoint_file.exists() {
            if cfg.checkpoint_dir.is_some() && !cfg.force {
                bail!(
                    "{} already holds a checkpoint; continue it with --resume {}, or pass --force to start over",
                    checkpoint_dir.display(),
                    checkpoint_dir.display()
                );
            }
            if cfg.checkpoint_dir.is_none() && !quiet {
                eprintln!(
                    "note: {} holds an interrupted run's checkpoint (calm-gpu train --resume {} continues it); this run replaces it only if it is interrupted too",
                    checkpoint_dir.display(),
                    checkpoint_dir.display()
                );
            }
        }
        check_output(&checkpoint_file, true)?;
        check_files_distinct(cfg, &checkpoint_dir, &checkpoint_file)?;
        // One run at a time per model file and per checkpoint directory, held until this function
        // returns. `<out>.checkpoint` (no --checkpoint-dir) follows --out's lock, and is not made
        // unless the run is interrupted.
        let locks = [
            lock_output(&cfg.out, "give --out another file")?,
            match &cfg.checkpoint_dir {
                Some(_) => {
                    lock_output(&checkpoint_file, "give --checkpoint-dir another directory")?
                }
                None => None,
            },
        ];
        Ok(Self {
            checkpoint_dir,
            _locks: locks,
        })
    }
}

/// The trainer of the run: its data read (and cached, and whitened), the layer checked against
/// it, the starting weights read, the checkpoint resumed; says what it will run.
fn start(
    cfg: &RunConfig,
    params: CalmParams,
    resume: Option<Checkpoint>,
    quiet: bool,
) -> Result<Trainer> {
    let world = super::parallel::world();
    let (data, names, pre, n) = match &world {
        Some(w) => {
            if cfg.cache.is_some() {
                bail!("--cache is not available under MPI: each rank reads only its own images");
            }
            super::load_shard(&cfg.data, cfg.preprocess, params.batch, w.as_ref())?
        }
        None => {
            let (data, names, pre) = load_data(&cfg.data, cfg.preprocess)?;
            let n = data.len();
            (data, names, pre, n)
        }
    };
    // The layer must fit the images and --init must match it before anything is written or
    // fitted (the cache, a whitening filter); whitening keeps the shape.
    let (c, h, w) = data.shape();
    let mut params = params;
    let g = params.check_shape(c, h, w).map_err(calm_flag_error)?;
    if let (None, Some(p)) = (&resume, &cfg.init) {
        params.init_theta = Some(model::load_init(p, &g)?);
    }
    let data = match &cfg.cache {
        Some(p) => cached(p, data, &names, pre, quiet)?,
        None => data,
    };
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    if let Some(width) = cfg.whiten
        && resume.as_ref().is_none_or(|ck| ck.model.whiten.is_none())
    {
        say(format!("fitting a {width}x{width} patch-whitening filter"));
    }
    let trainer = match (resume.clone(), &world) {
        (ck, Some(w)) => Trainer::sharded(&params, data, n, w.clone(), ck),
        (Some(ck), None) => Trainer::resume(&params, data, ck),
        (None, None) => Trainer::new(&params, data),
    }
    .map_err(calm_flag_error)?;
    let mut trainer = trainer
        .with_cancel(super::stop_token().clone())
        .with_data_info(data_info(&names, pre))
        .checkpoint_extra(run_entries(cfg)?);
    if let Some(dir) = &cfg.checkpoint_dir {
        trainer = trainer.checkpoint_every_epoch(dir.clone());
    }
    say(format!("engine: {}", trainer.describe()));
    if let Some(w) = &world {
        say(format!(
            "MPI: {} processes; batch b of {} images is rank b % {}'s, and each round's statistics are exchanged and summed in batch order",
            w.size(),
            params.batch,
            w.size()
        ));
    }
    say(format!(
        "data: {n} images of {c}x{h}x{w} from {}; K={} w={} p={} (Ho={}, Wo={}); {:.1} GFLOP per epoch",
        names.join(", "),
        g.k,
        g.kw,
        g.pad,
        g.ho,
        g.wo,
        g.epoch_flops(n) / 1e9
    ));
    let first = trainer.history().len() + 1;
    if resume.is_some() {
        if first > cfg.epochs {
            say(format!(
                "the checkpoint's run has completed its {} epochs; finishing it",
                cfg.epochs
            ));
        } else {
            say(format!("resuming at epoch {first} of {}", cfg.epochs));
        }
    }
    Ok(trainer)
}

/// Runs the trainer with the progress bar, the metrics file and Ctrl-C (which leaves a
/// checkpoint and exits 130), then writes the model and its plot.
fn run_and_write(
    mut trainer: Trainer,
    cfg: &RunConfig,
    resuming: bool,
    outputs: Option<Outputs>,
    quiet: bool,
) -> Result<()> {
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let n = trainer.len();
    let first = trainer.history().len() + 1;
    // Metrics: a fresh file, or on resume the checkpoint's epochs rewritten (a kill between the
    // checkpoint and the metrics line must not lose or repeat a line), then appended to.
    let mut metrics = match cfg.metrics.as_ref().filter(|_| outputs.is_some()) {
        Some(p) => {
            let mut text = String::new();
            for r in trainer.history() {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            // A file this new run replaces (--force) keeps its lines until the model is written.
            let replacing = !resuming && std::fs::metadata(p).is_ok_and(|m| m.is_file());
            Some(MetricsLog::create(p, &text, replacing)?)
        }
        None => None,
    };
    let bar = progress_bar(quiet, n);
    install_ctrl_c();
    let mut io_err: Option<std::io::Error> = None;
    let outcome = trainer.run(&mut |ev: &Event| {
        report(ev, &bar, cfg.epochs, first, quiet);
        if let (Event::EpochEnd(r), Some(m)) = (ev, metrics.as_mut()) {
            let j = serde_json::to_string(r).expect("plain numbers serialise");
            if let Err(e) = writeln!(m.file, "{j}").and_then(|_| m.file.flush()) {
                io_err.get_or_insert(e);
            }
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = io_err {
        bail!("writing --metrics failed: {e}");
    }
    if outcome.interrupted {
        // exit() runs no destructors: a replaced --metrics file keeps its old lines now, and the
        // lock files go.
        if let Some(outputs) = outputs {
            trainer.save_checkpoint(&outputs.checkpoint_dir)?;
            let checkpoint_dir = outputs.checkpoint_dir.clone();
            drop(metrics);
            drop(outputs);
            eprintln!(
                "error: {} after {} complete epochs; resume with: calm-gpu train --resume {}",
                outcome.stopped.as_deref().unwrap_or("interrupted"),
                outcome.history.len(),
                checkpoint_dir.display()
            );
        }
        super::parallel::exit(130);
    }
    if outputs.is_none() {
        // Another rank of an MPI job: rank 0 writes the model, the same as this one's.
        return Ok(());
    }
    let model = trainer.model(outcome.stopped.clone())?;
    model.save(&cfg.out, cfg.force)?;
    if let Some(p) = &model.prior {
        let learned = cfg.schedule.prior.any();
        say(format!(
            "{} {}",
            if learned { "learned" } else { "fixed" },
            p.summary()
        ));
    }
    match &cfg.plot {
        // The precision limit in the first epoch leaves nothing to draw; the model (the
        // starting weights) is written as SPEC says, and the plot is not.
        Some(p) if outcome.history.is_empty() => eprintln!(
            "note: no epoch completed, so there is no log likelihood to plot; {} was not written",
            p.display()
        ),
        Some(p) => {
            write_plot(&model, p, cfg.force)?;
            say(format!("wrote {}", p.display()));
        }
        None => {}
    }
    if let Some(m) = metrics {
        m.finish()?;
    }
    // (A sum of f64s starts at -0.0, which would print as "-0.00 s" for no epochs.)
    let secs = outcome.history.iter().fold(0.0, |s, r| s + r.seconds);
    if let Some(t) = trainer.traffic() {
        say(format!(
            "MPI: rank 0 received {:.1} MB in {} rounds and spent {:.3} s in them ({:.2} ms a round, waiting for the slowest rank included)",
            t.bytes as f64 / 1e6,
            t.rounds,
            t.seconds,
            1e3 * t.seconds / t.rounds.max(1) as f64
        ));
    }
    println!(
        "wrote {} after {} epochs in {:.2} s{}",
        cfg.out.display(),
        outcome.history.len(),
        secs,
        outcome
            .history
            .last()
            .map(|r| format!(" (LL/image {:.4})", r.loglik_per_image))
            .unwrap_or_default()
    );
    Ok(())
}

/// A library parameter error in the CLI's words: `--kernels must be at least 1`.
pub(super) fn flag_error(e: calm_gpu::ParamError) -> anyhow::Error {
    anyhow::anyhow!("--{} {}", e.field.replace('_', "-"), e.reason)
}

/// [`flag_error`] for a parameter error inside a [`calm_gpu::CalmError`]; other errors as
/// they are.
fn calm_flag_error(e: calm_gpu::CalmError) -> anyhow::Error {
    match e {
        calm_gpu::CalmError::Param(p) => flag_error(p),
        e => e.into(),
    }
}

/// The run the arguments describe, after `--preset`: a fresh one, or the one a checkpoint
/// holds (with its checkpoint).
fn run_config(mut a: TrainArgs) -> Result<(RunConfig, Resume)> {
    let recommended = a.preset == Some(Preset::Recommended);
    let rec = calm_gpu::CalmParams::recommended();
    if recommended {
        if a.init_method == Some(em::InitMethod::Normal) {
            bail!(
                "--preset recommended starts from data (--init-method patches, or kmeans); drop --init-method normal"
            );
        }
        if a.learn_variance && a.patch_norm.is_none() {
            bail!(
                "--preset recommended contrast-normalises every patch, which a learned variance cannot use: add --patch-norm off, or drop --learn-variance"
            );
        }
        a.init_method = a.init_method.or(Some(rec.init_method));
        a.revive = rec.revive;
        a.whiten = a.whiten.or(rec.whiten);
    }
    let pick = |v: Option<usize>, spec: usize, rec: usize| {
        v.unwrap_or(if recommended { rec } else { spec })
    };
    let (kernels, width, pad, epochs) = (
        pick(a.kernels, 64, RECOMMENDED.layer.kernels),
        pick(a.width, 20, RECOMMENDED.layer.width),
        pick(a.pad, 2, RECOMMENDED.layer.pad),
        pick(a.epochs, 15, RECOMMENDED.epochs),
    );
    // A network's first layer is its spec's (--kernels, --width and --pad conflict with --net).
    let (kernels, width, pad) = match &a.net {
        Some(n) => {
            let l = n.layers[0].layer;
            (l.kernels, l.width, l.pad)
        }
        None => (kernels, width, pad),
    };
    let fresh = RunConfig {
        data: a.data.iter().map(|p| absolute(p)).collect(),
        backend: a.backend.unwrap_or(Device::Auto).to_string(),
        kernels,
        width,
        pad,
        batch: a.batch.unwrap_or(1000),
        epochs,
        seed: a.seed.unwrap_or(0),
        init: a.init.as_ref().map(|p| absolute(p)),
        out: absolute(
            a.out
                .as_deref()
                .unwrap_or(Path::new("calm-model.safetensors")),
        ),
        metrics: a.metrics.as_ref().map(|p| absolute(p)),
        force: a.force,
        checkpoint_dir: a.checkpoint_dir.as_ref().map(|p| absolute(p)),
        plot: a.plot.as_ref().map(|p| absolute(p)),
        preprocess: a.preprocess,
        init_method: a.init_method.unwrap_or(em::InitMethod::Normal),
        schedule: em::Schedule {
            revive: a.revive,
            tol: a.tol,
            seed: a.seed.unwrap_or(0),
            prior: PriorOptions {
                weights: a.learn_weights,
                variance: a.learn_variance,
            },
        },
        cache: a.cache.as_ref().map(|p| absolute(p)),
        whiten: a.whiten,
        variance: a.variance,
        posterior: a.posterior.map(Into::into).unwrap_or_default(),
        patch_norm: match a.patch_norm {
            Some(p) => p.0,
            None => rec.patch_norm.filter(|_| recommended),
        },
        data_bytes: Some(data_bytes(&a.data)),
        features: rec.recipe.filter(|_| recommended),
        net: a.net.clone(),
    };
    let Some(dir) = &a.resume else {
        return Ok((fresh, Resume::Fresh));
    };
    // A network's run is also kept with its fitted layers (Ctrl-C between two layers leaves no
    // layer checkpoint).
    let mut path = dir.join(Checkpoint::FILE);
    let network = dir.join(calm_gpu::net::NETWORK_FILE);
    if !path.exists() && network.exists() {
        path = network;
    }
    let ck = Model::load(&path)
        .with_context(|| format!("--resume {}: no readable checkpoint", dir.display()))?;
    let cfg: RunConfig = ck
        .extra
        .get("run")
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a training checkpoint (no run arguments)",
                path.display()
            )
        })
        .and_then(|s| {
            serde_json::from_str(s)
                .map_err(|e| anyhow::anyhow!("{}: bad run arguments: {e}", path.display()))
        })?;
    // The epochs already done: without them the run would start again from epoch 1 on trained
    // weights and lose their metrics lines. A network's trainer reads its directory itself.
    let ck = match cfg.net.as_ref().is_some_and(is_deep) {
        true => Resume::Net(absolute(dir)),
        false => Resume::Layer(Box::new(Checkpoint::from_model(ck, &path)?)),
    };
    check_same_run(&a, recommended, &fresh, &cfg, &absolute(dir))?;
    let plot = a.plot.as_ref().map(|p| absolute(p)).or(cfg.plot.clone());
    let cfg = RunConfig {
        checkpoint_dir: Some(absolute(dir)),
        plot,
        force: cfg.force || a.force,
        backend: a.backend.map_or(cfg.backend.clone(), |b| b.to_string()),
        ..cfg
    };
    // A resumed run goes on with the data it started with: a file of another size under the
    // same name (re-downloaded, or another split) would silently change what is fitted.
    if let Some(then) = &cfg.data_bytes {
        for ((path, was), now) in cfg.data.iter().zip(then).zip(data_bytes(&cfg.data)) {
            if let (Some(was), Some(now)) = (*was, now)
                && was != now
            {
                bail!(
                    "--resume: {} is {now} bytes but was {was} bytes when the run started; resume with the data it started with, or start a new run",
                    path.display()
                );
            }
        }
    }
    Ok((cfg, ck))
}

/// The data's names and preprocessing, for the model's metadata.
fn data_info(names: &[String], pre: Preprocess) -> DataInfo {
    DataInfo {
        names: names.to_vec(),
        preprocess: pre.to_string(),
    }
}

/// The entries every checkpoint of the run keeps: its command line, for `--resume`.
fn run_entries(cfg: &RunConfig) -> Result<BTreeMap<String, String>> {
    Ok(BTreeMap::from([(
        "run".to_string(),
        serde_json::to_string(cfg)?,
    )]))
}

/// Where a run starts: afresh, or from a layer's checkpoint, or from a network's checkpoint
/// directory.
enum Resume {
    Fresh,
    Layer(Box<Checkpoint>),
    Net(PathBuf),
}

/// True for a spec that is more than one layer's model file (a second layer, a head, or a
/// `white W` on the layer): the network path of `train`.
fn is_deep(spec: &NetSpec) -> bool {
    *spec != NetSpec::single(spec.layers[0].layer)
}

/// `train --resume DIR` with more options: each training option given must equal the
/// checkpoint's run (`ck`); `fresh` is the run the options would start, `dir` the checkpoint
/// directory. `--preset recommended` counts as giving the options it sets.
fn check_same_run(
    a: &TrainArgs,
    preset: bool,
    fresh: &RunConfig,
    ck: &RunConfig,
    dir: &Path,
) -> Result<()> {
    fn same<T: PartialEq + std::fmt::Debug>(given: bool, flag: &str, new: T, old: T) -> Result<()> {
        if given && new != old {
            bail!(
                "--resume: {flag} {new:?} differs from the checkpoint's {old:?}; drop {flag} (the checkpoint's run goes on) or start a new run"
            );
        }
        Ok(())
    }
    let s = (&fresh.schedule, &ck.schedule);
    same(!a.data.is_empty(), "--data", &fresh.data, &ck.data)?;
    same(
        a.kernels.is_some() || preset,
        "--kernels",
        fresh.kernels,
        ck.kernels,
    )?;
    same(
        a.width.is_some() || preset,
        "--width",
        fresh.width,
        ck.width,
    )?;
    same(a.pad.is_some() || preset, "--pad", fresh.pad, ck.pad)?;
    same(
        a.epochs.is_some() || preset,
        "--epochs",
        fresh.epochs,
        ck.epochs,
    )?;
    same(a.batch.is_some(), "--batch", fresh.batch, ck.batch)?;
    same(a.seed.is_some(), "--seed", fresh.seed, ck.seed)?;
    same(a.init.is_some(), "--init", &fresh.init, &ck.init)?;
    same(a.out.is_some(), "--out", &fresh.out, &ck.out)?;
    same(
        a.metrics.is_some(),
        "--metrics",
        &fresh.metrics,
        &ck.metrics,
    )?;
    same(
        a.checkpoint_dir.is_some(),
        "--checkpoint-dir",
        fresh.checkpoint_dir.as_deref(),
        Some(dir),
    )?;
    same(
        a.init_method.is_some() || preset,
        "--init-method",
        fresh.init_method,
        ck.init_method,
    )?;
    same(a.revive || preset, "--revive", s.0.revive, s.1.revive)?;
    same(a.tol.is_some(), "--tol", s.0.tol, s.1.tol)?;
    same(
        a.whiten.is_some() || preset,
        "--whiten",
        fresh.whiten,
        ck.whiten,
    )?;
    same(
        a.learn_weights,
        "--learn-weights",
        s.0.prior.weights,
        s.1.prior.weights,
    )?;
    same(
        a.learn_variance,
        "--learn-variance",
        s.0.prior.variance,
        s.1.prior.variance,
    )?;
    same(
        a.variance.is_some(),
        "--variance",
        fresh.variance,
        ck.variance,
    )?;
    same(
        a.posterior.is_some(),
        "--posterior",
        fresh.posterior,
        ck.posterior,
    )?;
    same(
        a.patch_norm.is_some() || preset,
        "--patch-norm",
        fresh.patch_norm,
        ck.patch_norm,
    )?;
    same(
        a.preprocess.is_some(),
        "--preprocess",
        fresh.preprocess,
        ck.preprocess,
    )?;
    same(a.cache.is_some(), "--cache", &fresh.cache, &ck.cache)?;
    same(a.net.is_some(), "--net", &fresh.net, &ck.net)?;
    Ok(())
}

/// Inputs and outputs of a run are distinct files.
fn check_files_distinct(
    cfg: &RunConfig,
    checkpoint_dir: &Path,
    checkpoint_file: &Path,
) -> Result<()> {
    // --init is read whole before training and the model written atomically, so `--init m
    // --out m --force` (refining a model in place) is fine; the data may stream from disk.
    let mut inputs: Vec<&Path> = cfg.data.iter().map(PathBuf::as_path).collect();
    // The cache is read and written by this run; its key file beside it too.
    let cache_key_file = cfg.cache.as_ref().map(|c| {
        let mut k = c.clone().into_os_string();
        k.push(".json");
        PathBuf::from(k)
    });
    inputs.extend(cfg.cache.as_deref());
    inputs.extend(cache_key_file.as_deref());
    let mut outputs = vec![cfg.out.as_path()];
    outputs.extend(cfg.metrics.as_deref());
    outputs.extend(cfg.plot.as_deref());
    outputs.push(checkpoint_file);
    // Nor may an output file be the checkpoint directory itself.
    outputs.push(checkpoint_dir);
    check_distinct(&inputs, &outputs)
}

/// Prints what the trainer reports: the progress bar, a line per epoch, revivals, the precision
/// limit. `epochs` is the number requested (later ones are revival's settling epochs), `first`
/// this process's first epoch.
fn report(
    ev: &Event,
    bar: &Option<indicatif::ProgressBar>,
    epochs: usize,
    first: usize,
    quiet: bool,
) {
    let line = |s: String| match bar {
        Some(b) => b.println(s),
        None if !quiet => println!("{s}"),
        None => {}
    };
    match ev {
        Event::EpochStart { epoch, .. } => {
            if let Some(b) = bar {
                b.reset();
                b.set_message(if *epoch <= epochs {
                    format!("epoch {epoch}/{epochs}")
                } else {
                    format!("epoch {epoch} (settling)")
                });
            }
        }
        Event::Progress { images } => {
            if let Some(b) = bar {
                b.set_position(*images as u64);
            }
        }
        Event::EpochEnd(r) => {
            let of = if r.epoch <= epochs {
                format!("/{epochs}")
            } else {
                " settling".to_string()
            };
            line(format!(
                "epoch {:>3}{of}  LL {:>14.6e}  LL/image {:>10.4}  {:>8.3} s  {:>8.1} GFLOP/s",
                r.epoch, r.loglik, r.loglik_per_image, r.seconds, r.gflops
            ));
        }
        Event::Revived {
            epoch,
            kernels,
            settling,
        } => line(format!(
            "revived {kernels} unused or duplicate kernel{} after epoch {epoch}{}",
            if *kernels == 1 { "" } else { "s" },
            if *settling {
                "; one more epoch trains them"
            } else {
                ""
            }
        )),
        Event::PrecisionLimit { epoch } => {
            let s = format!(
                "numerical precision limit reached at epoch {epoch}; keeping the last finite theta{}",
                if *epoch == first {
                    " (no epoch of this run completed: the data's values or the starting weights may be too large for f32 arithmetic)"
                } else {
                    ""
                }
            );
            // Printed even with --quiet: the run did not do what was asked.
            match bar {
                Some(b) => b.println(s),
                None => println!("{s}"),
            }
        }
    }
}

impl RunConfig {
    /// A fresh run of the library's parameters `p` on the files `data` (preprocessed by
    /// `preprocess`), writing the model to `out` and, where given, the metrics and the LL plot:
    /// what `reproduce` trains (no `--init`, cache or checkpoint directory).
    pub(super) fn from_params(
        p: &CalmParams,
        data: &[PathBuf],
        preprocess: Preprocess,
        out: &Path,
        metrics: Option<&Path>,
        plot: Option<&Path>,
        force: bool,
    ) -> Self {
        Self {
            data: data.iter().map(|d| absolute(d)).collect(),
            backend: p.device.to_string(),
            kernels: p.layer.kernels,
            width: p.layer.width,
            pad: p.layer.pad,
            batch: p.batch,
            epochs: p.epochs,
            seed: p.seed,
            init: None,
            out: absolute(out),
            metrics: metrics.map(absolute),
            force,
            checkpoint_dir: None,
            plot: plot.map(absolute),
            preprocess: Some(preprocess),
            init_method: p.init_method,
            schedule: em::Schedule {
                revive: p.revive,
                tol: p.tol,
                seed: p.seed,
                prior: p.prior,
            },
            cache: None,
            whiten: p.whiten,
            variance: p.variance,
            posterior: p.posterior,
            patch_norm: p.patch_norm,
            data_bytes: Some(data_bytes(data)),
            features: p.recipe,
            net: None,
        }
    }

    /// The library's parameters of this run (the device and the environment's GPU choices
    /// included; `--init` is read later, against the data's shape).
    pub(super) fn params(&self) -> Result<CalmParams> {
        let device = backend_from_name(&self.backend)?;
        Ok(CalmParams {
            layer: LayerConfig {
                kernels: self.kernels,
                width: self.width,
                pad: self.pad,
            },
            epochs: self.epochs,
            batch: self.batch,
            seed: self.seed,
            init_method: self.init_method,
            init_theta: None,
            revive: self.schedule.revive,
            tol: self.schedule.tol,
            prior: self.schedule.prior,
            whiten: self.whiten,
            variance: self.variance,
            posterior: self.posterior,
            patch_norm: self.patch_norm,
            recipe: self.features,
            device,
            // The CPU engine has no use for the GPU variables (a bad one must not stop it).
            gpu: if device == Device::Cpu {
                Default::default()
            } else {
                super::gpu_config()?
            },
        })
    }
}

/// `--metrics`: one JSON line per epoch, written as each epoch ends, so that a run can be
/// followed (`tail -f`). A file that a new run replaces (`--force`) keeps its old lines until
/// the run has written its model: the new lines go to a hidden file beside it, renamed over it by
/// [`MetricsLog::finish`] and removed if the run stops first (a Ctrl-C keeps the old model too,
/// and `--resume` writes the lines again from the checkpoint).
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    /// The hidden file being written, while `path` still holds the old lines.
    pending: Option<PathBuf>,
}

impl MetricsLog {
    fn create(path: &Path, first_lines: &str, replacing: bool) -> Result<Self> {
        create_parent(path)?;
        if !replacing {
            model::write_atomic(path, first_lines.as_bytes(), true)?;
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| path.display().to_string())?;
            return Ok(Self {
                file,
                path: path.to_path_buf(),
                pending: None,
            });
        }
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let mut hidden = std::ffi::OsString::from(".");
        hidden.push(name);
        hidden.push(format!(".{}.partial", std::process::id()));
        let pending = path.with_file_name(hidden);
        calm_gpu::interrupt::remove_on_exit(&pending);
        let mut file =
            std::fs::File::create(&pending).with_context(|| pending.display().to_string())?;
        file.write_all(first_lines.as_bytes())
            .with_context(|| pending.display().to_string())?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            pending: Some(pending),
        })
    }

    /// The run's model is written: its lines take the place of the old ones.
    fn finish(mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            calm_gpu::interrupt::keep_on_exit(&p);
            self.file
                .sync_all()
                .and_then(|_| std::fs::rename(&p, &self.path))
                .with_context(|| self.path.display().to_string())
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&p);
                })?;
        }
        Ok(())
    }
}

impl Drop for MetricsLog {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            calm_gpu::interrupt::keep_on_exit(&p);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// [`OutputLock::acquire`] with the CLI's messages; `fix` says what else the user can do.
fn lock_output(path: &Path, fix: &str) -> Result<Option<calm_gpu::atomic::OutputLock>> {
    use calm_gpu::atomic::{LockError, OutputLock};
    OutputLock::acquire(path).map_err(|e| match e {
        LockError::Held(lock) => anyhow::anyhow!(
            "another calm-gpu run is writing {} (it holds {}); wait for it to end or {fix}",
            path.display(),
            lock.display()
        ),
        LockError::Io(p, e) => anyhow::anyhow!("{}: {e}", p.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `reproduce` trains from library parameters ([`RunConfig::from_params`]); the run is the
    /// one `train` makes of the command line reproduce used to pass it, for the paper's protocol
    /// and for `--preset recommended` (so the same model, metrics and checkpoint).
    #[test]
    fn reproduce_runs_equal_the_command_lines_they_replace() {
        let data = vec![PathBuf::from("train-images-idx3-ubyte.gz")];
        let (out, metrics, plot) = (
            PathBuf::from("r/model.safetensors"),
            PathBuf::from("r/metrics.jsonl"),
            PathBuf::from("r/loglik.png"),
        );
        let args = |preset: Option<Preset>| TrainArgs {
            data: data.clone(),
            backend: Some(Device::Cpu),
            kernels: preset.is_none().then_some(64),
            width: preset.is_none().then_some(20),
            pad: preset.is_none().then_some(2),
            batch: Some(1000),
            epochs: preset.is_none().then_some(15),
            seed: Some(3),
            init: None,
            out: Some(out.clone()),
            metrics: Some(metrics.clone()),
            force: true,
            quiet: false,
            checkpoint_dir: None,
            preprocess: Some(Preprocess::Scale),
            plot: Some(plot.clone()),
            resume: None,
            init_method: None,
            revive: false,
            tol: None,
            learn_weights: false,
            learn_variance: false,
            variance: None,
            posterior: None,
            patch_norm: None,
            protocol: preset.is_none().then_some(TrainProtocol::Paper),
            preset,
            cache: None,
            whiten: None,
            net: None,
        };
        let paper = calm_gpu::Calm::params(64)
            .width(20)
            .pad(2)
            .batch(1000)
            .epochs(15)
            .seed(3)
            .device(Device::Cpu);
        let recommended = calm_gpu::Calm::params(RECOMMENDED.layer.kernels)
            .width(RECOMMENDED.layer.width)
            .pad(RECOMMENDED.layer.pad)
            .batch(1000)
            .epochs(RECOMMENDED.epochs)
            .seed(3)
            .device(Device::Cpu)
            .init_method(em::InitMethod::Patches)
            .revive(true)
            .whiten(7)
            .patch_norm(0.01)
            .recipe(FeatureRecipe {
                grid: RECOMMENDED.pool,
                encoding: RECOMMENDED.encoding,
                standardize: true,
            });
        for (preset, params) in [(None, paper), (Some(Preset::Recommended), recommended)] {
            let (want, _) = run_config(args(preset)).unwrap();
            let got = RunConfig::from_params(
                &params,
                &data,
                Preprocess::Scale,
                &out,
                Some(&metrics),
                Some(&plot),
                true,
            );
            assert_eq!(got, want, "{preset:?}");
        }
    }

    /// A cache key read back from its file equals the key computed again for the same inputs,
    /// for modification times with any nanoseconds.
    #[test]
    fn cache_key_survives_its_json_file() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..10_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let t = std::time::Duration::new(
                1_700_000_000 + (state >> 40),
                (state % 1_000_000_000) as u32,
            );
            let key = input_key("/data/x.npy", Some(state >> 20), Some(t));
            let text = serde_json::to_string_pretty(&key).unwrap();
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, key, "{text}");
        }
    }
}
