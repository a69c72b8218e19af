//! `calm-gpu validate`: every GPU kernel against its CPU twin on random problems of several
//! shapes, as a table.

use std::sync::Arc;

use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use crate::cpu::reference;
use crate::engine::Engine;
use crate::error::Result;
use crate::features::Encoding;
use crate::geometry::{Geometry, LayerConfig};
use crate::gpu::{GpuContext, GpuEngine, GpuOptions};
use crate::prior::Prior;

/// One comparison: a kernel's output on one shape.
#[derive(Clone, Debug)]
pub struct Row {
    /// The kernel or check compared (`estep`, `features 2x2`, ...).
    pub kernel: &'static str,
    /// The case's images and layer.
    pub shape: String,
    /// max |gpu - cpu| / max |cpu|.
    pub error: f64,
    /// The largest error that passes ([`TOL_LINEAR`] or [`TOL_POSTERIOR`]).
    pub tolerance: f64,
}

impl Row {
    /// True when the error is within the tolerance.
    pub fn pass(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Tolerances, relative to the largest reference value of each output.
/// - E-step and the log-sum-exps are f32 sums of R products (R <= 400 here) against an f64
///   reference: about 1e-7 * sqrt(R) relative, so 1e-5 leaves a wide margin.
/// - M-step statistics and the update go through exp(L - logp): an absolute error e in L is a
///   relative error e in every posterior, and |L| reaches a few hundred, so L's 1e-7 relative
///   error becomes ~1e-5 relative in B and T; 2e-4 covers it with margin, and is still far
///   below what any indexing or synchronisation bug produces (errors of order 1).
pub const TOL_LINEAR: f64 = 1e-5;
/// The tolerance of the M-step statistics and the update, which go through `exp(L - logp)`
/// (see [`TOL_LINEAR`]).
pub const TOL_POSTERIOR: f64 = 2e-4;

/// The shapes `validate` runs: C = 1 and 3, padding 0, 1 and 2, odd and non-square images,
/// K not a power of two, batches that do not divide N, and the MNIST protocol's layer.
/// Images, C, H, W, the layer, the batch.
pub type Case = (usize, usize, usize, usize, LayerConfig, usize);

/// The shapes `validate` runs, as [`Case`] describes them.
pub fn cases() -> Vec<Case> {
    let l = |k, w, p| LayerConfig {
        kernels: k,
        width: w,
        pad: p,
    };
    vec![
        (10, 1, 12, 12, l(5, 5, 2), 4),
        (7, 3, 9, 13, l(6, 4, 0), 3),
        (11, 3, 11, 7, l(13, 3, 2), 5),
        (5, 3, 20, 17, l(10, 7, 1), 2),
        (9, 1, 28, 28, l(64, 20, 2), 4),
    ]
}

/// `max |a - b| / max |b|` (the reference `b`'s largest value at least 1e-30); infinite when
/// the lengths differ or a difference is NaN.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let e = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        let d = (*x as f64 - y).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    e / scale
}

/// Runs one shape on the GPU and on the CPU reference and compares every kernel's output.
/// `base`'s tiles and kernel variant go to every engine it builds (`None`: the engine's own
/// choice, as for `train`).
pub fn run_case(
    ctx: &Arc<GpuContext>,
    seed: u64,
    (n, c, h, w, layer, batch): Case,
    base: &GpuOptions,
) -> Result<Vec<Row>> {
    let g = Geometry::new(layer, c, h, w)?;
    let data = crate::bench::random_images(seed, n, c, h, w);
    let x = data.images.as_slice().expect("standard layout").to_vec();
    // Small weights, so that the posterior spreads over kernels and positions (N(0,1) weights
    // give one kernel nearly all the mass and leave most of T untested).
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed + 1);
    let theta: Vec<f32> = (0..g.k * g.r())
        .map(|_| 0.1 * rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    let source: Arc<dyn crate::data::ImageSource> = Arc::new(data.clone());
    // An engine over this case's images, with `opts` on top of its batch size.
    let engine = |theta: &[f32], opts: GpuOptions| {
        GpuEngine::new(
            Arc::clone(ctx),
            g,
            source.clone(),
            theta,
            case_options(base, batch, opts),
        )
    };
    let mut eng = engine(&theta, GpuOptions::default())?;
    let stats = eng.epoch(&mut |_| {})?;
    let st = eng.read_state()?;

    let shape = format!(
        "N{n} C{c} {h}x{w} K{} w{} p{} B{batch}",
        layer.kernels, layer.width, layer.pad
    );
    let mut rows = Vec::new();
    let mut row = |kernel, error, tolerance| {
        rows.push(Row {
            kernel,
            shape: shape.clone(),
            error,
            tolerance,
        })
    };

    let xpad = g.pad_images(&x, n);
    let l_all = reference::estep(&g, &xpad, n, &theta);
    let last = n - (n - 1) / eng.max_batch() * eng.max_batch();
    let per = g.k * g.positions();
    row(
        "estep",
        rel_err(&st.l_last, &l_all[(n - last) * per..]),
        TOL_LINEAR,
    );
    if eng.variant() == crate::gpu::kernels::Variant::Coop {
        // The tensor-core E-step against its twin (the same f16 splits and 16-step chunks),
        // relative to the scale of each output's terms, within what the hardware's own order
        // and rounding inside a chunk allow (cpu::coop::tolerance).
        let first = n - last;
        let xb = &xpad[first * g.padded_len()..];
        let bias = g.bias_f32(&theta);
        let twin = crate::cpu::coop::estep(&g, xb, last, &theta, &bias);
        let scale = crate::cpu::coop::term_scale(&g, xb, last, &theta, &bias);
        let err = st
            .l_last
            .iter()
            .zip(&twin)
            .zip(&scale)
            .fold(0f64, |m, ((a, b), s)| {
                let d = (*a as f64 - *b as f64).abs() / s.max(1e-30);
                if d.is_nan() { f64::INFINITY } else { m.max(d) }
            });
        let err = if st.l_last.len() == twin.len() {
            err
        } else {
            f64::INFINITY
        };
        row("estep coop twin", err, crate::cpu::coop::tolerance(g.r()));
    }
    let logp = reference::logp(&g, &l_all, n);
    row("logsumexp", rel_err(&st.logp_all, &logp), TOL_LINEAR);

    let (ref_stats, ref_up) = reference::epoch(&g, &x, n, &theta, batch);
    let r1 = g.r() + 1;
    let t: Vec<f32> = (0..g.k)
        .flat_map(|k| st.t[k * r1..k * r1 + g.r()].to_vec())
        .collect();
    let b: Vec<f32> = (0..g.k).map(|k| st.t[k * r1 + g.r()]).collect();
    row("mstep T", rel_err(&t, &ref_stats.t), TOL_POSTERIOR);
    row("mstep B", rel_err(&b, &ref_stats.b), TOL_POSTERIOR);
    row(
        "update theta",
        rel_err(&st.theta_next, &ref_up.theta),
        TOL_POSTERIOR,
    );
    row(
        "update counts",
        rel_err(&st.counts_next, &ref_up.counts),
        TOL_POSTERIOR,
    );
    let bias_ref = g.bias(&st.theta_next.clone());
    row("update bias", rel_err(&st.bias_next, &bias_ref), TOL_LINEAR);
    row(
        "summary LL",
        rel_err(&[stats.loglik as f32], &[ref_stats.ll]),
        TOL_LINEAR,
    );
    row(
        "summary S",
        rel_err(&[stats.count_sum as f32], &[ref_up.count_sum]),
        TOL_LINEAR,
    );

    check_features(&g, n, &xpad, &mut eng, &engine, &mut row)?;
    let normalised = g.with_patch_norm(Some(0.01));
    let mut norm_engine = |encoding| {
        let opts = case_options(
            base,
            batch,
            GpuOptions {
                encoding,
                ..Default::default()
            },
        );
        GpuEngine::new(Arc::clone(ctx), normalised, source.clone(), &theta, opts)
    };
    check_patch_norm(
        &normalised,
        (&x, n, batch),
        &theta,
        &mut norm_engine,
        &mut row,
    )?;
    let max_batch = eng.max_batch();
    check_prior_and_streaming(
        &g,
        (&x, n, batch),
        &theta,
        &mut rng,
        &st,
        max_batch,
        &engine,
        &mut row,
    )?;
    Ok(rows)
}

/// `opts` with the case's batch and `base`'s choice of kernels (tiles, variant, tuning file).
fn case_options(base: &GpuOptions, batch: usize, opts: GpuOptions) -> GpuOptions {
    GpuOptions {
        batch,
        tiles: base.tiles,
        variant: base.variant,
        tune_file: base.tune_file.clone(),
        chosen_by: base.chosen_by.clone(),
        cancel: base.cancel.clone(),
        ..opts
    }
}

/// Contrast-normalised patches (`g.patch_norm`; the `norm_*.wgsl` passes around the same
/// kernels): an epoch's LL and update, and the triangle features (whose norms read the patches'
/// moments), against the twin, which normalises from the moments in f64. `engine` builds an
/// engine of `g` with the case's weights and the encoding given.
fn check_patch_norm(
    g: &Geometry,
    (x, n, batch): (&[f32], usize, usize),
    theta: &[f32],
    engine: &mut dyn FnMut(Encoding) -> Result<GpuEngine>,
    row: &mut Record,
) -> Result<()> {
    let mut eng = engine(Encoding::Lse)?;
    let stats = eng.epoch(&mut |_| {})?;
    let (want, up) = reference::epoch(g, x, n, theta, batch);
    row(
        "norm LL",
        rel_err(&[stats.loglik as f32], &[want.ll]),
        TOL_LINEAR,
    );
    row(
        "norm theta",
        rel_err(&eng.theta()?, &up.theta),
        TOL_POSTERIOR,
    );
    let f = engine(Encoding::Triangle)?.features(&mut |_| {})?;
    let xpad = g.pad_images(x, n);
    let l = reference::estep(g, &xpad, n, theta);
    let norms = reference::patch_norms(g, &xpad, n);
    row(
        "norm triangle",
        rel_err(
            f.as_slice().expect("standard layout"),
            &reference::features_triangle(g, &l, &norms, n, 1),
        ),
        TOL_POSTERIOR,
    );
    Ok(())
}

/// A check's name, its error and its tolerance, as [`run_case`] collects them.
type Record<'a> = dyn FnMut(&'static str, f64, f64) + 'a;

