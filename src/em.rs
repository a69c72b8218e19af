//! The EM driver: epochs, the stopping rule, timing and metrics, generic over the engine.

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
    /// True when a stop was requested (Ctrl-C or `stop`): the run can be resumed.
    pub interrupted: bool,
}

/// Called after every completed epoch with the engine (its `theta` already updated) and the
/// history so far, e.g. to write a checkpoint.
pub type AfterEpoch<'a> = &'a mut dyn FnMut(&mut dyn Engine, &[EpochRecord]) -> Result<()>;

/// Runs epochs `first..=last` (1-based), appending to `history` (the epochs before `first`, when
/// resuming). A stop request (`interrupt::request`, Ctrl-C) abandons the epoch in progress and
/// leaves `theta` as the last complete epoch made it.
pub fn run(
    engine: &mut dyn Engine,
    mut history: Vec<EpochRecord>,
    first: usize,
    last: usize,
    on_event: &mut dyn FnMut(Event),
    after_epoch: AfterEpoch,
) -> Result<Outcome> {
    let g = engine.geometry();
    let n = engine.len();
    let stopped = |history: Vec<EpochRecord>, why: String, interrupted| {
        Ok(Outcome {
            history,
            stopped: Some(why),
            interrupted,
        })
    };
    for epoch in first..=last {
        if crate::interrupt::requested() {
            return stopped(history, format!("interrupted before epoch {epoch}"), true);
        }
        on_event(Event::EpochStart {
            epoch,
            epochs: last,
        });
        let t0 = Instant::now();
        let stats = match engine.epoch(&mut |images| on_event(Event::Progress { images })) {
            Err(crate::CalmError::Interrupted) => {
                return stopped(history, format!("interrupted during epoch {epoch}"), true);
            }
            other => other?,
        };
        let seconds = t0.elapsed().as_secs_f64();
        if !stats.finite {
            on_event(Event::PrecisionLimit { epoch });
            return stopped(
                history,
                format!("numerical precision limit reached at epoch {epoch}"),
                false,
            );
        }
        let rec = EpochRecord {
            epoch,
            loglik: stats.loglik,
            loglik_per_image: stats.loglik / n as f64,
            count_sum: stats.count_sum,
            seconds,
            gflops: g.epoch_flops(n) / seconds.max(1e-12) / 1e9,
        };
        history.push(rec);
        after_epoch(engine, &history)?;
        on_event(Event::EpochEnd(history.last().expect("just pushed")));
    }
    Ok(Outcome {
        history,
        stopped: None,
        interrupted: false,
    })
}
