//! The command line: the clap definitions of the commands, the dispatch, and what several
//! commands share (data loading, the preset, the model's preprocessing); each command's
//! arguments and function live in the submodule named after it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use calm_gpu::Device;
use calm_gpu::Encoding;
use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::data::{self, ImageSource};
use calm_gpu::model::Model;
use calm_gpu::{Geometry, LayerConfig};

mod bench;
mod eval;
mod features;
mod outputs;
pub mod parallel;
mod reproduce;
mod show;
mod train;
mod validate;
mod values;

use bench::{BenchArgs, TuneArgs, bench, tune};
use eval::{EvalArgs, eval};
use features::{FeaturesArgs, features};
use reproduce::{ReproduceArgs, reproduce};
use show::{InfoArgs, ShowArgs, info, show};
use train::{TrainArgs, train};
use validate::{ValidateArgs, devices, validate};

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

/// A named configuration beyond SPEC's protocol, chosen by measurement (docs/results.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// train: images whitened over 7x7 patches, K 128 kernels of 8x8 without padding, every
    /// patch contrast-normalised (eps 0.01), data-patch init, revival, 10 epochs; eval: the
    /// triangle encoding over a 4x4 grid, standardised (reproduce stl10 keeps the protocol's
    /// layer and raw patches)
    Recommended,
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(w) = parallel::world()
        && w.size() > 1
        && !matches!(cli.command, Command::Train(_))
    {
        bail!(
            "only `train` runs over MPI; run the other commands as one process (this job has {} ranks)",
            w.size()
        );
    }
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
    let (source, names, pre, _) = load_inputs(paths, pre, None)?;
    Ok((source, names, pre))
}

/// [`load_data`] for one rank of a data-parallel job: only the images of its batches (of
/// `batch` images, [`calm_gpu::dist::Sharding`]) are kept, and the number of images in the
/// whole data comes fourth.
pub fn load_shard(
    paths: &[PathBuf],
    pre: Option<Preprocess>,
    batch: usize,
    comm: &dyn calm_gpu::dist::Comm,
) -> Result<Inputs> {
    load_inputs(paths, pre, Some((batch, comm.rank(), comm.size())))
}

/// The images a run reads: `(source, names of the inputs, preprocessing, images in the whole
/// data)`; the source is a rank's shard in an MPI job.
pub type Inputs = (Arc<dyn ImageSource>, Vec<String>, Preprocess, usize);

/// `shard`: `(batch, rank, ranks)` keeps only the rank's images.
fn load_inputs(
    paths: &[PathBuf],
    pre: Option<Preprocess>,
    shard: Option<(usize, usize, usize)>,
) -> Result<Inputs> {
    let keep = |i: usize| shard.is_none_or(|(batch, rank, size)| (i / batch) % size == rank);
    if paths.is_empty() {
        if let Some(p) = pre.filter(|p| *p != Preprocess::Scale) {
            bail!("the shipped digits are scaled to [0, 1] already; --preprocess {p} needs --data");
        }
        let all = embedded(data::Split::Train);
        let n = all.len();
        let source: Arc<dyn ImageSource> = match shard {
            None => all,
            Some(_) => Arc::from(data::open_shard_of(all, 0, &keep)?),
        };
        return Ok((
            source,
            vec!["embedded:digits-train".into()],
            Preprocess::Scale,
            n,
        ));
    }
    let pre = match pre {
        Some(p) => p,
        None => default_preprocess(&paths[0])?,
    };
    let mut parts: Vec<Box<dyn ImageSource>> = Vec::new();
    let mut n = 0;
    for p in paths {
        let (part, len) = match shard {
            None => {
                let part = data::open_source(p, Some(pre))?;
                let len = part.len();
                (part, len)
            }
            Some(_) => data::open_shard(p, pre, n, &keep)?,
        };
        n += len;
        // One shape for all of --data, told with the files' names.
        if let Some(first) = parts.first().map(|f| f.shape()) {
            let (c, h, w) = part.shape();
            if (c, h, w) != first {
                bail!(
                    "--data {} has images {c}x{h}x{w} (C x H x W) but --data {} has {}x{}x{}; every --data must have one shape",
                    p.display(),
                    paths[0].display(),
                    first.0,
                    first.1,
                    first.2
                );
            }
        }
        parts.push(part);
    }
    let names = paths.iter().map(|p| p.display().to_string()).collect();
    let source: Arc<dyn ImageSource> = if parts.len() == 1 {
        Arc::from(parts.pop().expect("one"))
    } else {
        Arc::new(data::Concat::new(parts)?)
    };
    if n == 0 {
        bail!("the data holds no images");
    }
    Ok((source, names, pre, n))
}

