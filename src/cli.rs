//! The command line: argument definitions (clap derive) and one function per command.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::data::{self, ImageSource};
use calm_gpu::em::{self, Event};
use calm_gpu::features::{Encoding, Pooling};
use calm_gpu::gpu::GpuContext;
use calm_gpu::model::{self, Model, ModelMeta};
use calm_gpu::prior::PriorOptions;
use calm_gpu::run::{self, Backend};
use calm_gpu::{Engine, Geometry, LayerConfig};

#[derive(Parser)]
#[command(
    name = "calm-gpu",
    version,
    about = "Learn convolution weights without labels: a convolutional Gaussian mixture fitted by EM on any GPU",
    long_about = "calm-gpu fits a convolution layer as a Gaussian mixture over image patches by batch EM \
                  (no labels, no backpropagation). The E-step is a convolution plus a log-sum-exp per image, \
                  the M-step a convolution of each image with its own posterior map. It runs on Vulkan, Metal, \
                  DX12 or GL through WGSL compute shaders, or on the CPU."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fit a layer by batch EM and write it as safetensors
    Train(TrainArgs),
    /// Write image-wide features f[n,k] = logsumexp_{h,w} L[n,k,h,w] of a dataset as .npy (N, K)
    Features(FeaturesArgs),
    /// Check every GPU kernel against the CPU reference on random problems; non-zero exit on failure
    Validate(ValidateArgs),
    /// List the GPU adapters wgpu can see
    Devices,
    /// Time the E-step and whole epochs on random data of a protocol's shape; GFLOP/s by SPEC's count
    Bench(BenchArgs),
    /// Find the fastest GEMM kernels for this GPU and a protocol's shape, each checked against
    /// the CPU reference first, and keep the choice for later runs
    Tune(TuneArgs),
    /// Draw a model's kernels as a PNG grid, and optionally its log-likelihood curve
    Show(ShowArgs),
    /// Print a model's config, preprocessing, LL history and per-kernel counts
    Info(InfoArgs),
    /// The paper's linear probe: softmax regression on a model's features, train and test accuracy
    Eval(EvalArgs),
    /// Run a protocol of the paper end to end: train, probe, baselines, table and pictures
    Reproduce(ReproduceArgs),
}

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
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Override the protocol's number of epochs (e.g. for a quick look)
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override the protocol's batch size
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the initial weights (and of data-patch draws and revival)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace earlier results in --out-dir
    #[arg(long)]
    pub force: bool,
}

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
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Images per batch when computing features; bounds memory only
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Inverse L2 strength of the probe (scikit-learn's C)
    #[arg(long, default_value_t = 1.0)]
    pub c: f64,
    /// Iteration cap of the probe's L-BFGS
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Standardise features before the probe (the paper's probe does not)
    #[arg(long)]
    pub standardize: bool,
    /// Hold out the last FRACTION of the training images as a validation set and report accuracy
    /// on it instead of the test set (for choosing settings without looking at the test set)
    #[arg(long, value_name = "FRACTION")]
    pub val_split: Option<f64>,
    /// Pool L over a G x G grid of regions for the CALM and random-kernel features (1: SPEC's
    /// image-wide features)
    #[arg(long, default_value_t = 1, value_name = "G")]
    pub pool: usize,
    /// Encoding of L before pooling, for the CALM and random-kernel features: lse (SPEC's
    /// log-sum-exp) or triangle (per patch, how much closer than average to each kernel; summed
    /// over each region)
    #[arg(long, value_enum, default_value_t = Encoding::Lse)]
    pub encode: Encoding,
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

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct ShowArgs {
    /// A model written by `calm-gpu train` (or a checkpoint)
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The kernel grid to write (PNG); each kernel min-max normalised, RGB when C = 3
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    /// Also draw LL per image against epoch into this PNG
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Kernels per row
    #[arg(long, default_value_t = 8)]
    pub per_row: usize,
    /// Pixels per kernel pixel (default: about 100 pixels per kernel)
    #[arg(long)]
    pub scale: Option<usize>,
    /// Replace existing files
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// A model written by `calm-gpu train` (or a checkpoint)
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// Print the whole metadata as JSON instead
    #[arg(long)]
    pub json: bool,
}

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
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
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
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// EM iterations (passes over the data) [default: 15; 10 with --preset recommended]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed of the initial weights (N(0,1) draws or data patches) and of revival
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from these weights instead: a .npy float32 (K,C,w,w) or a saved model
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// The model file to write (safetensors)
    #[arg(long, default_value = "calm-model.safetensors", value_name = "FILE")]
    pub out: PathBuf,
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
    #[arg(long, value_enum)]
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
    /// paper: every choice exactly as SPEC.md (N(0,1) init, no revival, fixed epochs); refuses
    /// options that would change that
    #[arg(long, value_enum, conflicts_with = "preset")]
    pub protocol: Option<TrainProtocol>,
    /// recommended: the configuration docs/results.md's ablation chose: images whitened over
    /// 7x7 patches, K 128 kernels of 8x8 without padding, data-patch initialisation with
    /// revival, 10 epochs (explicit --kernels/--width/--pad/--epochs/--whiten still apply);
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
    /// Continue the run checkpointed in DIR from its last complete epoch, with its arguments
    /// (the training options are the checkpoint's and are refused here; --quiet, --plot,
    /// --force and --backend still apply: a run checkpointed on a GPU may finish on the CPU)
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "data", "init", "checkpoint_dir", "kernels", "width", "pad", "batch", "epochs",
        "seed", "out", "metrics", "init_method", "revive", "tol", "whiten", "learn_weights",
        "learn_variance", "protocol", "preset", "preprocess", "cache",
    ])]
    pub resume: Option<PathBuf>,
    /// Write the preprocessed images once to this float32 .npy (plus FILE.json naming the data
    /// it holds) and read them from it every epoch: for preprocessing that costs more than the
    /// epoch (zca-image on STL-10's 105,000 images), when the data streams (CPU engine, or a GPU
    /// with less memory than the data). A later run with the same data reuses the file
    #[arg(long, value_name = "FILE.npy")]
    pub cache: Option<PathBuf>,
}