/// An engine over the case's images with these weights and options on top of the case's.
type MakeEngine<'a> = dyn Fn(&[f32], GpuOptions) -> Result<GpuEngine> + 'a;

/// The feature kernels (image-wide, pooled, triangle) with the GPU's own updated theta (from
/// `eng`'s epoch), so that each is checked alone.
fn check_features(
    g: &Geometry,
    n: usize,
    xpad: &[f32],
    eng: &mut GpuEngine,
    engine: &MakeEngine,
    row: &mut Record,
) -> Result<()> {
    // Features with the GPU's own updated theta, so this checks the kernel alone; image-wide
    // (SPEC's) and pooled over a 2 x 2 grid of regions.
    let theta_gpu = eng.theta()?;
    let f = eng.features(&mut |_| {})?;
    let l_gpu_theta = reference::estep(g, xpad, n, &theta_gpu);
    let f_ref = reference::features(g, &l_gpu_theta, n);
    row(
        "features",
        rel_err(f.as_slice().expect("standard layout"), &f_ref),
        TOL_LINEAR,
    );
    if g.ho.min(g.wo) >= 2 {
        let mut pooled = engine(
            &theta_gpu,
            GpuOptions {
                grid: 2,
                ..Default::default()
            },
        )?;
        let f2 = pooled.features(&mut |_| {})?;
        let f2_ref = reference::features_grid(g, &l_gpu_theta, n, 2);
        row(
            "features 2x2",
            rel_err(f2.as_slice().expect("standard layout"), &f2_ref),
            TOL_LINEAR,
        );
    }
    // Triangle features (tri_mean.wgsl + features_tri.wgsl), image-wide and on a 2 x 2 grid.
    // The twin works from the f64 L of the GPU's theta; the GPU forms ||x_u||^2 - 2 L in f32,
    // where |L| and ||x_u||^2 are large beside their difference for a patch close to a kernel,
    // so its distances carry f32 cancellation: TOL_POSTERIOR, not TOL_LINEAR.
    let norms = reference::patch_norms(g, xpad, n);
    for grid in [1, 2] {
        if g.ho.min(g.wo) < grid {
            continue;
        }
        let mut tri = engine(
            &theta_gpu,
            GpuOptions {
                grid,
                encoding: Encoding::Triangle,
                ..Default::default()
            },
        )?;
        let ft = tri.features(&mut |_| {})?;
        let ft_ref = reference::features_triangle(g, &l_gpu_theta, &norms, n, grid);
        row(
            if grid == 1 {
                "triangle"
            } else {
                "triangle 2x2"
            },
            rel_err(ft.as_slice().expect("standard layout"), &ft_ref),
            TOL_POSTERIOR,
        );
    }
    Ok(())
}

