//! The paper's linear probe on a saved model's features, beside the same probe on the pixels and
//! on untrained N(0, 1) kernels through the model's own pipeline: how much EM adds.
//! Fitted on the shipped training digits, scored on the shipped test digits.
//!
//!     cargo run --release --example evaluate -- MODEL.safetensors

use std::sync::Arc;

use calm_gpu::eval::{Baseline, EvalConfig, EvalEvent, Labelled, evaluate};
use calm_gpu::{Model, data};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("calm-model.safetensors".into());
    let model = Model::load(path.as_ref())?;
    let set = |split| {
        let d = data::embedded_digits(split);
        let labels = d.labels.clone().expect("the shipped digits carry labels");
        Labelled {
            images: Arc::new(d),
            labels,
        }
    };
    // The model's recipe (pooling, standardisation), the best device, two baselines.
    let cfg = EvalConfig {
        baselines: vec![Baseline::Raw, Baseline::Random],
        ..EvalConfig::for_model(&model)
    };
    let (train, test) = (set(data::Split::Train), set(data::Split::Test));
    let rows = evaluate(&model, &train, &test, &cfg, &mut |e| {
        if let EvalEvent::ProbeStarted { set, .. } = e {
            eprintln!("fitting the probe on {set}");
        }
    })?;
    for r in &rows {
        println!(
            "{:<34} {:>5} dims  test {:6.2}%  ({} L-BFGS iterations)",
            r.features,
            r.dims,
            100.0 * r.report.test_acc,
            r.report.iterations
        );
    }
    Ok(())
}
