//! Features of a saved model (one written by `calm-gpu train` or by `examples/fit_layer.rs`)
//! on the shipped test digits, written as a float32 `.npy` that numpy reads.
//!
//!     cargo run --release --example features -- MODEL.safetensors [OUT.npy]

use calm_gpu::{Device, Encoding, Layer, Model, Pooling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or("calm-model.safetensors".into());
    let out = args.next().unwrap_or("features.npy".into());
    let model = Model::load(model.as_ref())?;
    let l = model.meta.layer;
    println!(
        "model: K {} kernels of {}x{}, trained on {} images",
        l.kernels, l.width, l.width, model.meta.images
    );
    let test = calm_gpu::data::embedded_digits(calm_gpu::data::Split::Test);
    let layer = Layer::from_model(model, Device::Auto);
    // SPEC's features: the log-sum-exp of L over the whole image, (N, K).
    let f = layer.features(test.images.view(), Pooling::default())?;
    // The triangle encoding on a 4 x 4 grid of regions, (N, K * 16).
    let tri = Pooling {
        grid: 4,
        encoding: Encoding::Triangle,
    };
    let f4 = layer.features(test.images.view(), tri)?;
    println!("features {:?}, triangle 4x4 {:?}", f.dim(), f4.dim());
    ndarray_npy::write_npy(&out, &f)?;
    println!("wrote {out}");
    Ok(())
}