/// An epoch under mixing weights and a variance, and one with the data streamed (`st`: the
/// resident epoch's state, `max_batch` its batch).
#[allow(clippy::too_many_arguments)]
fn check_prior_and_streaming(
    g: &Geometry,
    (x, n, batch): (&[f32], usize, usize),
    theta: &[f32],
    rng: &mut Xoshiro256PlusPlus,
    st: &crate::gpu::GpuState,
    max_batch: usize,
    engine: &MakeEngine,
    row: &mut Record,
) -> Result<()> {
    // Mixing weights and a variance (`Prior`): the same kernels on effective weights; an
    // epoch's theta and LL against the twin's. An inverse variance of 4 scales L by four, so
    // exp() of the posteriors sees four times the absolute error: TOL_POSTERIOR.
    let prior = Prior {
        inv_var: 4.0,
        log_weight: (0..g.k)
            .map(|_| 0.5 * rng.sample::<f32, _>(rand_distr::StandardNormal))
            .collect(),
    };
    let mut with_prior = engine(theta, GpuOptions::default())?;
    with_prior.set_prior(&prior)?;
    let st_prior = with_prior.epoch(&mut |_| {})?;
    let (ref_prior, up_prior) = reference::epoch_with_prior(g, x, n, theta, &prior, batch);
    row(
        "prior theta",
        rel_err(&with_prior.theta()?, &up_prior.theta),
        TOL_POSTERIOR,
    );
    row(
        "prior LL",
        rel_err(&[st_prior.loglik as f32], &[ref_prior.ll]),
        TOL_LINEAR,
    );
    // The same epoch with the data streamed through two batch buffers instead of resident:
    // the same kernels over the same batches, so the same bits (tolerance 0).
    if n > max_batch {
        let mut streamed = engine(
            theta,
            GpuOptions {
                stream: true,
                ..Default::default()
            },
        )?;
        streamed.epoch(&mut |_| {})?;
        let theta_streamed = streamed.theta()?;
        let resident: Vec<f64> = st.theta_next.iter().map(|&v| v as f64).collect();
        row("streamed data", rel_err(&theta_streamed, &resident), 0.0);
    }
    Ok(())
}