/// A named configuration beyond SPEC's protocol, chosen by measurement (docs/results.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// train: images whitened over 7x7 patches, K 128 kernels of 8x8 without padding,
    /// data-patch init, revival, 10 epochs; eval: the triangle encoding over a 4x4 grid,
    /// standardised (reproduce stl10 keeps the protocol's layer)
    Recommended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrainProtocol {
    /// SPEC.md's batch EM exactly, as the paper's code runs it
    Paper,
}

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct FeaturesArgs {
    /// A model written by `calm-gpu train`
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The images (same formats as `train --data`); without it, the shipped sample's test split
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// The .npy file to write, float32 (N, K), or (N, K*G*G) with --pool G
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Pool L over a G x G grid of regions instead of the whole image (1: SPEC's features)
    #[arg(long, default_value_t = 1, value_name = "G")]
    pub pool: usize,
    /// Encoding of L before pooling: lse (SPEC's log-sum-exp) or triangle (see `eval --help`)
    #[arg(long, value_enum, default_value_t = Encoding::Lse)]
    pub encode: Encoding,
    /// Where the features are computed: a hardware GPU if auto finds one, else the CPU engine
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Images per batch; bounds memory only
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The GPU backend to check (auto takes the best adapter, software ones included)
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train(a),
        Command::Features(a) => features(a),
        Command::Validate(a) => validate(a),
        Command::Devices => devices(),
        Command::Bench(a) => bench(a),
        Command::Tune(a) => tune(a),
        Command::Show(a) => show(a),
        Command::Info(a) => info(a),
        Command::Eval(a) => eval(a).map(|_| ()),
        Command::Reproduce(a) => reproduce(a),
    }
}

/// The preprocessing `path`'s images get by default: `scale` (x / 255) for bytes, `none` for
/// floats.
fn default_preprocess(path: &Path) -> Result<Preprocess> {
    let kind = match data::detect_format(path)? {
        data::FileFormat::Npy => match data::npy::NpyFile::open(path) {
            Ok(f) => f.kind(),
            Err(_) => data::load_raw(path)?.1,
        },
        _ => data::PixelKind::U8,
    };
    Ok(Preprocess::default_for(kind))
}

/// Opens the datasets (or the shipped sample) as one source, preprocessed with `pre` (default:
/// by element type). Large STL-10 and `.npy` files stream from disk. Returns the source, the
/// names of the inputs and the preprocessing applied.
pub fn load_data(
    paths: &[PathBuf],
    pre: Option<Preprocess>,
) -> Result<(Arc<dyn ImageSource>, Vec<String>, Preprocess)> {
    if paths.is_empty() {
        if let Some(p) = pre.filter(|p| *p != Preprocess::Scale) {
            bail!("the shipped digits are scaled to [0, 1] already; --preprocess {p} needs --data");
        }
        return Ok((
            embedded(data::Split::Train),
            vec!["embedded:digits-train".into()],
            Preprocess::Scale,
        ));
    }
    let pre = match pre {
        Some(p) => p,
        None => default_preprocess(&paths[0])?,
    };
    let mut parts: Vec<Box<dyn ImageSource>> = Vec::new();
    for p in paths {
        parts.push(data::open_source(p, Some(pre))?);
    }
    let names = paths.iter().map(|p| p.display().to_string()).collect();
    let source: Arc<dyn ImageSource> = if parts.len() == 1 {
        Arc::from(parts.pop().expect("one"))
    } else {
        Arc::new(data::Concat::new(parts)?)
    };
    if source.is_empty() {
        bail!("the data holds no images");
    }
    Ok((source, names, pre))
}

fn check_positive(name: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("--{name} must be at least 1");
    }
    Ok(())
}

/// Refuses to overwrite `path` without --force, before any work is done.
fn check_output(path: &Path, force: bool) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory; give a file name", path.display());
    }
    // A missing directory is created when the file is written; a file in its place cannot be.
    if let Some(blocker) = path
        .ancestors()
        .skip(1)
        .find(|d| !d.as_os_str().is_empty() && d.exists())
        .filter(|d| !d.is_dir())
    {
        bail!(
            "{}: {} is a file, not a directory",
            path.display(),
            blocker.display()
        );
    }
    // A pipe or a device (`/dev/stdout`) is written to, not replaced: no --force needed.
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    Ok(())
}

/// Creates the missing directories above `path`, for outputs written in place (not through
/// `model::write_atomic`, which does this itself).
fn create_parent(path: &Path) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    Ok(())
}

/// Refuses a run that names one file as two of its outputs, or an output that is one of its
/// inputs: with --force the second write would destroy the first, or the data being read.
fn check_distinct(inputs: &[&Path], outputs: &[&Path]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        let k = same_file_key(out);
        let key = |p: &&Path| same_file_key(p);
        if outputs[..i].iter().any(|o| key(o) == k) {
            bail!(
                "{} is named for two outputs of this run; give each its own file",
                out.display()
            );
        }
        if inputs.iter().any(|p| key(p) == k) {
            bail!(
                "{} is an input of this run; write the output to another file",
                out.display()
            );
        }
    }
    Ok(())
}

/// One path for a file under any spelling (`./a`, `d/../a`, a symlink): the canonical path of
/// its deepest existing ancestor (symlinks and `..` resolved by the file system), then the
/// components that do not exist yet with `.` and `..` applied, so that files not written yet
/// compare too.
fn same_file_key(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = absolute(p);
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    let canon = loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            break c;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                base = parent;
            }
            _ => break PathBuf::new(),
        }
    };
    rest.iter().rev().fold(canon, |mut acc, c| {
        match c {
            Component::ParentDir => {
                acc.pop();
            }
            Component::CurDir => {}
            c => acc.push(c),
        }
        acc
    })
}

/// Everything a run needs to be repeated or resumed; kept in its checkpoints.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct RunConfig {
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
}

const CHECKPOINT: &str = "checkpoint.safetensors";

/// `--preset recommended`, as docs/results.md's ablation chose it on validation splits of the
/// digits and Fashion-MNIST.
struct Recommended {
    layer: LayerConfig,
    epochs: usize,
    whiten: usize,
    pool: usize,
    encoding: Encoding,
}

const RECOMMENDED: Recommended = Recommended {
    layer: LayerConfig {
        kernels: 128,
        width: 8,
        pad: 0,
    },
    epochs: 10,
    whiten: 7,
    pool: 4,
    encoding: Encoding::Triangle,
};

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn backend_from_name(name: &str) -> Result<Backend> {
    Backend::from_str(name, true)
        .map_err(|e| anyhow::anyhow!("backend `{name}` in the checkpoint: {e}"))
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

/// Ctrl-C asks the engines to stop after the current batch; a second Ctrl-C exits at once.
fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if calm_gpu::interrupt::requested() {
            eprintln!(
                "error: interrupted twice; exiting without a checkpoint of the current epoch"
            );
            std::process::exit(130);
        }
        eprintln!("stopping after the current batch (Ctrl-C again to quit now)...");
        calm_gpu::interrupt::request();
    });
}

