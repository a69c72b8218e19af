//! The EM driver: epochs, the stopping rule, timing and metrics, generic over the engine.

use std::time::Instant;

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use crate::data::ImageSource;
use crate::engine::Engine;
use crate::error::Result;
use crate::geometry::Geometry;
use crate::model::EpochRecord;
use crate::prior::PriorOptions;

/// SPEC's initialisation: every entry of `theta` i.i.d. N(0, 1), from a seeded, portable
/// generator (xoshiro256++), so a seed gives the same weights on every machine.
pub fn init_theta(g: &Geometry, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..g.k * g.r())
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// How `theta` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitMethod {
    /// SPEC's (and the paper's): every entry i.i.d. N(0, 1).
    #[default]
    Normal,
    /// Each kernel a patch of the (padded) data at a random image and position, so every kernel
    /// starts where data is and gets a share of the posterior.
    Patches,
    /// The k-means centroids of the data's patches ([`crate::kmeans::kmeans_patches`], its
    /// default configuration and the run's seed): EM refines the classic dictionary, as a
    /// Gaussian mixture is commonly started (scikit-learn's `GaussianMixture` does by default).
    /// `eval`'s k-means twin of such a model is its starting point.
    #[serde(rename = "kmeans")]
    KMeans,
}

impl std::fmt::Display for InitMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitMethod::Normal => "normal",
            InitMethod::Patches => "patches",
            InitMethod::KMeans => "kmeans",
        })
    }
}

/// Copies the padded patch of image `n` at position `(h, w)` into `out` (`C * w * w`),
/// contrast-normalised if the layer normalises patches ([`Geometry::patch_norm`]).
pub(crate) fn patch(g: &Geometry, img: &[f32], h: usize, w: usize, out: &mut [f32]) {
    let p = g.pad as isize;
    for c in 0..g.c {
        for i in 0..g.kw {
            for j in 0..g.kw {
                let (y, x) = (h as isize + i as isize - p, w as isize + j as isize - p);
                let inside = y >= 0 && x >= 0 && (y as usize) < g.h && (x as usize) < g.w;
                out[(c * g.kw + i) * g.kw + j] = if inside {
                    img[(c * g.h + y as usize) * g.w + x as usize]
                } else {
                    0.0
                };
            }
        }
    }
    g.normalize(&mut out[..g.r()]);
}

/// Draws of a patch before a near-copy of an earlier one is accepted (e.g. images that are
/// mostly one flat background).
const PATCH_TRIES: usize = 100;

