//! The EM driver: epochs, the stopping rule, timing and metrics, generic over the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use crate::engine::Engine;
use crate::error::Result;
use crate::geometry::Geometry;
use crate::model::EpochRecord;

/// SPEC's initialisation: every entry of `theta` i.i.d. N(0, 1), from a seeded, portable
/// generator (xoshiro256++), so a seed gives the same weights on every machine.
pub fn init_theta(g: &Geometry, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..g.k * g.r())
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// What the driver tells its caller while it runs.
pub enum Event<'a> {
    EpochStart {
        epoch: usize,
        epochs: usize,
    },
    /// Images processed so far in the current epoch.
    Progress {
        images: usize,
    },
    EpochEnd(&'a EpochRecord),
    /// SPEC's stopping rule fired: the statistics of `epoch` were not finite.
    PrecisionLimit {
        epoch: usize,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub history: Vec<EpochRecord>,
    /// Set when training stopped before the requested epochs.
    pub stopped: Option<String>,
}

/// Runs epochs `first..=last` (1-based). `stop` is checked between epochs (Ctrl-C).
pub fn run(
    engine: &mut dyn Engine,
    first: usize,
    last: usize,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    let g = engine.geometry();
    let n = engine.len();
    let mut history = Vec::new();
    for epoch in first..=last {
        if stop.load(Ordering::SeqCst) {
            return Ok(Outcome {
                history,
                stopped: Some(format!("interrupted before epoch {epoch}")),
            });
        }
        on_event(Event::EpochStart {
            epoch,
            epochs: last,
        });
        let t0 = Instant::now();
        let stats = engine.epoch(&mut |images| on_event(Event::Progress { images }))?;
        let seconds = t0.elapsed().as_secs_f64();
        if !stats.finite {
            on_event(Event::PrecisionLimit { epoch });
            return Ok(Outcome {
                history,
                stopped: Some(format!(
                    "numerical precision limit reached at epoch {epoch}"
                )),
            });
        }
        let rec = EpochRecord {
            epoch,
            loglik: stats.loglik,
            loglik_per_image: stats.loglik / n as f64,
            count_sum: stats.count_sum,
            seconds,
            gflops: g.epoch_flops(n) / seconds.max(1e-12) / 1e9,
        };
        on_event(Event::EpochEnd(&rec));
        history.push(rec);
    }
    Ok(Outcome {
        history,
        stopped: None,
    })
}