fn train(mut a: TrainArgs) -> Result<()> {
    let recommended = a.preset == Some(Preset::Recommended);
    if recommended {
        if a.init_method == Some(em::InitMethod::Normal) {
            bail!("--preset recommended sets --init-method patches; drop --init-method normal");
        }
        a.init_method = Some(em::InitMethod::Patches);
        a.revive = true;
        a.whiten = a.whiten.or(Some(RECOMMENDED.whiten));
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
    let quiet = a.quiet;
    // Either a fresh run from the arguments, or the run a checkpoint describes.
    let (cfg, resume) = match &a.resume {
        Some(dir) => {
            let path = dir.join(CHECKPOINT);
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
            let records: Vec<calm_gpu::model::EpochRecord> = ck
                .extra
                .get("records")
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            let plot = a.plot.as_ref().map(|p| absolute(p)).or(cfg.plot.clone());
            (
                RunConfig {
                    checkpoint_dir: Some(absolute(dir)),
                    plot,
                    force: cfg.force || a.force,
                    backend: a
                        .backend
                        .map_or(cfg.backend.clone(), |b| format!("{b:?}").to_lowercase()),
                    ..cfg
                },
                Some((ck, records)),
            )
        }
        None => (
            RunConfig {
                data: a.data.iter().map(|p| absolute(p)).collect(),
                backend: format!("{:?}", a.backend.unwrap_or(Backend::Auto)).to_lowercase(),
                kernels,
                width,
                pad,
                batch: a.batch,
                epochs,
                seed: a.seed,
                init: a.init.as_ref().map(|p| absolute(p)),
                out: absolute(&a.out),
                metrics: a.metrics.as_ref().map(|p| absolute(p)),
                force: a.force,
                checkpoint_dir: a.checkpoint_dir.as_ref().map(|p| absolute(p)),
                plot: a.plot.as_ref().map(|p| absolute(p)),
                preprocess: a.preprocess,
                init_method: a.init_method.unwrap_or(em::InitMethod::Normal),
                schedule: em::Schedule {
                    revive: a.revive,
                    tol: a.tol,
                    seed: a.seed,
                    prior: PriorOptions {
                        weights: a.learn_weights,
                        variance: a.learn_variance,
                    },
                },
                cache: a.cache.as_ref().map(|p| absolute(p)),
                whiten: a.whiten,
            },
            None,
        ),
    };
    if a.protocol == Some(TrainProtocol::Paper)
        && (cfg.init_method != em::InitMethod::Normal
            || cfg.whiten.is_some()
            || cfg.schedule
                != em::Schedule {
                    seed: cfg.seed,
                    ..Default::default()
                })
    {
        bail!(
            "--protocol paper keeps SPEC's choices: drop --init-method, --revive, --tol, --whiten, --learn-weights and --learn-variance"
        );
    }
    if let Some(t) = cfg.schedule.tol
        && !(t >= 0.0 && t.is_finite())
    {
        bail!("--tol must be a non-negative number (got {t})");
    }
    check_positive("kernels", cfg.kernels)?;
    check_positive("width", cfg.width)?;
    check_positive("batch", cfg.batch)?;
    check_positive("epochs", cfg.epochs)?;
    check_output(&cfg.out, cfg.force)?;
    if let (Some(m), None) = (&cfg.metrics, &resume) {
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
    let checkpoint_file = checkpoint_dir.join(CHECKPOINT);
    if resume.is_none() && checkpoint_file.exists() {
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
    {
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
        outputs.push(&checkpoint_file);
        // Nor may an output file be the checkpoint directory itself.
        outputs.push(&checkpoint_dir);
        check_distinct(&inputs, &outputs)?;
    }
    let (data, names, pre) = load_data(&cfg.data, cfg.preprocess)?;
    let data = match &cfg.cache {
        Some(p) => cached(p, data, &names, pre, quiet)?,
        None => data,
    };
    // Patch whitening: fitted on the training images, or the checkpoint's when resuming.
    let whitening = match (&resume, cfg.whiten) {
        (Some((ck, _)), _) if ck.whiten.is_some() => ck.whiten.clone(),
        (_, Some(width)) => {
            if !quiet {
                println!("fitting a {width}x{width} patch-whitening filter");
            }
            Some(data::Whitening::fit(data.as_ref(), width, cfg.seed)?)
        }
        _ => None,
    };
    let data: Arc<dyn ImageSource> = match &whitening {
        Some(wh) => Arc::new(data::Whitened::new(data, Arc::new(wh.clone()))?),
        None => data,
    };
    let (c, h, w) = data.shape();
    let layer = LayerConfig {
        kernels: cfg.kernels,
        width: cfg.width,
        pad: cfg.pad,
    };
    let g = Geometry::new(layer, c, h, w)?;
    let (theta, mut records) = match &resume {
        Some((ck, records)) => {
            if ck.meta.layer != layer
                || (ck.meta.channels, ck.meta.height, ck.meta.width) != (c, h, w)
            {
                bail!("the checkpoint's layer or image shape does not match its data any more");
            }
            (ck.theta.clone(), records.clone())
        }
        None => (
            match &cfg.init {
                Some(p) => model::load_init(p, &g)?,
                None => em::initial_theta(&g, cfg.init_method, data.as_ref(), cfg.seed)?,
            },
            Vec::new(),
        ),
    };
    let n = data.len();
    let mut engine = run::engine(
        backend_from_name(&cfg.backend)?,
        g,
        data.clone(),
        theta,
        cfg.batch,
    )?;
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    if let Some((ck, _)) = &resume
        && let Some(p) = &ck.prior
    {
        engine.set_prior(p)?;
    }
    say(format!("engine: {}", engine.describe()));
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
    let first = records.len() + 1;
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
    // An engine that has run no epoch has no counts: a model written before this process ran
    // one (a checkpoint of a finished run) takes the checkpoint's.
    let checkpoint_counts = resume
        .as_ref()
        .map(|(ck, records)| (records.len(), ck.counts.clone()));
    // Metrics: a fresh file, or on resume the checkpoint's epochs rewritten (a kill between the
    // checkpoint and the metrics line must not lose or repeat a line), then appended to.
    let mut metrics = match &cfg.metrics {
        Some(p) => {
            create_parent(p)?;
            let mut text = String::new();
            for r in &records {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            model::write_atomic(p, text.as_bytes(), true)?;
            Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .with_context(|| p.display().to_string())?,
            )
        }
        None => None,
    };
    let make_model = |engine: &mut dyn Engine,
                      history: &[calm_gpu::model::EpochRecord],
                      stopped: Option<String>|
     -> Result<Model> {
        Ok(Model {
            meta: ModelMeta {
                layer,
                channels: c,
                height: h,
                width: w,
                seed: cfg.seed,
                batch: cfg.batch,
                epochs_requested: cfg.epochs,
                preprocess: pre.to_string(),
                engine: engine.describe(),
                images: n,
                data: names.clone(),
                history: history.iter().map(Into::into).collect(),
                stopped,
                calm_gpu_version: env!("CARGO_PKG_VERSION").into(),
                options: (cfg.init_method != em::InitMethod::Normal
                    || cfg.whiten.is_some()
                    || cfg.schedule.revive
                    || cfg.schedule.tol.is_some()
                    || cfg.schedule.prior.any())
                    .then(|| {
                        let mut o = serde_json::json!({ "init_method": cfg.init_method, "schedule": cfg.schedule });
                        if let Some(wd) = cfg.whiten {
                            o["whiten"] = wd.into();
                        }
                        o
                    }),
            },
            theta: engine.theta()?,
            counts: match &checkpoint_counts {
                Some((epochs, counts)) if *epochs == history.len() => counts.clone(),
                _ => engine.counts()?,
            },
            prior: cfg.schedule.prior.any().then(|| engine.prior()),
            whiten: whitening.clone(),
            extra: Default::default(),
        })
    };
    let write_checkpoint =
        |dir: &Path, m: &Model, history: &[calm_gpu::model::EpochRecord]| -> Result<()> {
            let mut m = m.clone();
            m.extra.insert("run".into(), serde_json::to_string(&cfg)?);
            m.extra
                .insert("records".into(), serde_json::to_string(history)?);
            m.save(&dir.join(CHECKPOINT), true)?;
            Ok(())
        };
    let bar = progress_bar(quiet, n);
    install_ctrl_c();
    let mut io_err: Option<std::io::Error> = None;
    let mut after = |engine: &mut dyn Engine,
                     history: &[calm_gpu::model::EpochRecord]|
     -> calm_gpu::Result<()> {
        if let Some(dir) = &cfg.checkpoint_dir {
            let m = make_model(engine, history, None)
                .map_err(|e| calm_gpu::CalmError::Invalid(format!("{e:#}")))?;
            write_checkpoint(dir, &m, history).map_err(|e| {
                calm_gpu::CalmError::Invalid(format!("writing the checkpoint failed: {e:#}"))
            })?;
        }
        Ok(())
    };
    let outcome = em::run_with(
        engine.as_mut(),
        Some(data.as_ref()),
        cfg.schedule,
        std::mem::take(&mut records),
        first,
        cfg.epochs,
        &mut |ev| match ev {
            Event::EpochStart { epoch, .. } => {
                if let Some(b) = &bar {
                    b.reset();
                    b.set_message(if epoch <= cfg.epochs {
                        format!("epoch {epoch}/{}", cfg.epochs)
                    } else {
                        format!("epoch {epoch} (settling)")
                    });
                }
            }
            Event::Progress { images } => {
                if let Some(b) = &bar {
                    b.set_position(images as u64);
                }
            }
            Event::EpochEnd(r) => {
                // Epochs past the requested ones are revival's settling epochs.
                let of = if r.epoch <= cfg.epochs {
                    format!("/{}", cfg.epochs)
                } else {
                    " settling".to_string()
                };
                let line = format!(
                    "epoch {:>3}{of}  LL {:>14.6e}  LL/image {:>10.4}  {:>8.3} s  {:>8.1} GFLOP/s",
                    r.epoch, r.loglik, r.loglik_per_image, r.seconds, r.gflops
                );
                match &bar {
                    Some(b) => b.println(line),
                    None => say(line),
                }
                if let Some(f) = metrics.as_mut() {
                    let j = serde_json::to_string(r).expect("plain numbers serialise");
                    if let Err(e) = writeln!(f, "{j}").and_then(|_| f.flush()) {
                        io_err.get_or_insert(e);
                    }
                }
            }
            Event::Revived {
                epoch,
                kernels,
                settling,
            } => {
                let line = format!(
                    "revived {kernels} unused or duplicate kernel{} after epoch {epoch}{}",
                    if kernels == 1 { "" } else { "s" },
                    if settling {
                        "; one more epoch trains them"
                    } else {
                        ""
                    }
                );
                match &bar {
                    Some(b) => b.println(line),
                    None => say(line),
                }
            }
            Event::PrecisionLimit { epoch } => {
                let line = format!(
                    "numerical precision limit reached at epoch {epoch}; keeping the last finite theta"
                );
                match &bar {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
        },
        &mut after,
    )?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = io_err {
        bail!("writing --metrics failed: {e}");
    }
    if outcome.interrupted {
        let dir = checkpoint_dir;
        let m = make_model(engine.as_mut(), &outcome.history, None)?;
        write_checkpoint(&dir, &m, &outcome.history)?;
        eprintln!(
            "error: {} after {} complete epochs; resume with: calm-gpu train --resume {}",
            outcome.stopped.as_deref().unwrap_or("interrupted"),
            outcome.history.len(),
            dir.display()
        );
        std::process::exit(130);
    }
    let model = make_model(engine.as_mut(), &outcome.history, outcome.stopped.clone())?;
    model.save(&cfg.out, cfg.force)?;
    if let Some(p) = &model.prior {
        say(format!("learned {}", p.summary()));
    }
    if let Some(p) = &cfg.plot {
        write_plot(&model, p, cfg.force)?;
        say(format!("wrote {}", p.display()));
    }
    let secs: f64 = outcome.history.iter().map(|r| r.seconds).sum();
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

fn progress_bar(quiet: bool, n: usize) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(n as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(b)
}

fn features(a: FeaturesArgs) -> Result<()> {
    check_positive("batch", a.batch)?;
    check_positive("pool", a.pool)?;
    check_output(&a.out, a.force)?;
    let mut inputs = vec![a.model.as_path()];
    inputs.extend(a.data.as_deref());
    check_distinct(&inputs, &[&a.out])?;
    let model = Model::load(&a.model)?;
    let pre = model_preprocess(&model)?;
    let (data, _, _) = match &a.data {
        Some(p) => load_data(std::slice::from_ref(p), Some(pre))?,
        None => {
            if pre != Preprocess::Scale {
                bail!(
                    "the model was trained with --preprocess {pre}; give --data to compute features"
                );
            }
            (
                embedded(data::Split::Test),
                vec!["embedded:digits-test".into()],
                pre,
            )
        }
    };
    let g = model_geometry_for(&model, data.as_ref())?;
    let data = whitened(&model, data)?;
    let f = run::features(
        a.backend,
        g,
        data.clone(),
        &model.theta,
        &model.prior_or_uniform(),
        a.batch,
        Pooling {
            grid: a.pool,
            encoding: a.encode,
        },
        &mut |_| {},
    )?;
    let mut bytes = Vec::new();
    ndarray_npy::WriteNpyExt::write_npy(&f, &mut bytes)?;
    model::write_atomic(&a.out, &bytes, a.force)?;
    println!(
        "wrote {} ({} x {} float32)",
        a.out.display(),
        f.nrows(),
        f.ncols()
    );
    Ok(())
}

/// `data` through the model's patch-whitening filter, if it has one (`train --whiten`).
fn whitened(model: &Model, data: Arc<dyn ImageSource>) -> Result<Arc<dyn ImageSource>> {
    Ok(match &model.whiten {
        Some(wh) => Arc::new(data::Whitened::new(data, Arc::new(wh.clone()))?),
        None => data,
    })
}

/// The preprocessing a model was trained with, to apply again to new data.
fn model_preprocess(model: &Model) -> Result<Preprocess> {
    model
        .meta
        .preprocess
        .parse::<Preprocess>()
        .map_err(|e| anyhow::anyhow!("the model's preprocessing: {e}"))
}

/// The model's layer on images of `data`'s size (features work on any H, W; C must match).
fn model_geometry_for(model: &Model, data: &dyn ImageSource) -> Result<Geometry> {
    let (c, h, w) = data.shape();
    if c != model.meta.channels {
        bail!(
            "the model was trained on {}-channel images but the data has {c} channels",
            model.meta.channels
        );
    }
    Ok(Geometry::new(model.meta.layer, c, h, w)?)
}

fn embedded(split: data::Split) -> Arc<dyn ImageSource> {
    Arc::new(data::embedded_digits(split))
}

fn validate(a: ValidateArgs) -> Result<()> {
    let Some(b) = a.backend.gpu() else {
        bail!(
            "validate compares a GPU backend with the CPU reference; choose --backend vulkan, metal, dx12, gl or auto"
        );
    };
    let ctx = Arc::new(GpuContext::new(b, false)?);
    println!("adapter: {}", ctx.describe());
    println!(
        "kernels: {:?} (CALM_KERNELS=staged, direct or uniform chooses)",
        calm_gpu::gpu::kernels::Variant::for_adapter(&ctx.info)?
    );
    // The shapes the tuning file (`calm-gpu tune`) has a choice for run that choice here too.
    for (_, c, h, w, layer, _) in calm_gpu::validate::cases() {
        let g = Geometry::new(layer, c, h, w)?;
        match calm_gpu::gpu::tune::lookup(&ctx, &g) {
            calm_gpu::gpu::tune::Lookup::Found(choice, path) => println!(
                "tuned for {}: {choice} ({})",
                calm_gpu::gpu::tune::shape_key(&g),
                path.display()
            ),
            calm_gpu::gpu::tune::Lookup::Stale(path) => println!(
                "{} holds a choice for {} from another build of calm-gpu; ignored",
                path.display(),
                calm_gpu::gpu::tune::shape_key(&g)
            ),
            calm_gpu::gpu::tune::Lookup::Unreadable(path, why) => {
                println!("tuning file {} ignored: {why}", path.display());
                break;
            }
            calm_gpu::gpu::tune::Lookup::None => {}
        }
    }
    let t0 = std::time::Instant::now();
    let rows = calm_gpu::validate::run(&ctx)?;
    println!(
        "{:<14} {:<34} {:>12} {:>10}  result",
        "kernel", "shape", "max rel err", "tolerance"
    );
    let mut failed = 0;
    for r in &rows {
        println!(
            "{:<14} {:<34} {:>12.3e} {:>10.1e}  {}",
            r.kernel,
            r.shape,
            r.error,
            r.tolerance,
            if r.pass() { "pass" } else { "FAIL" }
        );
        failed += usize::from(!r.pass());
    }
    println!(
        "{} checks, {} failed, {:.1} s",
        rows.len(),
        failed,
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!(
            "{failed} of {} kernel checks failed on {}",
            rows.len(),
            ctx.info.name
        );
    }
    Ok(())
}

fn devices() -> Result<()> {
    let list = calm_gpu::gpu::list_adapters();
    if list.is_empty() {
        println!("no GPU adapters found (the CPU engine, --backend cpu, still works)");
    }
    println!(
        "{:<44} {:<8} {:<14} {:>10}  driver",
        "name", "backend", "type", "memory"
    );
    for (i, mem) in list {
        println!(
            "{:<44} {:<8} {:<14} {:>10}  {} {}",
            i.name,
            format!("{:?}", i.backend),
            format!("{:?}", i.device_type),
            mem.map_or("-".to_string(), |m| format!("{} MiB", m >> 20)),
            i.driver,
            i.driver_info
        );
    }
    Ok(())
}

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    /// Engines to time: one of the GPU backends, cpu, or all (every backend present plus cpu)
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Also time the CPU engine beside the GPU
    #[arg(long)]
    pub with_cpu: bool,
    /// Layer and image shape: mnist (1x28x28, K 64, w 20, p 2) or stl10 (3x96x96, K 200, w 15, p 0)
    #[arg(long, value_enum, default_value_t = Protocol::Mnist)]
    pub protocol: Protocol,
    /// Number of images (random, uniform in [0,1)); default: 8,000 for mnist, 200 for stl10
    #[arg(long)]
    pub images: Option<usize>,
    /// Images per batch (default: the protocol's)
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed epochs after one warm-up epoch
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Write the table as JSON lines too
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace --json if it exists
    #[arg(long)]
    pub force: bool,
    /// Stream the images through two batch buffers even where they fit on the GPU (to time
    /// what a GPU with less memory than the data pays; the epoch includes the copies)
    #[arg(long)]
    pub stream: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Mnist,
    Stl10,
}

/// A protocol's image shape, layer, batch and default number of benchmark images.
fn protocol_shape(p: Protocol) -> (usize, usize, usize, LayerConfig, usize, usize) {
    match p {
        Protocol::Mnist => (
            1,
            28,
            28,
            LayerConfig {
                kernels: 64,
                width: 20,
                pad: 2,
            },
            1000,
            8000,
        ),
        Protocol::Stl10 => (
            3,
            96,
            96,
            LayerConfig {
                kernels: 200,
                width: 15,
                pad: 0,
            },
            200,
            200,
        ),
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let (c, h, w, layer, batch, images) = protocol_shape(a.protocol);
    let n = a.images.unwrap_or(images);
    if let Some(b) = a.batch {
        check_positive("batch", b)?;
    }
    let batch = a.batch.unwrap_or(batch);
    check_positive("images", n)?;
    check_positive("epochs", a.epochs)?;
    if let Some(p) = &a.json {
        check_output(p, a.force)?;
    }
    let g = Geometry::new(layer, c, h, w)?;
    let data = Arc::new(calm_gpu::bench::try_random_images(7, n, c, h, w)?);
    let theta = em::init_theta(&g, 0);
    let mut rows = Vec::new();
    if let Some(b) = a.backend.gpu() {
        let ctx = Arc::new(GpuContext::new(b, false)?);
        rows.push(calm_gpu::bench::time_gpu(
            &ctx,
            g,
            &data,
            &theta,
            a.epochs,
            calm_gpu::gpu::GpuOptions {
                batch,
                stream: a.stream,
                ..Default::default()
            },
            None,
        )?);
    }
    if a.with_cpu || a.backend == Backend::Cpu {
        rows.push(calm_gpu::bench::time_cpu(
            g,
            data.clone(),
            &theta,
            batch,
            a.epochs,
        )?);
    }
    println!("{}", calm_gpu::bench::Row::header());
    for r in &rows {
        println!("{}", r.line());
    }
    for k in rows.iter().filter_map(|r| r.kernels.as_ref()) {
        println!("kernels: {k}");
    }
    if let Some(p) = &a.json {
        let mut s = String::new();
        for r in &rows {
            s.push_str(&serde_json::to_string(r)?);
            s.push('\n');
        }
        model::write_atomic(p, s.as_bytes(), true)?;
    }
    Ok(())
}

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct TuneArgs {
    /// The GPU backend to tune (auto takes the best adapter, software ones included)
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Layer and image shape: mnist (1x28x28, K 64, w 20, p 2) or stl10 (3x96x96, K 200, w 15, p 0)
    #[arg(long, value_enum, default_value_t = Protocol::Mnist)]
    pub protocol: Protocol,
    /// Random images per timed epoch; default: 8,000 for mnist and 200 for stl10 on a hardware
    /// GPU, 300 and 4 on a software one (lavapipe)
    #[arg(long)]
    pub images: Option<usize>,
    /// Timed epochs per candidate after one warm-up epoch (the median counts: with 3, one slow
    /// epoch does not decide; a candidate is kept only if its slowest epoch beats the built-in
    /// choice's fastest, leaving out one stray epoch each from 4 epochs on)
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// A candidate to time instead of the built-in list (repeatable; the built-in choice is
    /// always timed too): staged:TILES (CALM_TILES' syntax, e.g.
    /// staged:e=8x8x16@32,m=4x4x16@20x16p), uniform[:u=RMxRR] or direct
    #[arg(long = "candidate", value_name = "CHOICE")]
    pub candidates: Vec<String>,
    /// Time and print only: leave the tuning file as it is
    #[arg(long)]
    pub dry_run: bool,
    /// Write one JSON line per candidate too
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace --json if it exists
    #[arg(long)]
    pub force: bool,
}

/// `calm-gpu tune`: every candidate checked against the CPU reference (`validate`'s problems),
/// then timed; the fastest that passed goes into the tuning file for this adapter and shape.
fn tune(a: TuneArgs) -> Result<()> {
    use calm_gpu::gpu::tune::{self, Choice};
    let Some(b) = a.backend.gpu() else {
        bail!("tune times the GPU kernels; choose --backend vulkan, metal, dx12, gl or auto");
    };
    check_positive("epochs", a.epochs)?;
    if let Some(p) = &a.json {
        check_output(p, a.force)?;
    }
    let (c, h, w, layer, batch, images) = protocol_shape(a.protocol);
    let g = Geometry::new(layer, c, h, w)?;
    let asked: Vec<Choice> = a
        .candidates
        .iter()
        .map(|s| Choice::parse(s))
        .collect::<calm_gpu::Result<_>>()?;
    let ctx = Arc::new(GpuContext::new(b, false)?);
    let software = ctx.info.device_type == wgpu::DeviceType::Cpu;
    let n = a.images.unwrap_or(match (software, a.protocol) {
        (false, _) => images,
        (true, Protocol::Mnist) => 300,
        (true, Protocol::Stl10) => 4,
    });
    check_positive("images", n)?;
    install_ctrl_c();
    let builtin = calm_gpu::gpu::engine::builtin_choice(&ctx, &g)?;
    // The built-in choice is always timed first: what a tuned choice must beat.
    let list = if asked.is_empty() {
        tune::candidates(&ctx, &g)?
    } else {
        let mut list = vec![builtin];
        for c in asked {
            if !list.contains(&c) {
                list.push(c);
            }
        }
        list
    };
    let path = tune::file_path();
    if !a.dry_run {
        match &path {
            // Refuse a file that is not ours before the work, not after it.
            Some(p) => drop(tune::load(p)?),
            None => bail!(
                "no tuning file: CALM_TUNE_FILE is off and there is no home or cache directory; name a file with CALM_TUNE_FILE or pass --dry-run"
            ),
        }
    }
    println!("adapter: {}", ctx.describe());
    println!(
        "shape: {} on {n} random images, {} timed epochs per candidate; {} candidates, each checked against the CPU reference first",
        tune::shape_key(&g),
        a.epochs,
        list.len()
    );
    let data = Arc::new(calm_gpu::bench::try_random_images(7, n, c, h, w)?);
    let theta = em::init_theta(&g, 0);
    // The check: validate's problems, and a small one of this layer (how K splits into tiles).
    let mut checks = calm_gpu::validate::cases();
    checks.extend(calm_gpu::validate::case_for(&g));
    // One JSON line per candidate, written as it finishes, so a sweep cut short keeps its lines.
    let mut json = match &a.json {
        Some(p) => {
            create_parent(p)?;
            Some(std::fs::File::create(p).with_context(|| p.display().to_string())?)
        }
        None => None,
    };
    let stop = || anyhow::anyhow!("interrupted; the tuning file is unchanged");
    let mut timed: Vec<(Choice, tune::Timing)> = Vec::new();
    // The first row timed (the built-in choice's, unless it failed): the others' LL reference.
    let mut reference: Option<calm_gpu::bench::Row> = None;
    for (i, choice) in list.iter().enumerate() {
        if calm_gpu::interrupt::requested() {
            return Err(stop());
        }
        print!("[{}/{}] {choice}: ", i + 1, list.len());
        let _ = std::io::stdout().flush();
        let opts = calm_gpu::gpu::GpuOptions {
            batch,
            tiles: Some(choice.tiles),
            variant: Some(choice.variant),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let outcome = calm_gpu::validate::run_cases(&ctx, &opts, &checks).and_then(|checked| {
            Ok(match checked.iter().find(|r| !r.pass()) {
                Some(r) => Err(format!(
                    "FAILED the check: {} on {}, error {:.2e} > {:.0e}",
                    r.kernel, r.shape, r.error, r.tolerance
                )),
                None => {
                    let reference_warmup = reference.as_ref().and_then(|r| r.warmup_s);
                    let limit = reference_warmup.map(tune::warmup_limit);
                    match calm_gpu::bench::time_gpu(&ctx, g, &data, &theta, a.epochs, opts, limit)
                    {
                        Err(calm_gpu::CalmError::SlowWarmup { warmup_s, .. }) => Err(format!(
                            "not timed: its warm-up epoch took {:.0} ms, over {}x the first timed choice's {:.0} ms",
                            warmup_s * 1e3,
                            tune::SLOW_WARMUP,
                            reference_warmup.unwrap_or(f64::NAN) * 1e3
                        )),
                        timed => Ok(timed?),
                    }
                }
            })
        });
        let (status, row) = match outcome {
            Err(calm_gpu::CalmError::Interrupted) => {
                println!("interrupted");
                return Err(stop());
            }
            Err(e) => (format!("not run: {e}"), None),
            Ok(Err(failed)) => (failed, None),
            Ok(Ok(row)) => match tune::ll_disagrees(
                reference.as_ref().and_then(|r| r.first_loglik),
                row.first_loglik.unwrap_or(f64::NAN),
                n,
            ) {
                Some(why) => (why, None),
                None => ("ok".to_string(), Some(row)),
            },
        };
        match &row {
            Some(r) => println!(
                "epoch {:.2} ms, {:.1} GFLOP/s (E {:.2} ms, M {:.2} ms; checked and timed in {:.1} s)",
                r.epoch_s * 1e3,
                r.epoch_gflops,
                r.estep_s.unwrap_or(f64::NAN) * 1e3,
                r.mstep_s.unwrap_or(f64::NAN) * 1e3,
                t0.elapsed().as_secs_f64()
            ),
            None => println!("{status}"),
        }
        if let Some(f) = json.as_mut() {
            let line = serde_json::json!({
                "choice": choice.to_string(),
                "builtin": *choice == builtin,
                "status": status,
                "row": row,
            });
            writeln!(f, "{line}")
                .and_then(|_| f.flush())
                .with_context(|| format!("{}", a.json.as_ref().expect("open").display()))?;
        }
        if let Some(r) = row {
            timed.push((
                *choice,
                tune::Timing::of(&r.epochs_s).expect("at least one epoch"),
            ));
            reference.get_or_insert(r);
        }
    }
    if calm_gpu::interrupt::requested() {
        return Err(stop());
    }
    let builtin_t = timed.iter().find(|(c, _)| *c == builtin).map(|t| t.1);
    let Some((fastest, fastest_t)) = timed
        .iter()
        .copied()
        .min_by(|x, y| x.1.median.total_cmp(&y.1.median))
    else {
        bail!("no candidate passed the check and ran; the tuning file is unchanged");
    };
    let gflops = |s: f64| g.epoch_flops(n) / s / 1e9;
    println!(
        "fastest: {fastest}, epoch {:.2} ms, {:.1} GFLOP/s{}",
        fastest_t.median * 1e3,
        gflops(fastest_t.median),
        builtin_t.map_or(String::new(), |b| format!(
            "; built-in {builtin}: {:.2} ms, {:.1} GFLOP/s",
            b.median * 1e3,
            gflops(b.median)
        ))
    );
    let keep = tune::pick(builtin_t, &timed);
    if a.dry_run {
        match &keep {
            Ok((c, _)) => println!("--dry-run: {c} would be kept; the tuning file is unchanged"),
            Err(why) => println!(
                "--dry-run: the built-in choice would stay ({why}); the tuning file is unchanged"
            ),
        }
        return Ok(());
    }
    let path = path.expect("checked above");
    let adapter = tune::AdapterKey::of(&ctx.info);
    let (best, best_t) = match keep {
        Ok(k) => k,
        Err(why) => {
            let removed = tune::remove(&path, &adapter, &tune::shape_key(&g))?;
            println!(
                "the built-in choice stays ({why}){}",
                if removed {
                    format!(
                        "; the earlier entry for this adapter and shape was removed from {}",
                        path.display()
                    )
                } else {
                    String::new()
                }
            );
            return Ok(());
        }
    };
    let best_s = best_t.median;
    let builtin_s = builtin_t.map(|b| b.median);
    tune::store(
        &path,
        tune::Entry {
            adapter,
            shape: tune::shape_key(&g),
            choice: best.to_string(),
            code: best.code_hash(g.k),
            epoch_ms: best_s * 1e3,
            gflops: gflops(best_s),
            builtin: builtin.to_string(),
            builtin_epoch_ms: builtin_s.map(|b| b * 1e3),
            images: n,
            measured_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
    )?;
    println!(
        "saved to {}: train, features, bench and validate run {best} on this adapter for {} (unless CALM_TILES or CALM_KERNELS is set; CALM_TUNE_FILE=off ignores the file)",
        path.display(),
        tune::shape_key(&g)
    );
    Ok(())
}

fn write_plot(model: &Model, path: &Path, force: bool) -> Result<()> {
    check_output(path, force)?;
    let n = model.meta.images.max(1) as f64;
    let points: Vec<(usize, f64)> = model
        .meta
        .history
        .iter()
        .map(|h| (h.epoch, h.loglik / n))
        .collect();
    if points.is_empty() {
        bail!(
            "{}: the model has no completed epochs to plot",
            path.display()
        );
    }
    let l = model.meta.layer;
    let title = format!(
        "calm-gpu: K={} w={} p={}, {} images",
        l.kernels, l.width, l.pad, model.meta.images
    );
    let img = calm_gpu::viz::loglik_plot(&points, &title, 800, 500)?;
    calm_gpu::viz::save_png(&img, path)?;
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    if a.out.is_none() && a.plot.is_none() {
        bail!("nothing to draw: give --out kernels.png and/or --plot loglik.png");
    }
    check_positive("per-row", a.per_row)?;
    if let Some(scale) = a.scale {
        check_positive("scale", scale)?;
    }
    // Every output checked, and the model read whole, before the first is written.
    let outputs: Vec<&Path> = a.out.iter().chain(&a.plot).map(PathBuf::as_path).collect();
    for p in &outputs {
        check_output(p, a.force)?;
    }
    check_distinct(&[&a.model], &outputs)?;
    let model = Model::load(&a.model)?;
    if a.plot.is_some() && model.meta.history.is_empty() {
        bail!(
            "{}: the model has no completed epochs to plot",
            a.model.display()
        );
    }
    if let Some(out) = &a.out {
        let l = model.meta.layer;
        let scale = a
            .scale
            .unwrap_or_else(|| calm_gpu::viz::default_scale(l.width))
            .clamp(1, 64);
        let img = calm_gpu::viz::kernel_grid(
            &model.theta,
            l.kernels,
            model.meta.channels,
            l.width,
            a.per_row.max(1),
            scale,
        );
        calm_gpu::viz::save_png(&img, out)?;
        println!(
            "wrote {} ({}x{} px, {} kernels)",
            out.display(),
            img.width(),
            img.height(),
            l.kernels
        );
    }
    if let Some(p) = &a.plot {
        write_plot(&model, p, a.force)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let m = Model::load(&a.model)?;
    if a.json {
        // The metadata, and what the weights say: kernel use, the learned prior.
        let mut j = serde_json::to_value(&m.meta)?;
        let usage = model::kernel_use(&m.theta, &m.counts);
        j["kernels_unused"] = usage.unused.into();
        j["kernels_distinct"] = usage.distinct.into();
        if let Some(p) = &m.prior {
            j["variance"] = (1.0 / f64::from(p.inv_var)).into();
            j["mixing_weights"] = p.weights().into();
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let l = m.meta.layer;
    println!("model:       {}", a.model.display());
    println!(
        "layer:       K={} kernels of {}x{}x{} (C x w x w), padding {}",
        l.kernels, m.meta.channels, l.width, l.width, l.pad
    );
    println!(
        "images:      {} of {}x{}x{} from {}",
        m.meta.images,
        m.meta.channels,
        m.meta.height,
        m.meta.width,
        m.meta.data.join(", ")
    );
    println!("preprocess:  {}", m.meta.preprocess);
    println!(
        "training:    seed {}, batch {}, {} of {} epochs on {}",
        m.meta.seed,
        m.meta.batch,
        m.meta.history.len(),
        m.meta.epochs_requested,
        m.meta.engine
    );
    if let Some(s) = &m.meta.stopped {
        println!("stopped:     {s}");
    }
    if let Some(p) = &m.prior {
        println!("prior:       {}", p.summary());
    }
    if let Some(wh) = &m.whiten {
        println!(
            "whitening:   ZCA filter of {0}x{0} patches, applied to every image the model encodes",
            wh.width
        );
    }
    println!("LL history (per image):");
    let n = m.meta.images.max(1) as f64;
    for h in &m.meta.history {
        println!(
            "  epoch {:>3}  LL {:>14.6e}  per image {:>10.4}{}",
            h.epoch,
            h.loglik,
            h.loglik / n,
            match h.revived {
                0 => String::new(),
                r => format!("  (then {r} kernels revived)"),
            }
        );
    }
    let usage = model::kernel_use(&m.theta, &m.counts);
    let mut order: Vec<usize> = (0..m.counts.len()).collect();
    order.sort_by(|&i, &j| m.counts[j].total_cmp(&m.counts[i]));
    println!("counts B' (effective number of patches per kernel), largest first:");
    for chunk in order.chunks(8) {
        let line: Vec<String> = chunk
            .iter()
            .map(|&k| format!("k{k}:{:.3}", m.counts[k]))
            .collect();
        println!("  {}", line.join("  "));
    }
    println!(
        "unused kernels (count < 1): {} of {}",
        usage.unused,
        m.counts.len()
    );
    println!(
        "distinct kernels (none within 1% relative distance of another): {} of {}",
        usage.distinct,
        m.counts.len()
    );
    Ok(())
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
        (Some(l), _) => data::load_labels(l)?,
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

pub fn eval(mut a: EvalArgs) -> Result<Vec<EvalRow>> {
    check_positive("pool", a.pool)?;
    check_positive("max-iter", a.max_iter)?;
    if a.preset == Some(Preset::Recommended) {
        if a.pool != 1 || a.encode != Encoding::Lse {
            bail!(
                "--preset recommended sets --pool {} --encode {}; drop --pool and --encode",
                RECOMMENDED.pool,
                RECOMMENDED.encoding
            );
        }
        a.pool = RECOMMENDED.pool;
        a.encode = RECOMMENDED.encoding;
        a.standardize = true;
    }
    check_positive("batch", a.batch)?;
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
        (None, Some(_), Some(_)) => {
            bail!(
                "--val-split holds out part of the shipped digits here, so --test is not used; give --train too, or drop --test"
            )
        }
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
        standardize: a.standardize,
        ..Default::default()
    };
    let g_tr = model_geometry_for(&model, xtr.as_ref())?;
    let g_te = model_geometry_for(&model, xte.as_ref())?;
    // Features of the probe's training and held-out images under `theta`.
    let pooling = Pooling {
        grid: a.pool,
        encoding: a.encode,
    };
    // The model's layer sees its images whitened as in training (when it was).
    let (wtr, wte) = (
        whitened(&model, xtr.clone())?,
        whitened(&model, xte.clone())?,
    );
    let pair = |theta: &[f32],
                prior: &calm_gpu::prior::Prior,
                sets: (&Arc<dyn ImageSource>, &Arc<dyn ImageSource>)|
     -> Result<(ndarray::Array2<f32>, ndarray::Array2<f32>)> {
        let f = |g, x: &Arc<dyn ImageSource>| {
            run::features(
                a.backend,
                g,
                x.clone(),
                theta,
                prior,
                a.batch,
                pooling,
                &mut |_| {},
            )
        };
        Ok((f(g_tr, sets.0)?, f(g_te, sets.1)?))
    };
    let mut sets: Vec<(String, FeaturePair<'_>)> = vec![(
        format!(
            "calm (K={}{}{})",
            model.meta.layer.kernels,
            if a.pool > 1 {
                format!(", pool {0}x{0}", a.pool)
            } else {
                String::new()
            },
            if a.encode == Encoding::Lse {
                String::new()
            } else {
                format!(", {}", a.encode)
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
            &serde_json::json!({ "model": a.model, "held_out": held_out, "pool": a.pool, "encode": a.encode, "standardize": a.standardize, "results": rows }),
        )?;
        model::write_atomic(j, text.as_bytes(), a.force)?;
    }
    Ok(rows)
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

fn reproduce(a: ReproduceArgs) -> Result<()> {
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
    train(TrainArgs {
        data: train_data.clone(),
        backend: Some(a.backend),
        // The preset brings its own layer for MNIST-shaped data; STL-10 keeps its protocol's.
        kernels: (!mnist_preset).then_some(layer.kernels),
        width: (!mnist_preset).then_some(layer.width),
        pad: (!mnist_preset).then_some(layer.pad),
        batch,
        epochs: (!mnist_preset || a.epochs.is_some()).then_some(epochs),
        seed: a.seed,
        init: None,
        out: model_path.clone(),
        metrics: Some(out.join("metrics.jsonl")),
        force: a.force,
        quiet: false,
        checkpoint_dir: None,
        preprocess: Some(pre),
        plot: Some(out.join("loglik.png")),
        resume: None,
        init_method: None,
        revive: false,
        tol: None,
        learn_weights: false,
        learn_variance: false,
        protocol: if a.preset.is_none() {
            Some(TrainProtocol::Paper)
        } else {
            None
        },
        preset: a.preset,
        cache: None,
        whiten: None,
    })?;
    let train_secs = t0.elapsed().as_secs_f64();
    show(ShowArgs {
        model: model_path.clone(),
        out: Some(out.join("kernels.png")),
        plot: None,
        per_row: 8,
        scale: None,
        force: true,
    })?;
    println!("== {name}: linear probe on CALM features, raw pixels and random kernels");
    let rows = eval(EvalArgs {
        model: model_path.clone(),
        preset: a.preset,
        train: Some(probe_train.0.clone()),
        train_labels: Some(probe_train.1.clone()),
        test: Some(probe_test.0.clone()),
        test_labels: Some(probe_test.1.clone()),
        baseline: vec![Baseline::Raw, Baseline::Random],
        backend: a.backend,
        batch,
        c: 1.0,
        max_iter: 1000,
        standardize: false,
        pool: 1,
        encode: Encoding::Lse,
        val_split: None,
        json: Some(out.join("results.json")),
        force: true,
    })?;
    let m = Model::load(&model_path)?;
    let last = m.meta.history.last();
    let mut md = match a.preset {
        None => format!("# calm-gpu: the {name} protocol\n\n"),
        Some(_) => format!(
            "# calm-gpu: the {name} protocol, calm-gpu's recommended configuration\n\nImages whitened over 7x7 patches, data-patch initialisation, revival{}; the probe sees the triangle encoding summed over a 4x4 grid, standardised.\n\n",
            if mnist_preset {
                ", K 128 kernels of 8x8 without padding"
            } else {
                ", the protocol's layer"
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
    for r in &rows {
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
    model::write_atomic(&out.join("results.md"), md.as_bytes(), true)?;
    println!("wrote {}", out.join("results.md").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