/// `count` patches of the data at random images and positions (seeded), as kernels. A patch
/// within 1 % (relative distance) of one already drawn is drawn again, up to `PATCH_TRIES`
/// times: two equal kernels would stay equal under EM for good.
pub fn random_patches(
    g: &Geometry,
    source: &dyn ImageSource,
    seed: u64,
    count: usize,
) -> Result<Vec<f32>> {
    if source.is_empty() {
        return Err(crate::CalmError::Invalid(
            "no images to draw initial patches from".into(),
        ));
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let (per, r) = (g.c * g.h * g.w, g.r());
    let mut img = vec![0f32; per];
    let mut out = vec![0f32; count * r];
    for k in 0..count {
        for _ in 0..PATCH_TRIES {
            let n = rng.random_range(0..source.len());
            source.read_into(n, 1, &mut img)?;
            let (h, w) = (rng.random_range(0..g.ho), rng.random_range(0..g.wo));
            let (done, cur) = out.split_at_mut(k * r);
            patch(g, &img, h, w, &mut cur[..r]);
            if !done
                .chunks_exact(r)
                .any(|prev| crate::model::near_copy(prev, &cur[..r]))
            {
                break;
            }
        }
    }
    Ok(out)
}

/// The initial weights for `method`.
pub fn initial_theta(
    g: &Geometry,
    method: InitMethod,
    source: &dyn ImageSource,
    seed: u64,
) -> Result<Vec<f32>> {
    match method {
        InitMethod::Normal => Ok(init_theta(g, seed)),
        InitMethod::Patches => random_patches(g, source, seed, g.k),
        InitMethod::KMeans => {
            Ok(crate::kmeans::kmeans_patches(g, source, seed, &Default::default())?.theta)
        }
    }
}

/// What the driver tells its caller while it runs.
pub enum Event<'a> {
    /// Epoch `epoch` of `epochs` begins.
    EpochStart {
        /// The epoch, from 1.
        epoch: usize,
        /// The last epoch to run as it stands (revival may add settling epochs).
        epochs: usize,
    },
    /// Revival re-seeded `kernels` kernels after `epoch`; `settling` when that epoch was the
    /// last requested (or a settling epoch), so one more epoch runs (see [`MAX_SETTLING_EPOCHS`]).
    Revived {
        /// The epoch after which the kernels were re-seeded.
        epoch: usize,
        /// Kernels re-seeded.
        kernels: usize,
        /// Whether one more epoch runs to train them.
        settling: bool,
    },
    /// Images processed so far in the current epoch.
    Progress {
        /// Images processed so far.
        images: usize,
    },
    /// An epoch completed (after the checkpoint callback): its record, last of the history.
    EpochEnd(&'a EpochRecord),
    /// SPEC's stopping rule fired: the statistics of `epoch` were not finite.
    PrecisionLimit {
        /// The epoch whose statistics were not finite; its update was not applied.
        epoch: usize,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Every completed epoch's record, the ones before a resume included.
    pub history: Vec<EpochRecord>,
    /// Set when training stopped before the requested epochs.
    pub stopped: Option<String>,
    /// True when a stop was requested (Ctrl-C or `stop`): the run can be resumed.
    pub interrupted: bool,
}

/// Choices of the EM loop beyond SPEC's plain batch EM (all off in `Schedule::default()`, which
/// is SPEC's protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// After each epoch, re-seed kernels whose count `B'` is below 1, or that copy an earlier
    /// kernel, with poorly explained data patches ([`revive`]). (Such a step is not an EM step:
    /// LL may dip in the next epoch.) When the last requested epoch leaves such kernels, they are
    /// re-seeded and up to [`MAX_SETTLING_EPOCHS`] more epochs run, so that the run ends with
    /// every kernel trained and, as a rule, used; the history then holds more epochs than
    /// requested.
    pub revive: bool,
    /// Stop once the relative change of LL between epochs is below this.
    pub tol: Option<f64>,
    /// Seed of the revival patches (mixed with the epoch, so resumed runs repeat them).
    pub seed: u64,
    /// Mixing weights and variance learned in the M-step (see [`crate::prior`]).
    #[serde(default)]
    pub prior: PriorOptions,
}

/// The most epochs revival adds after the requested ones (see [`Schedule::revive`]).
pub const MAX_SETTLING_EPOCHS: usize = 3;

/// Called after every completed epoch with the engine (its `theta` already updated) and the
/// history so far, e.g. to write a checkpoint.
pub type AfterEpoch<'a> = &'a mut dyn FnMut(&mut dyn Engine, &[EpochRecord]) -> Result<()>;

/// Runs epochs `first..=last` (1-based), appending to `history` (the epochs before `first`, when
/// resuming). A cancelled token ([`Engine::set_cancel`]) abandons the epoch in progress and
/// leaves `theta` as the last complete epoch made it.
pub fn run(
    engine: &mut dyn Engine,
    history: Vec<EpochRecord>,
    first: usize,
    last: usize,
    on_event: &mut dyn FnMut(Event),
    after_epoch: AfterEpoch,
) -> Result<Outcome> {
    run_with(
        engine,
        None,
        Schedule::default(),
        history,
        first,
        last,
        on_event,
        after_epoch,
    )
}

/// [`run`] with a [`Schedule`]; `source` (the training data) is needed for `revive`, for
/// learning the prior and for the LL of a non-uniform prior (which adds terms in `SX =
/// sum_n ||X_n||^2`). The engine's prior at the start (e.g. of a resumed run) is the first
/// epoch's.
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    engine: &mut dyn Engine,
    source: Option<&dyn ImageSource>,
    schedule: Schedule,
    mut history: Vec<EpochRecord>,
    first: usize,
    last: usize,
    on_event: &mut dyn FnMut(Event),
    after_epoch: AfterEpoch,
) -> Result<Outcome> {
    let g = engine.geometry();
    let n = engine.len();
    let mut sum_sq: Option<f64> = None;
    let stopped = |history: Vec<EpochRecord>, why: String, interrupted| {
        Ok(Outcome {
            history,
            stopped: Some(why),
            interrupted,
        })
    };
    // The last epoch to run: revival may add settling epochs after `last`. A resumed run whose
    // checkpoint was written just after a settling revival owes the epoch that trains the
    // re-seeded kernels.
    let mut end = last;
    if schedule.revive
        && first > last.max(1)
        && first - 1 - last < MAX_SETTLING_EPOCHS
        && history.last().is_some_and(|r| r.revived > 0)
    {
        end = first;
    }
    let mut epoch = first;
    while epoch <= end {
        if engine.cancelled() {
            return stopped(history, format!("interrupted before epoch {epoch}"), true);
        }
        on_event(Event::EpochStart { epoch, epochs: end });
        let prior = engine.prior();
        if (schedule.prior.any() || !prior.is_uniform()) && sum_sq.is_none() {
            let src = source.ok_or_else(|| {
                crate::CalmError::Invalid("learning the prior needs the training data".into())
            })?;
            sum_sq = Some(crate::prior::sum_of_squares(src)?);
        }
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
        let loglik = prior.loglik(stats.loglik, sum_sq.unwrap_or(0.0), n, &g);
        let rec = EpochRecord {
            epoch,
            loglik,
            loglik_per_image: loglik / n as f64,
            count_sum: stats.count_sum,
            seconds,
            gflops: g.epoch_flops(n) / seconds.max(1e-12) / 1e9,
            revived: 0,
        };
        history.push(rec);
        let mut fresh = Vec::new();
        let mut revived = None;
        // After the last epoch (or a settling one) only while settling epochs are left: a
        // re-seeded kernel must not end the run untrained.
        if schedule.revive
            && epoch < last + MAX_SETTLING_EPOCHS
            && let Some(src) = source
        {
            fresh = revive(
                engine,
                src,
                schedule.seed.wrapping_add(epoch as u64 * 0x1000_0001),
            )?;
            if !fresh.is_empty() {
                history.last_mut().expect("just pushed").revived = fresh.len();
                let settling = epoch >= end;
                if settling {
                    end = epoch + 1;
                }
                revived = Some(Event::Revived {
                    epoch,
                    kernels: fresh.len(),
                    settling,
                });
            }
        }
        if schedule.prior.any() {
            let (theta, counts) = (engine.theta()?, engine.counts()?);
            let next = prior.learn(
                schedule.prior,
                &g,
                &theta,
                &counts,
                stats.count_sum,
                sum_sq.expect("computed above"),
                n,
                &fresh,
            );
            engine.set_prior(&next)?;
        }
        after_epoch(engine, &history)?;
        on_event(Event::EpochEnd(history.last().expect("just pushed")));
        if let Some(ev) = revived {
            on_event(ev);
        }
        // Not right after a revival: the re-seeded kernels are owed an epoch.
        if let (Some(tol), [.., a, b], true) = (schedule.tol, history.as_slice(), fresh.is_empty())
            && (b.loglik - a.loglik).abs() <= tol * a.loglik.abs()
        {
            return stopped(
                history,
                format!("converged: relative LL change below {tol} at epoch {epoch}"),
                false,
            );
        }
        epoch += 1;
    }
    Ok(Outcome {
        history,
        stopped: None,
        interrupted: false,
    })
}

