//! `calm-gpu show` (kernels and LL curve as PNG) and `calm-gpu info` (a model's config and history).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use calm_gpu::model;
use calm_gpu::model::Model;
use calm_gpu::net::Network;

use super::check_positive;
use super::outputs::{check_distinct, check_output};

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
    /// Pixels per kernel pixel (default: about 100 pixels per kernel; less where the picture would
    /// pass 16,384 px a side)
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

pub(super) fn write_plot(model: &Model, path: &Path, force: bool) -> Result<()> {
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

pub(super) fn show(a: ShowArgs) -> Result<()> {
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
    let mut net = Network::load(&a.model)?;
    if !net.is_single() {
        eprintln!(
            "note: {} is a network of {} layers; drawing layer 1's kernels and LL",
            a.model.display(),
            net.layers.len()
        );
    }
    let model = net.layers.swap_remove(0);
    if a.plot.is_some() && model.meta.history.is_empty() {
        bail!(
            "{}: the model has no completed epochs to plot",
            a.model.display()
        );
    }
    if let Some(out) = &a.out {
        let l = model.meta.layer;
        let wanted = a
            .scale
            .unwrap_or_else(|| calm_gpu::viz::default_scale(l.width));
        let scale = match calm_gpu::viz::fit_scale(l.kernels, l.width, a.per_row, wanted) {
            Ok(s) => s,
            Err(e) if e.min_per_row <= e.max_per_row => bail!(
                "{} kernels at {} per row make a picture of {}x{} px even at scale 1, more than {} px a side; give --per-row from {} to {}",
                l.kernels,
                a.per_row,
                e.width,
                e.height,
                calm_gpu::viz::MAX_GRID_SIDE,
                e.min_per_row,
                e.max_per_row
            ),
            Err(_) => bail!(
                "{} kernels of {}x{} do not fit one picture of at most {} px a side at any --per-row",
                l.kernels,
                l.width,
                l.width,
                calm_gpu::viz::MAX_GRID_SIDE
            ),
        };
        if scale < wanted {
            eprintln!(
                "note: drawn at scale {scale}, not {wanted}: the largest that keeps the picture within {} px a side",
                calm_gpu::viz::MAX_GRID_SIDE
            );
        }
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

/// A layer's metadata as `info --json` prints it, with what its weights say: kernel use and
/// the learned prior.
fn layer_json(m: &Model) -> Result<serde_json::Value> {
    let mut j = serde_json::to_value(&m.meta)?;
    let usage = model::kernel_use(&m.theta, &m.counts);
    j["kernels_unused"] = usage.unused.into();
    j["kernels_distinct"] = usage.distinct.into();
    if let Some(p) = &m.prior {
        j["variance"] = (1.0 / f64::from(p.inv_var)).into();
        j["mixing_weights"] = p.weights().into();
    }
    Ok(j)
}

pub(super) fn info(a: InfoArgs) -> Result<()> {
    let net = Network::load(&a.model)?;
    let m = net.first();
    if a.json {
        // A network: layer 1's entries as a model's, and its spec and every layer under "net".
        let mut j = layer_json(m)?;
        if !net.is_single() {
            let layers: Result<Vec<_>> = net.layers.iter().map(layer_json).collect();
            j["net"] = serde_json::json!({
                "spec": net.spec.to_string(),
                "layers_fitted": net.layers.len(),
                "layers": layers?,
            });
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let l = m.meta.layer;
    println!("model:       {}", a.model.display());
    if !net.is_single() {
        println!("network:     {}", net.spec);
        for line in net.describe() {
            println!("  {line}");
        }
        println!("layer 1 in detail:");
    }
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
    if m.meta
        .options
        .as_ref()
        .and_then(|o| o.get("posterior"))
        .and_then(|v| v.as_str())
        == Some("patch")
    {
        println!(
            "posterior:   per patch (each patch a mixture over the kernels; LL sums over patches)"
        );
    }
    if let Some(eps) = m.patch_norm() {
        println!(
            "patches:     contrast-normalised, (x - mean) / sqrt(var + {eps}), in training and in every image the model encodes"
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