fn check_positive(name: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("--{name} must be at least 1");
    }
    Ok(())
}

/// `--preset recommended`: the library's [`calm_gpu::CalmParams::recommended`], as
/// docs/results.md's ablation chose it on validation splits of the digits and Fashion-MNIST.
struct Recommended {
    layer: LayerConfig,
    epochs: usize,
    pool: usize,
    encoding: Encoding,
}

static RECOMMENDED: std::sync::LazyLock<Recommended> = std::sync::LazyLock::new(|| {
    let p = calm_gpu::CalmParams::recommended();
    let recipe = p.recipe.expect("the recommended parameters keep a recipe");
    Recommended {
        layer: p.layer,
        epochs: p.epochs,
        pool: recipe.grid,
        encoding: recipe.encoding,
    }
});

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn backend_from_name(name: &str) -> Result<Device> {
    name.parse::<Device>()
        .map_err(|e| anyhow::anyhow!("backend `{name}` in the checkpoint: {e}"))
}

/// The process's stop request: cancelled by Ctrl-C ([`install_ctrl_c`]), passed to every fit,
/// feature pass and timed run the commands start.
fn stop_token() -> &'static calm_gpu::CancelToken {
    static STOP: std::sync::OnceLock<calm_gpu::CancelToken> = std::sync::OnceLock::new();
    STOP.get_or_init(calm_gpu::CancelToken::new)
}

/// The GPU configuration the environment asks for (docs/tuning.md): `CALM_KERNELS`,
/// `CALM_TILES`, `CALM_CHECKS=on`, `CALM_GPU_MEMORY` (MiB), `CALM_TUNE_FILE`,
/// `CALM_TENSOR_CORES=0` and `WGPU_ADAPTER_NAME`. The library reads none of them itself.
fn gpu_config() -> Result<calm_gpu::GpuConfig> {
    let var = |name: &str| std::env::var(name).ok();
    let kernels = match var("CALM_KERNELS") {
        Some(s) => Some(
            calm_gpu::gpu::kernels::Variant::parse(&s)
                .map_err(|why| anyhow::anyhow!("CALM_KERNELS={s}: {why}"))?,
        ),
        None => None,
    };
    let tiles = match var("CALM_TILES") {
        Some(s) => Some(calm_gpu::gpu::Tiles::parse(&s)?),
        None => None,
    };
    let memory_budget = match var("CALM_GPU_MEMORY") {
        Some(s) => match s.trim().parse::<u64>() {
            Ok(mib) if mib > 0 => Some(mib << 20),
            _ => bail!("CALM_GPU_MEMORY={s}: expected a positive number of MiB"),
        },
        None => None,
    };
    let by_env =
        std::env::var_os("CALM_TILES").is_some() || std::env::var_os("CALM_KERNELS").is_some();
    Ok(calm_gpu::GpuConfig {
        kernels,
        tiles,
        checks: var("CALM_CHECKS").as_deref() == Some("on"),
        memory_budget,
        tune_file: tune_file_path(),
        adapter_name: var("WGPU_ADAPTER_NAME"),
        // One GPU per rank on a machine: the rank among the job's processes there.
        adapter_index: parallel::world().and(parallel::local_rank()),
        chosen_by: by_env.then(|| "CALM_TILES / CALM_KERNELS".to_string()),
        // wgpu's own variables (WGPU_BACKEND, WGPU_VALIDATION, ...) hold for the CLI.
        wgpu_env: true,
        // The tensor-core kernels where the adapter has what they need, unless turned off.
        cooperative_matrices: !matches!(
            var("CALM_TENSOR_CORES").as_deref().map(str::trim),
            Some("0" | "off" | "OFF" | "no")
        ),
    })
}