/// Every case, with the kernels the engine chooses; the caller prints the table.
pub fn run(ctx: &Arc<GpuContext>) -> Result<Vec<Row>> {
    run_with(ctx, &GpuOptions::default())
}

/// Every case with `base`'s tiles and kernel variant (see [`run_case`]).
pub fn run_with(ctx: &Arc<GpuContext>, base: &GpuOptions) -> Result<Vec<Row>> {
    run_cases(ctx, base, &cases())
}

/// `list`'s cases with `base`'s tiles and kernel variant.
pub fn run_cases(ctx: &Arc<GpuContext>, base: &GpuOptions, list: &[Case]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, case) in list.iter().enumerate() {
        rows.extend(run_case(ctx, 1000 + i as u64, *case, base)?);
    }
    Ok(rows)
}

/// A small case of `g`'s layer (its C, K, w and padding; images at most 12 positions wider than
/// the window), so that a choice of kernels is checked on the layer it will run: how K splits
/// into kernel tiles, the uniform-buffer kernels' blocks of K. `None` where `cases()` already
/// has that layer and image shape.
pub fn case_for(g: &Geometry) -> Option<Case> {
    let side = |s: usize| s.min(g.kw + 12 - 2 * g.pad.min(6));
    let layer = LayerConfig {
        kernels: g.k,
        width: g.kw,
        pad: g.pad,
    };
    let case = (3, g.c, side(g.h), side(g.w), layer, 2);
    let same = |c: &Case| (c.1, c.2, c.3, c.4) == (case.1, case.2, case.3, case.4);
    (!cases().iter().any(same)).then_some(case)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tuned_layer_gets_a_small_case_of_its_own() {
        let geo = |c, h, w, k, kw, pad| {
            Geometry::new(
                LayerConfig {
                    kernels: k,
                    width: kw,
                    pad,
                },
                c,
                h,
                w,
            )
            .unwrap()
        };
        // STL-10's layer: 27 x 27 images, 13 x 13 positions, all 200 kernels.
        let (n, c, h, w, layer, batch) = case_for(&geo(3, 96, 96, 200, 15, 0)).unwrap();
        assert_eq!(
            (n, c, h, w, layer.kernels, layer.width, batch),
            (3, 3, 27, 27, 200, 15, 2)
        );
        let small = geo(c, h, w, 200, 15, 0);
        assert_eq!((small.ho, small.wo), (13, 13));
        // MNIST's layer is one of validate's cases already.
        assert_eq!(case_for(&geo(1, 28, 28, 64, 20, 2)), None);
        // Images no larger than the cap keep their size, larger ones are cut to it (5 + 12 - 8);
        // wide padding still leaves positions.
        let (_, _, h, w, _, _) = case_for(&geo(1, 9, 40, 8, 5, 4)).unwrap();
        assert_eq!((h, w), (9, 9));
        assert!(geo(1, h, w, 8, 5, 4).ho >= 1);
    }
}
