//! The sweep behind `calm-gpu tune`: every candidate choice of kernels is checked against the
//! CPU reference (`validate`'s problems and one of the layer's own shape), then timed on random
//! images; [`Sweep::keep`] says which one, if any, beats the built-in choice beyond the run's
//! noise, and [`Sweep::entry`] is what the tuning file then holds ([`crate::gpu::tune`]).

use std::sync::Arc;

use crate::bench::{self, Row};
use crate::cancel::CancelToken;
use crate::data::Dataset;
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;
use crate::gpu::tune::{self, AdapterKey, Choice, Entry, Timing};
use crate::gpu::{GpuContext, GpuOptions};

/// How to run the sweep.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Timed epochs per candidate after one warm-up epoch.
    pub epochs: usize,
    /// Images per batch of the engine.
    pub batch: usize,
    /// Start no candidate after this many seconds (the first always runs).
    pub time_limit_s: Option<f64>,
    /// Stops the sweep after the candidate in progress ([`CalmError::Interrupted`]).
    pub cancel: CancelToken,
}

/// One candidate's outcome.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The kernels and tiles tried.
    pub choice: Choice,
    /// Whether it is the built-in choice (what the others must beat).
    pub builtin: bool,
    /// "ok", or why it was not timed or not kept (a failed check, a slow warm-up, a first
    /// epoch whose LL disagrees, an engine that could not be built).
    pub status: String,
    /// Its timings, where it passed.
    pub row: Option<Row>,
    /// Seconds it took to check and time.
    pub seconds: f64,
}

/// What the sweep is doing, for a caller that shows it.
#[derive(Clone, Copy, Debug)]
pub enum SweepEvent<'a> {
    /// Candidate `index` (from 0) of `total` begins.
    Started {
        /// Position in the list, from 0.
        index: usize,
        /// Candidates in the list.
        total: usize,
        /// The candidate's kernels and tiles.
        choice: &'a Choice,
    },
    /// Candidate `index` is done.
    Finished {
        /// Position in the list, from 0.
        index: usize,
        /// Its outcome.
        candidate: &'a Candidate,
    },
    /// The time limit stopped the sweep before candidate `skipped_from`.
    TimeLimit {
        /// The limit, in seconds.
        limit_s: f64,
        /// Seconds the sweep had run when it stopped.
        elapsed_s: f64,
        /// The first candidate not run, from 0.
        skipped_from: usize,
        /// Candidates in the list.
        total: usize,
    },
}

/// The candidates that ran, in order, and what they were compared with.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The built-in choice, the one a kept candidate must beat.
    pub builtin: Choice,
    /// Each candidate's outcome, in the order they ran.
    pub candidates: Vec<Candidate>,
    /// Random images each epoch ran on.
    pub images: usize,
}

/// Checks and times each of `list` (the built-in choice `builtin` among them, first) on
/// `data`, reporting to `observe`; an error from `observe` ends the sweep with it.
pub fn sweep(
    ctx: &Arc<GpuContext>,
    g: Geometry,
    data: &Arc<Dataset>,
    list: &[Choice],
    builtin: Choice,
    cfg: &SweepConfig,
    observe: &mut dyn FnMut(&SweepEvent) -> Result<()>,
) -> Result<Sweep> {
    let n = data.images.shape()[0];
    let theta = crate::em::init_theta(&g, 0);
    // The check: validate's problems, and a small one of this layer (how K splits into tiles).
    let mut checks = crate::validate::cases();
    checks.extend(crate::validate::case_for(&g));
    let mut out = Sweep {
        builtin,
        candidates: Vec::new(),
        images: n,
    };
    // The first row timed (the built-in choice's, unless it failed): the others' LL reference.
    let mut reference: Option<Row> = None;
    let start = std::time::Instant::now();
    for (index, choice) in list.iter().enumerate() {
        cfg.cancel.check()?;
        let elapsed_s = start.elapsed().as_secs_f64();
        if let Some(limit_s) = cfg.time_limit_s.filter(|&l| index > 0 && elapsed_s > l) {
            observe(&SweepEvent::TimeLimit {
                limit_s,
                elapsed_s,
                skipped_from: index,
                total: list.len(),
            })?;
            break;
        }
        observe(&SweepEvent::Started {
            index,
            total: list.len(),
            choice,
        })?;
        let t0 = std::time::Instant::now();
        let opts = GpuOptions {
            batch: cfg.batch,
            tiles: Some(choice.tiles),
            variant: Some(choice.variant),
            cancel: cfg.cancel.clone(),
            ..Default::default()
        };
        let (status, row) =
            match check_and_time(ctx, g, data, &theta, &checks, opts, cfg, &reference) {
                Err(CalmError::Interrupted) => return Err(CalmError::Interrupted),
                Err(e) => (format!("not run: {e}"), None),
                Ok(Err(why)) => (why, None),
                Ok(Ok(row)) => match tune::ll_disagrees(
                    reference.as_ref().and_then(|r| r.first_loglik),
                    row.first_loglik.unwrap_or(f64::NAN),
                    n,
                ) {
                    Some(why) => (why, None),
                    None => ("ok".to_string(), Some(row)),
                },
            };
        if let Some(r) = &row {
            reference.get_or_insert_with(|| r.clone());
        }
        out.candidates.push(Candidate {
            choice: *choice,
            builtin: *choice == builtin,
            status,
            row,
            seconds: t0.elapsed().as_secs_f64(),
        });
        observe(&SweepEvent::Finished {
            index,
            candidate: out.candidates.last().expect("just pushed"),
        })?;
    }
    cfg.cancel.check()?;
    Ok(out)
}

