//! Fit a CALM layer on an ndarray of images and save it, as `calm-gpu train` does.
//!
//!     cargo run --release --example fit_layer -- [OUT.safetensors]
//!
//! The images here are the 8,000 real MNIST digits shipped inside calm-gpu; any
//! `Array4<f32>` of shape (N, C, H, W), already preprocessed, fits the same way.

use calm_gpu::em::Event;
use calm_gpu::{Calm, CancelToken, Device, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or("fit-layer.safetensors".into());
    let images = calm_gpu::data::embedded_digits(calm_gpu::data::Split::Train).images;

    // The parameters are checked as they are used; errors name the field ("kernels must be at
    // least 1").
    let params = Calm::params(32)
        .width(8)
        .pad(0)
        .epochs(5)
        .device(Device::Auto);
    params.check()?;

    // `params.fit(images.view())` does all of the below in one call; a Trainer shows progress
    // and can be stopped from another thread through its token.
    let source = std::sync::Arc::new(calm_gpu::data::Dataset::new(images, None));
    let cancel = CancelToken::new();
    let mut trainer = Trainer::new(&params, source)?.with_cancel(cancel.clone());
    println!("engine: {}", trainer.describe());
    let outcome = trainer.run(&mut |event: &Event| {
        if let Event::EpochEnd(r) = event {
            println!(
                "epoch {}  LL/image {:.4}  {:.2} s  {:.1} GFLOP/s",
                r.epoch, r.loglik_per_image, r.seconds, r.gflops
            );
        }
    })?;
    let layer = trainer.layer(outcome.stopped)?;
    println!(
        "theta {:?}, counts sum {:.1}",
        layer.theta().dim(),
        layer.counts().sum()
    );
    layer.save(&out)?;
    println!("wrote {out}");
    Ok(())
}
