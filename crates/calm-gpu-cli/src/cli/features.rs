//! `calm-gpu features`: a dataset's features under a model, written as .npy.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::values;
use calm_gpu::Device;
use calm_gpu::Encoding;
use calm_gpu::data::preprocess::Preprocess;
use calm_gpu::features::Pooling;
use calm_gpu::net::Network;
use calm_gpu::{data, model, run};

use super::outputs::{check_distinct, check_output};
use super::{
    check_network, check_positive, embedded, load_data, model_geometry_for, model_preprocess,
    network_fits, whitened,
};

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
    /// [default: the model's recipe, else 1]
    #[arg(long, value_name = "G")]
    pub pool: Option<usize>,
    /// Encoding of L before pooling: lse (SPEC's log-sum-exp) or triangle (see `eval --help`)
    /// [default: the model's recipe, else lse]
    #[arg(long, value_parser = values::encoding())]
    pub encode: Option<Encoding>,
    /// Where the features are computed: a hardware GPU if auto finds one, else the CPU engine
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
    /// Images per batch; bounds memory only
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
}

pub(super) fn features(a: FeaturesArgs) -> Result<()> {
    check_positive("batch", a.batch)?;
    if let Some(p) = a.pool {
        check_positive("pool", p)?;
    }
    check_output(&a.out, a.force)?;
    let mut inputs = vec![a.model.as_path()];
    inputs.extend(a.data.as_deref());
    check_distinct(&inputs, &[&a.out])?;
    let net = Network::load(&a.model)?;
    let model = net.first().clone();
    let pre = model_preprocess(&model)?;
    if !net.is_single() {
        check_network(&net, a.pool.is_some() || a.encode.is_some())?;
    }
    if let Some(head) = net.spec.links.get(net.spec.layers.len() - 1) {
        eprintln!("note: features by the network's head `{head}`");
    }
    let pooling = match model.meta.features {
        Some(r) if net.spec.has_head() => r.pooling(),
        Some(r) if a.pool.is_none() && a.encode.is_none() => {
            eprintln!(
                "note: features by the model's recipe: {} on {}x{} regions (--pool and --encode override)",
                r.encoding, r.grid, r.grid
            );
            r.pooling()
        }
        _ => Pooling {
            grid: a.pool.unwrap_or(1),
            encoding: a.encode.unwrap_or_default(),
        },
    };
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
    let bar = super::progress_bar(false, data.len());
    if let Some(b) = &bar {
        b.set_message("features");
    }
    let mut progress = |done: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    let f = if net.is_single() {
        let g = model_geometry_for(&model, data.as_ref())?;
        let data = whitened(&model, data)?;
        run::features(
            a.backend,
            g,
            data.clone(),
            &model.theta,
            &model.prior_or_uniform(),
            a.batch,
            pooling,
            &super::gpu_config()?,
            super::stop_token(),
            &mut progress,
        )?
    } else {
        network_fits(&net, data.as_ref())?;
        net.features(
            a.backend,
            &super::gpu_config()?,
            data,
            pooling,
            super::stop_token(),
            &mut progress,
        )?
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // Finite data and weights can still overflow f32 on the way (values near 1e19 square to
    // infinity): such features are useless to every reader, so they are refused, not written.
    if let Some((i, v)) = f.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        bail!(
            "the features of image {} hold {v}: the data's values or the model's weights are too large for f32 arithmetic; {} was not written",
            i / f.ncols().max(1),
            a.out.display()
        );
    }
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