/// A candidate checked against the CPU reference, then timed: its row, or why it was not
/// timed (`Ok(Err(..))`); `Err` where the engine could not be built or the run was stopped.
#[allow(clippy::too_many_arguments)]
fn check_and_time(
    ctx: &Arc<GpuContext>,
    g: Geometry,
    data: &Arc<Dataset>,
    theta: &[f32],
    checks: &[crate::validate::Case],
    opts: GpuOptions,
    cfg: &SweepConfig,
    reference: &Option<Row>,
) -> Result<std::result::Result<Row, String>> {
    let checked = crate::validate::run_cases(ctx, &opts, checks)?;
    if let Some(r) = checked.iter().find(|r| !r.pass()) {
        return Ok(Err(format!(
            "FAILED the check: {} on {}, error {:.2e} > {:.0e}",
            r.kernel, r.shape, r.error, r.tolerance
        )));
    }
    let reference_warmup = reference.as_ref().and_then(|r| r.warmup_s);
    let limit = reference_warmup.map(tune::warmup_limit);
    match bench::time_gpu(ctx, g, data, theta, cfg.epochs, opts, limit) {
        Err(CalmError::SlowWarmup { warmup_s, .. }) => Ok(Err(format!(
            "not timed: its warm-up epoch took {:.0} ms, over {}x the first timed choice's {:.0} ms",
            warmup_s * 1e3,
            tune::SLOW_WARMUP,
            reference_warmup.unwrap_or(f64::NAN) * 1e3
        ))),
        timed => Ok(Ok(timed?)),
    }
}

impl Sweep {
    /// Each candidate that passed, with its timing.
    pub fn timed(&self) -> Vec<(Choice, Timing)> {
        self.candidates
            .iter()
            .filter_map(|c| {
                let r = c.row.as_ref()?;
                Some((
                    c.choice,
                    Timing::of(&r.epochs_s).expect("at least one epoch"),
                ))
            })
            .collect()
    }

    /// The built-in choice's timing, if it passed.
    pub fn builtin_timing(&self) -> Option<Timing> {
        self.timed()
            .into_iter()
            .find(|(c, _)| *c == self.builtin)
            .map(|t| t.1)
    }

    /// The fastest candidate by median epoch, if any passed.
    pub fn fastest(&self) -> Option<(Choice, Timing)> {
        self.timed()
            .into_iter()
            .min_by(|x, y| x.1.median.total_cmp(&y.1.median))
    }

    /// The candidate to keep ([`tune::pick`]), or why the built-in choice stays.
    pub fn keep(&self) -> std::result::Result<(Choice, Timing), String> {
        tune::pick(self.builtin_timing(), &self.timed())
    }

    /// The tuning file's entry for keeping `best` (timed `best_t`) on `ctx`'s adapter for `g`.
    pub fn entry(&self, ctx: &GpuContext, g: &Geometry, best: Choice, best_t: Timing) -> Entry {
        let gflops = |s: f64| g.epoch_flops(self.images) / s / 1e9;
        Entry {
            adapter: AdapterKey::of(&ctx.info),
            shape: tune::shape_key(g),
            choice: best.to_string(),
            code: best.code_hash(g.k),
            epoch_ms: best_t.median * 1e3,
            gflops: gflops(best_t.median),
            builtin: self.builtin.to_string(),
            builtin_epoch_ms: self.builtin_timing().map(|b| b.median * 1e3),
            images: self.images,
            measured_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}