/// Where the tuning file is: `CALM_TUNE_FILE` (empty or `off`, any case: none), else
/// `$XDG_CACHE_HOME/calm-gpu/tuned.json` or `~/.cache/calm-gpu/tuned.json`; on Windows
/// `%LOCALAPPDATA%\calm-gpu\tuned.json`.
fn tune_file_path() -> Option<PathBuf> {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = std::env::var_os("CALM_TUNE_FILE") {
        let off = p.is_empty() || p.to_str().is_some_and(|s| s.eq_ignore_ascii_case("off"));
        return (!off).then(|| PathBuf::from(p));
    }
    // Windows first asks LOCALAPPDATA: shells such as Git Bash set HOME too, and every shell
    // should find the same file.
    let windows = if cfg!(windows) {
        env("LOCALAPPDATA").map(PathBuf::from)
    } else {
        None
    };
    let dir = windows
        .or_else(|| env("XDG_CACHE_HOME").map(PathBuf::from))
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .or_else(|| env("LOCALAPPDATA").map(PathBuf::from))?;
    Some(dir.join("calm-gpu").join("tuned.json"))
}

/// Ctrl-C (and SIGTERM or SIGHUP, as a batch scheduler or a closed terminal sends them) asks
/// the work holding [`stop_token`] to stop after the current batch; a second one exits at once.
fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if stop_token().is_cancelled() {
            eprintln!(
                "error: interrupted twice; exiting without a checkpoint of the current epoch"
            );
            calm_gpu::interrupt::remove_pending_files();
            std::process::exit(130);
        }
        if parallel::is_root() {
            eprintln!("stopping after the current batch (Ctrl-C again to quit now)...");
        }
        stop_token().cancel();
    });
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

/// `data` through the model's patch-whitening filter, if it has one (`train --whiten`).
fn whitened(model: &Model, data: Arc<dyn ImageSource>) -> Result<Arc<dyn ImageSource>> {
    Ok(match &model.whiten {
        Some(wh) => Arc::new(data::Whitened::new(data, Arc::new(wh.clone()))?),
        None => data,
    })
}

/// A network `features` and `eval` can read: every layer fitted. `pooling_flags`: --pool or
/// --encode given, which a network with a feature head does not use.
fn check_network(net: &calm_gpu::net::Network, pooling_flags: bool) -> Result<()> {
    if !net.is_complete() {
        bail!(
            "the network has {} of its {} layers fitted (a checkpoint's?); finish it with train --resume",
            net.layers.len(),
            net.spec.layers.len()
        );
    }
    if pooling_flags && net.spec.has_head() {
        bail!(
            "the network's features are its head's map (`{}`); --pool and --encode apply only to a network without a head",
            net.spec.head().expect("has a head")
        );
    }
    Ok(())
}

/// The network's layers placed on `data`'s images (any size of its channel count).
fn network_fits(net: &calm_gpu::net::Network, data: &dyn ImageSource) -> Result<()> {
    let (c, h, w) = data.shape();
    net.spec.shapes(c, h, w).map_err(|e| {
        anyhow::anyhow!(
            "the network does not fit the data's {c}x{h}x{w} images: {}",
            e.reason
        )
    })?;
    Ok(())
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
    Ok(model.geometry_for(c, h, w)?)
}

fn embedded(split: data::Split) -> Arc<dyn ImageSource> {
    Arc::new(data::embedded_digits(split))
}
