//! Study: a network fitted on the first images of a training set, probed on the last ones.
//!
//!     cargo run --release --example deep_study -- SPEC digits|fashion N_TRAIN N_VAL EPOCHS [SEED]

use std::sync::Arc;

use calm_gpu::net::{NetParams, NetSpec};
use calm_gpu::probe::ProbeConfig;
use calm_gpu::{CalmParams, CancelToken, Device, GpuConfig, data};
use ndarray::s;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let spec: NetSpec = a[1].parse()?;
    let d = match a[2].as_str() {
        "digits" => data::embedded_digits(data::Split::Train),
        _ => data::load_labelled(
            "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz".as_ref(),
            "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz".as_ref(),
        )?,
    };
    let (ntr, nval): (usize, usize) = (a[3].parse()?, a[4].parse()?);
    let epochs: usize = a[5].parse()?;
    let seed: u64 = a.get(6).map_or(Ok(0), |s| s.parse())?;
    let n = d.images.shape()[0];
    let y = d.labels.clone().unwrap();
    let tr = data::Dataset::new(d.images.slice(s![..ntr, .., .., ..]).to_owned(), None);
    let va = data::Dataset::new(d.images.slice(s![n - nval.., .., .., ..]).to_owned(), None);
    let (ytr, yva) = (y[..ntr].to_vec(), y[n - nval..].to_vec());
    let mut base = CalmParams::recommended();
    base.epochs = epochs;
    base.seed = seed;
    base.device = Device::Cpu;
    let t0 = std::time::Instant::now();
    let tr: Arc<dyn data::ImageSource> = Arc::new(tr);
    let va: Arc<dyn data::ImageSource> = Arc::new(va);
    let net = NetParams::new(spec.clone(), base).fit(tr.clone())?;
    let fit_s = t0.elapsed().as_secs_f64();
    for l in net.describe() {
        println!("{l}");
    }
    let c = CancelToken::new();
    let pooling = net.pooling();
    let f = |x: &Arc<dyn data::ImageSource>| {
        net.features(
            Device::Cpu,
            &GpuConfig::default(),
            x.clone(),
            pooling,
            &c,
            &mut |_| {},
        )
    };
    let (ftr, fva) = (f(&tr)?, f(&va)?);
    let cfg = ProbeConfig {
        standardize: true,
        ..Default::default()
    };
    let (_, rep) = calm_gpu::probe::fit_and_evaluate(ftr.view(), &ytr, fva.view(), &yva, 10, &cfg)?;
    println!(
        "RESULT spec `{spec}` {} n={ntr} val={nval} epochs={epochs} seed={seed}: dims {} train {:.2}% val {:.2}% (fit {:.0} s, all {:.0} s)",
        a[2],
        ftr.ncols(),
        100.0 * rep.train_acc,
        100.0 * rep.test_acc,
        fit_s,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
