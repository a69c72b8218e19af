//! `calm-gpu bench` (epoch and kernel times on a protocol's shape) and `calm-gpu tune` (the fastest checked kernels for this GPU).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use super::values;
use calm_gpu::Device;
use calm_gpu::autotune::SweepEvent;
use calm_gpu::gpu::GpuContext;
use calm_gpu::{Geometry, LayerConfig, em, model};

use super::outputs::{check_output, create_parent};
use super::{check_positive, install_ctrl_c};

#[derive(Args)]
// "-1" for a number is read as a value, so the error says what is wrong with it.
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    /// Engine to time: a GPU backend, or cpu; auto, as for train, is a hardware GPU if there is
    /// one and the CPU engine otherwise (name vulkan to time a software device such as lavapipe)
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
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
    /// Time each layer of a deep network (train --net's grammar) on the protocol's images: every
    /// layer's EM epoch on random inputs of its shape (the links are computed once per layer,
    /// not per epoch, and are not timed), one row per layer
    #[arg(long, value_name = "SPEC", value_parser = values::net_spec())]
    pub net: Option<calm_gpu::net::NetSpec>,
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
    // The layers to time: the protocol's, or each layer of --net on the protocol's images.
    let layers: Vec<Geometry> = match &a.net {
        None => vec![Geometry::new(layer, c, h, w)?],
        Some(spec) => spec
            .shapes(c, h, w)?
            .into_iter()
            .map(|s| s.geometry)
            .collect(),
    };
    let mut rows = Vec::new();
    let cfg = super::gpu_config()?;
    let gpu = a.backend.context_with(&cfg)?;
    for (i, &g) in layers.iter().enumerate() {
        if layers.len() > 1 {
            eprintln!(
                "layer {} of {}: {}",
                i + 1,
                layers.len(),
                calm_gpu::gpu::tune::shape_key(&g)
            );
        }
        let data = Arc::new(random_images(n, g.c, g.h, g.w)?);
        let theta = em::init_theta(&g, 0);
        let mut layer_rows = Vec::new();
        if let Some(ctx) = &gpu {
            layer_rows.push(calm_gpu::bench::time_gpu(
                ctx,
                g,
                &data,
                &theta,
                a.epochs,
                calm_gpu::gpu::GpuOptions {
                    stream: a.stream,
                    cancel: super::stop_token().clone(),
                    ..calm_gpu::gpu::GpuOptions::from_config(&cfg, batch)
                },
                None,
            )?);
        }
        if a.with_cpu || gpu.is_none() {
            layer_rows.push(calm_gpu::bench::time_cpu(
                g,
                data.clone(),
                &theta,
                batch,
                a.epochs,
            )?);
        }
        rows.extend(layer_rows.into_iter().map(|r| (i + 1, r)));
    }
    let deep = layers.len() > 1;
    let layer_col = |l: usize| {
        if deep {
            format!("{l:<6}")
        } else {
            String::new()
        }
    };
    println!(
        "{}{}",
        if deep { "layer " } else { "" },
        calm_gpu::bench::Row::header()
    );
    for (l, r) in &rows {
        println!("{}{}", layer_col(*l), r.line());
    }
    if deep {
        // The network's epochs, one of each layer's, by engine.
        // Each engine once, in the order the rows name them (a layer's GPU row, then its CPU row).
        let mut engines: Vec<&str> = Vec::new();
        for (_, r) in &rows {
            if !engines.contains(&r.engine.as_str()) {
                engines.push(&r.engine);
            }
        }
        for e in engines {
            let (s, f): (f64, f64) = rows
                .iter()
                .filter(|(_, r)| r.engine == e)
                .fold((0.0, 0.0), |(s, f), (_, r)| {
                    (s + r.epoch_s, f + r.epoch_s * r.epoch_gflops)
                });
            println!(
                "{e}: one epoch of every layer {:.1} ms, {:.1} GFLOP/s",
                s * 1e3,
                f / s
            );
        }
    }
    for (l, k) in rows
        .iter()
        .filter_map(|(l, r)| Some((l, r.kernels.as_ref()?)))
    {
        println!(
            "kernels{}: {k}",
            if deep {
                format!(" (layer {l})")
            } else {
                String::new()
            }
        );
    }
    for (l, line) in rows.iter().filter_map(|(l, r)| Some((l, r.peak_line()?))) {
        match deep {
            true => println!("layer {l}: {line}"),
            false => println!("{line}"),
        }
    }
    if let Some(p) = &a.json {
        let mut s = String::new();
        for (l, r) in &rows {
            let mut v = serde_json::to_value(r)?;
            if deep && let Some(o) = v.as_object_mut() {
                o.insert("layer".into(), (*l).into());
            }
            s.push_str(&serde_json::to_string(&v)?);
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
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
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
    /// Start no candidate after this many seconds of the sweep, and decide among those timed
    /// (the built-in choice, timed first, always runs): for a sweep that must fit a deadline
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
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
pub(super) fn tune(a: TuneArgs) -> Result<()> {
    use calm_gpu::autotune::{self, SweepConfig};
    use calm_gpu::gpu::tune::{self, Choice};
    let Some(b) = a.backend.gpu() else {
        bail!("tune times the GPU kernels; choose --backend vulkan, metal, dx12, gl or auto");
    };
    check_positive("epochs", a.epochs)?;
    if let Some(l) = a.time_limit.filter(|l| !(l.is_finite() && *l >= 0.0)) {
        bail!("--time-limit must be a number of seconds, 0 or more (got {l})");
    }
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
    // The candidates choose the kernels; the adapter, memory and checks are the environment's.
    let cfg = super::gpu_config()?;
    let ctx = Arc::new(GpuContext::open(b, false, &cfg)?);
    let software = ctx.info.device_type == calm_gpu::wgpu::DeviceType::Cpu;
    let n = a.images.unwrap_or(match (software, a.protocol) {
        (false, _) => images,
        (true, Protocol::Mnist) => 300,
        (true, Protocol::Stl10) => 4,
    });
    check_positive("images", n)?;
    install_ctrl_c();
    let builtin = calm_gpu::gpu::tune::builtin_choice(&ctx, &g)?;
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
    let path = super::tune_file_path();
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
    let data = Arc::new(random_images(n, c, h, w)?);
    // One JSON line per candidate, written as it finishes, so a sweep cut short keeps its lines.
    let mut json = match &a.json {
        Some(p) => {
            create_parent(p)?;
            Some((
                std::fs::File::create(p).with_context(|| p.display().to_string())?,
                p,
            ))
        }
        None => None,
    };
    let cfg = SweepConfig {
        epochs: a.epochs,
        batch,
        time_limit_s: a.time_limit,
        cancel: super::stop_token().clone(),
    };
    let mut running = false;
    let swept = autotune::sweep(&ctx, g, &data, &list, builtin, &cfg, &mut |e| {
        show_sweep(e, &mut running, &mut json)
    });
    let sweep = match swept {
        Err(calm_gpu::CalmError::Interrupted) => {
            if running {
                println!("interrupted");
            }
            return Err(anyhow::Error::from(calm_gpu::CalmError::Interrupted)
                .context("interrupted; the tuning file is unchanged"));
        }
        s => s?,
    };
    let Some((fastest, fastest_t)) = sweep.fastest() else {
        bail!("no candidate passed the check and ran; the tuning file is unchanged");
    };
    let builtin_t = sweep.builtin_timing();
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
    let keep = sweep.keep();
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
    let (best, best_t) = match keep {
        Ok(k) => k,
        Err(why) => {
            let adapter = tune::AdapterKey::of(&ctx.info);
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
    tune::store(&path, sweep.entry(&ctx, &g, best, best_t))?;
    println!(
        "saved to {}: train, features, bench and validate run {best} on this adapter for {} (unless CALM_TILES or CALM_KERNELS is set; CALM_TUNE_FILE=off ignores the file)",
        path.display(),
        tune::shape_key(&g)
    );
    Ok(())
}

/// Prints the sweep as it goes (`[i/n] choice: result`) and writes each candidate's JSON line.
fn show_sweep(
    e: &SweepEvent,
    running: &mut bool,
    json: &mut Option<(std::fs::File, &PathBuf)>,
) -> calm_gpu::Result<()> {
    match *e {
        SweepEvent::TimeLimit {
            limit_s,
            elapsed_s,
            skipped_from,
            total,
        } => println!(
            "time limit of {limit_s} s reached after {elapsed_s:.1} s: the last {} of {total} candidates were not run",
            total - skipped_from
        ),
        SweepEvent::Started {
            index,
            total,
            choice,
        } => {
            print!("[{}/{total}] {choice}: ", index + 1);
            let _ = std::io::stdout().flush();
            *running = true;
        }
        SweepEvent::Finished { candidate: c, .. } => {
            *running = false;
            match &c.row {
                Some(r) => println!(
                    "epoch {:.2} ms, {:.1} GFLOP/s (E {:.2} ms, M {:.2} ms; checked and timed in {:.1} s)",
                    r.epoch_s * 1e3,
                    r.epoch_gflops,
                    r.estep_s.unwrap_or(f64::NAN) * 1e3,
                    r.mstep_s.unwrap_or(f64::NAN) * 1e3,
                    c.seconds
                ),
                None => println!("{}", c.status),
            }
            if let Some((f, path)) = json.as_mut() {
                let line = serde_json::json!({
                    "choice": c.choice.to_string(),
                    "builtin": c.builtin,
                    "status": c.status,
                    "row": c.row,
                });
                writeln!(f, "{line}")
                    .and_then(|_| f.flush())
                    .map_err(|e| calm_gpu::CalmError::io(path, e))?;
            }
        }
    }
    Ok(())
}

/// The benchmark's random images (seed 7), or an error that names the flag to change.
fn random_images(n: usize, c: usize, h: usize, w: usize) -> Result<calm_gpu::data::Dataset> {
    calm_gpu::bench::try_random_images(7, n, c, h, w)
        .map_err(|e| anyhow::anyhow!("{e}; use fewer --images"))
}