/// Candidate patches drawn per kernel [`revive`] replaces.
pub const REVIVAL_CANDIDATES: usize = 16;

/// Replaces kernels whose count is below 1, and kernels within 1 % of an earlier kernel
/// ([`crate::model::near_copy`]; the earlier one stays), with data patches that the other
/// kernels explain worst: of [`REVIVAL_CANDIDATES`] random patches per replaced kernel, each
/// replacement takes the one farthest from every kernel kept or placed so far (farthest-point
/// seeding, as k-means++ spreads its seeds). Such a patch is its new kernel's own, so the kernel
/// takes most of that patch's responsibility in the next E-step, where a random patch (often
/// blank background) would copy a kernel already there. Returns which kernels.
pub fn revive(engine: &mut dyn Engine, source: &dyn ImageSource, seed: u64) -> Result<Vec<usize>> {
    let g = engine.geometry();
    let r = g.r();
    let dead = revival_candidates(engine)?;
    if dead.is_empty() {
        return Ok(dead);
    }
    let mut theta = engine.theta()?;
    let cand = random_patches(&g, source, seed, dead.len() * REVIVAL_CANDIDATES)?;
    let sq = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    };
    // Each candidate's squared distance to the nearest kernel kept so far.
    let mut dist: Vec<f64> = cand
        .chunks_exact(r)
        .map(|x| {
            (0..g.k)
                .filter(|k| !dead.contains(k))
                .map(|k| sq(x, &theta[k * r..(k + 1) * r]))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    for &k in &dead {
        // The worst-explained candidate (the first of equals).
        let best = (0..dist.len()).fold(0, |b, i| if dist[i] > dist[b] { i } else { b });
        let chosen = cand[best * r..(best + 1) * r].to_vec();
        for (d, x) in dist.iter_mut().zip(cand.chunks_exact(r)) {
            *d = d.min(sq(x, &chosen));
        }
        theta[k * r..(k + 1) * r].copy_from_slice(&chosen);
    }
    engine.set_theta(&theta)?;
    Ok(dead)
}

/// The kernels [`revive`] would re-seed: count below 1 in the last E-step, or within 1 % of an
/// earlier kernel.
pub fn revival_candidates(engine: &mut dyn Engine) -> Result<Vec<usize>> {
    let g = engine.geometry();
    let r = g.r();
    let counts = engine.counts()?;
    let theta = engine.theta()?;
    Ok((0..g.k)
        .filter(|&k| {
            counts[k] < 1.0
                || (0..k).any(|j| {
                    crate::model::near_copy(&theta[j * r..(j + 1) * r], &theta[k * r..(k + 1) * r])
                })
        })
        .collect())
}
