//! `calm-gpu train --net`: a deep network fitted layer by layer through the library's
//! [`NetTrainer`], with what `train` writes around it (locks, metrics, the Ctrl-C checkpoint).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};

use calm_gpu::dist::Comm;
use calm_gpu::em::Event;
use calm_gpu::model::EpochRecord;
use calm_gpu::net::{LayerShape, NetEvent, NetParams, NetTrainer};

use super::{
    MetricsLog, Outputs, RunConfig, cached, calm_flag_error, data_info, flag_error, report,
    run_entries,
};
use crate::cli::{
    Inputs, install_ctrl_c, load_data, load_shard, parallel, progress_bar, stop_token,
};

/// Fits the network `params` describes on the run's data, continuing the checkpoint directory
/// `resume` where given, and writes it to `--out`.
pub(super) fn fit_net(
    cfg: RunConfig,
    params: NetParams,
    resume: Option<PathBuf>,
    quiet: bool,
) -> Result<()> {
    params.base.check().map_err(flag_error)?;
    if cfg.plot.is_some() {
        bail!(
            "--plot draws one layer's LL; a network's epochs go to --metrics (a line per epoch, with its layer)"
        );
    }
    // In an MPI job only rank 0 prints and writes.
    let world = parallel::world();
    let outputs = match parallel::is_root() {
        true => Some(Outputs::claim(&cfg, resume.is_some(), quiet)?),
        false => None,
    };
    let quiet = quiet || outputs.is_none();
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let ((data, names, pre, n), shapes) = net_data(&cfg, &params, world.as_ref(), quiet)?;
    let trainer = match (&world, &resume) {
        (Some(w), dir) => NetTrainer::sharded(&params, data, n, w.clone(), dir.as_deref()),
        (None, Some(dir)) => NetTrainer::resume(&params, data, dir),
        (None, None) => NetTrainer::new(&params, data),
    }
    .map_err(calm_flag_error)?;
    let mut trainer = trainer
        .with_cancel(stop_token().clone())
        .with_data_info(data_info(&names, pre))
        .checkpoint_extra(run_entries(&cfg)?);
    if let Some(dir) = &cfg.checkpoint_dir {
        trainer = trainer.checkpoint_every_epoch(dir.clone());
    }
    for l in plan(&params, &shapes, &names, n, cfg.epochs) {
        say(l);
    }
    if let Some(w) = &world {
        say(format!(
            "MPI: {} processes; batch b of {} images is rank b % {}'s in every layer, and each layer's statistics and standardisation are summed in batch order",
            w.size(),
            params.base.batch,
            w.size()
        ));
    }
    let resumed_layer = trainer.layers_done() + 1;
    let resumed_epochs = trainer.resumed_records().len();
    if resume.is_some() {
        say(format!(
            "resuming at layer {resumed_layer}, after {resumed_epochs} of its epochs"
        ));
    }
    let mut metrics = match outputs {
        Some(_) => open_metrics(&cfg, resume.is_some(), &trainer)?,
        None => None,
    };
    let bar = progress_bar(quiet, n);
    install_ctrl_c();
    let mut io_err: Option<std::io::Error> = None;
    let mut layer = resumed_layer;
    let mut computing = 0;
    let outcome = trainer.run(&mut |ev: &NetEvent| match ev {
        NetEvent::LayerStart {
            layer: l, layers, ..
        } => {
            layer = *l;
            let s = format!("layer {l}/{layers}");
            match &bar {
                Some(b) => b.println(s),
                None if !quiet => println!("{s}"),
                None => {}
            }
        }
        NetEvent::Input {
            layer: l, images, ..
        } => {
            if let Some(b) = &bar {
                if computing != *l {
                    b.reset();
                    b.set_message(format!("layer {l}'s input"));
                    computing = *l;
                }
                b.set_position(*images as u64);
            }
        }
        NetEvent::Fit(e) => {
            computing = 0;
            let first = if layer == resumed_layer {
                resumed_epochs + 1
            } else {
                1
            };
            report(e, &bar, cfg.epochs, first, quiet);
            if let (Event::EpochEnd(r), Some(m)) = (e, metrics.as_mut()) {
                let j = metrics_line(r, layer);
                if let Err(e) = writeln!(m.file, "{j}").and_then(|_| m.file.flush()) {
                    io_err.get_or_insert(e);
                }
            }
        }
        NetEvent::LayerEnd { .. } => {}
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = io_err {
        bail!("writing --metrics failed: {e}");
    }
    if outcome.interrupted {
        // exit() runs no destructors: the metrics and the locks go here.
        if let Some(outputs) = outputs {
            trainer.save_checkpoint(&outputs.checkpoint_dir)?;
            let dir = outputs.checkpoint_dir.clone();
            drop(metrics);
            drop(outputs);
            eprintln!(
                "error: interrupted in layer {} after {} complete layers; resume with: calm-gpu train --resume {}",
                trainer.layers_done() + 1,
                trainer.layers_done(),
                dir.display()
            );
        }
        parallel::exit(130);
    }
    if outputs.is_none() {
        // Another rank of an MPI job: rank 0 writes the network, the same as this one's.
        return Ok(());
    }
    write_network(&cfg, trainer, metrics, say)
}

/// The run's images (under MPI, this rank's shard) with their names, preprocessing and total
/// count, and each layer's shape on them (a spec that does not fit is refused here).
fn net_data(
    cfg: &RunConfig,
    params: &NetParams,
    world: Option<&Arc<dyn Comm>>,
    quiet: bool,
) -> Result<(Inputs, Vec<LayerShape>)> {
    let (data, names, pre, n) = match world {
        Some(w) => {
            if cfg.cache.is_some() {
                bail!("--cache is not available under MPI: each rank reads only its own images");
            }
            load_shard(&cfg.data, cfg.preprocess, params.base.batch, w.as_ref())?
        }
        None => {
            let (data, names, pre) = load_data(&cfg.data, cfg.preprocess)?;
            let n = data.len();
            (data, names, pre, n)
        }
    };
    let (c, h, w) = data.shape();
    let shapes = params.check_shape(c, h, w).map_err(calm_flag_error)?;
    let data = match &cfg.cache {
        Some(p) => cached(p, data, &names, pre, quiet)?,
        None => data,
    };
    Ok(((data, names, pre, n), shapes))
}

/// Writes the fitted network to `--out`, closes the metrics file and says what was written.
fn write_network(
    cfg: &RunConfig,
    trainer: NetTrainer,
    metrics: Option<MetricsLog>,
    say: impl Fn(String),
) -> Result<()> {
    let net = trainer.into_network();
    net.save(&cfg.out, cfg.force)?;
    if let Some(m) = metrics {
        m.finish()?;
    }
    for l in net.describe() {
        say(l);
    }
    println!(
        "wrote {} ({} layers{})",
        cfg.out.display(),
        net.layers.len(),
        if net.spec.has_head() {
            ", with a feature head"
        } else {
            ""
        }
    );
    Ok(())
}

/// What the run will do: the network, its data, and each layer's shape and cost.
fn plan(
    params: &NetParams,
    shapes: &[LayerShape],
    names: &[String],
    n: usize,
    epochs: usize,
) -> Vec<String> {
    let Some(first) = shapes.first() else {
        return Vec::new();
    };
    let g = first.geometry;
    let (c, h, w) = (g.c, g.h, g.w);
    let mut lines = vec![format!(
        "network `{}` on {n} images of {c}x{h}x{w} from {}; {} on {}",
        params.spec,
        names.join(", "),
        if epochs == 1 {
            "1 epoch a layer".to_string()
        } else {
            format!("{epochs} epochs a layer")
        },
        params.base.device
    )];
    for (i, s) in shapes.iter().enumerate() {
        let g = s.geometry;
        lines.push(format!(
            "  layer {}: K={} w={} p={} on {}x{}x{} -> {}x{} positions; {:.1} GFLOP per epoch",
            i + 1,
            g.k,
            g.kw,
            g.pad,
            g.c,
            g.h,
            g.w,
            g.ho,
            g.wo,
            g.epoch_flops(n) / 1e9
        ));
    }
    lines
}

/// The `--metrics` file: on resume, the lines of the layers fitted before the one under way
/// are kept (each was written before its layer was saved), and the layer under way's epochs are
/// rewritten from its checkpoint (a kill between a checkpoint and its line must neither lose nor
/// repeat one).
fn open_metrics(
    cfg: &RunConfig,
    resuming: bool,
    trainer: &NetTrainer,
) -> Result<Option<MetricsLog>> {
    let Some(p) = &cfg.metrics else {
        return Ok(None);
    };
    let mut text = String::new();
    if resuming {
        let layer = trainer.layers_done() + 1;
        let old = std::fs::read_to_string(p).unwrap_or_default();
        for line in old.lines() {
            let j = serde_json::from_str::<serde_json::Value>(line).ok();
            if j.and_then(|j| j["layer"].as_u64())
                .is_some_and(|l| (l as usize) < layer)
            {
                text.push_str(line);
                text.push('\n');
            }
        }
        for r in trainer.resumed_records() {
            text.push_str(&metrics_line(r, layer).to_string());
            text.push('\n');
        }
    }
    let replacing = !resuming && std::fs::metadata(p).is_ok_and(|m| m.is_file());
    Ok(Some(MetricsLog::create(p, &text, replacing)?))
}

/// One `--metrics` line: the epoch's record and its layer.
fn metrics_line(r: &EpochRecord, layer: usize) -> serde_json::Value {
    let mut j = serde_json::to_value(r).expect("plain numbers serialise");
    j["layer"] = layer.into();
    j
}
