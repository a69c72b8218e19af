//! Linear probe: multinomial logistic (softmax) regression with an L2 penalty, fitted by L-BFGS.
//!
//! This is how SPEC.md's "Features" section scores a layer: fit the probe on the training images'
//! features, report accuracy on the test images.
//!
//! # Objective
//!
//! With `n` samples, `K` classes, weights `W` (`K x d`) and intercept `b` (`K`, not penalised):
//!
//! ```text
//! f(W, b) = (1/n) * sum_i CE(softmax(W x_i + b), y_i)  +  ||W||_F^2 / (2 C n)
//! ```
//!
//! This is scikit-learn's `LogisticRegression(C=C)` objective for the multinomial `lbfgs` solver,
//! `C * sum_i CE_i + ||W||^2 / 2`, divided by `C n` (scikit-learn >= 1.1 minimises exactly this
//! normalised form), so the minimiser is the same and `tol` means the same thing: the run has
//! converged when the largest absolute entry of the gradient of `f` (in the original
//! coordinates, intercept included) is `<= tol`. It also stops, as scipy's L-BFGS-B does with
//! scikit-learn's `ftol = 64 eps`, when the relative decrease of `f` in one iteration is below
//! `64 * f64::EPSILON`; both count as converged. [`Probe::stop`] says which test fired.
//!
//! # Preconditioning (exact)
//!
//! Features of large or uneven scale (this project's pooled features span about -110..174) make
//! plain L-BFGS slow. With [`ProbeConfig::precondition`] (default on) the optimiser works in the
//! coordinates `U = W diag(s)`, `a = b + W mu` where `mu` is the feature mean and
//! `s_j = max(std_j, 1/sqrt(C n))`. For any `mu` and any positive `s` this map is a bijection
//! with `U x~ + a = W x + b` for `x~ = (x - mu)/s`, and the penalty is rewritten exactly as
//! `sum_kj U_kj^2 / s_j^2`; so the objective value at corresponding points is identical, and the
//! minimiser found is mapped back to `(W, b)` exactly. Only the path L-BFGS takes changes. The
//! floor on `s_j` keeps the rewritten penalty's curvature (`1/(C n s_j^2)`) at most 1 for
//! near-constant features. The convergence test is always made on the gradient in the original
//! coordinates. The data are never copied or transformed: the affine map is folded into the
//! weights at each evaluation.
//!
//! This is different from [`ProbeConfig::standardize`] (default off, as in the paper), which
//! changes the model: the penalty then applies to the weights of standardised features (like
//! scikit-learn's `StandardScaler` followed by `LogisticRegression`).
//!
//! # Numerics and determinism
//!
//! Everything is computed in `f64` with a log-sum-exp softmax. Objective and gradient are summed
//! over fixed blocks of `256` samples in parallel (rayon) and the block results are added in block
//! order, so results are bit-identical whatever the number of threads.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, s};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Samples per work item. Fixed (not derived from the thread count) so sums are deterministic.
const BLOCK: usize = 256;
/// L-BFGS memory (pairs kept).
const MEMORY: usize = 10;
/// Most objective evaluations in one line search.
const MAX_LINE_SEARCH: usize = 40;
/// Wolfe constants: sufficient decrease and (strong) curvature.
const WOLFE_C1: f64 = 1e-4;
const WOLFE_C2: f64 = 0.9;
/// Relative round-off level of the objective assumed by the approximate-Wolfe test.
const F_NOISE: f64 = 1e-12;

/// What can go wrong fitting or applying the probe. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No samples or no features.
    #[error("probe: nothing to fit: {0}")]
    Empty(String),
    /// A feature is NaN or infinite.
    #[error(
        "probe: {what} row {row} column {col} holds a non-finite value ({value}); clean the features first"
    )]
    NonFinite {
        /// Which features (training, test).
        what: &'static str,
        /// The sample.
        row: usize,
        /// The feature.
        col: usize,
        /// The value found.
        value: f32,
    },
    /// A label is not below the number of classes.
    #[error("probe: label {label} of sample {index} is not below n_classes = {n_classes}")]
    LabelOutOfRange {
        /// The sample.
        index: usize,
        /// Its label.
        label: u8,
        /// The number of classes.
        n_classes: usize,
    },
    /// The features and the labels disagree on the number of samples.
    #[error("probe: {what}: {rows} feature rows but {labels} labels")]
    LengthMismatch {
        /// Which features (training, test).
        what: &'static str,
        /// Feature rows.
        rows: usize,
        /// Labels.
        labels: usize,
    },
    /// Features of another width than the probe's weights.
    #[error("probe: features have {got} columns but the probe has {expected}")]
    DimensionMismatch {
        /// Features per sample the probe takes.
        expected: usize,
        /// Features per sample given.
        got: usize,
    },
    /// A setting out of range (`C`, `tol`, `ftol`, the number of classes).
    #[error("probe: invalid configuration: {0}")]
    Config(String),
}

/// Settings of [`fit`]. `Default` gives `C = 1`, `max_iter = 1000`, `tol = 1e-4`, raw features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Inverse L2 strength, scikit-learn's `C` (default 1.0). Must be positive and finite.
    pub c: f64,
    /// Most L-BFGS iterations (default 1000). The report says whether it converged before.
    pub max_iter: usize,
    /// Stop when the max-abs gradient of the normalised objective is `<= tol` (default 1e-4,
    /// scikit-learn's criterion and default).
    pub tol: f64,
    /// Also stop (converged) when one iteration lowers the objective by less than
    /// `ftol * max(|f|, 1)` (default `64 * f64::EPSILON`, what scikit-learn passes to scipy).
    /// Near that level the decrease is round-off; 0 turns this test off (then the run stops on
    /// `tol`, `max_iter`, or when no acceptable step is found).
    pub ftol: f64,
    /// Standardise features (mean 0, std 1; constant features get std 1) before the probe, which
    /// changes the model. Default false: the paper's probe uses raw features.
    pub standardize: bool,
    /// Exact diagonal preconditioning of the optimiser (see the module docs); does not change
    /// the minimiser. Default true.
    pub precondition: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            c: 1.0,
            max_iter: 1000,
            tol: 1e-4,
            ftol: 64.0 * f64::EPSILON,
            standardize: false,
            precondition: true,
        }
    }
}

/// Why the optimiser stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// Max-abs gradient `<= tol` (converged).
    GradientTol,
    /// Relative decrease of the objective below `ftol` (converged, as scipy reports it).
    LossChange,
    /// `max_iter` iterations done (not converged).
    MaxIter,
    /// No step satisfying the line search could be found even along the steepest descent
    /// (not converged; usually round-off near the optimum with a very small `tol`).
    LineSearch,
}

/// Per-feature standardisation applied before the probe when `standardize` was set.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardization {
    /// Mean of each feature over the training set.
    pub mean: Array1<f64>,
    /// Population standard deviation; 1 where a feature is constant.
    pub std: Array1<f64>,
}

/// A fitted probe.
#[derive(Clone, Debug)]
pub struct Probe {
    /// `n_classes x d`. Applies to standardised features when `standardization` is `Some`.
    pub weights: Array2<f64>,
    /// `n_classes`.
    pub intercept: Array1<f64>,
    /// L-BFGS iterations done.
    pub iterations: usize,
    /// Objective/gradient evaluations (passes over the data).
    pub evaluations: usize,
    /// True when the gradient or loss-change test fired (see [`StopReason`]).
    pub converged: bool,
    /// Which test stopped the optimiser.
    pub stop: StopReason,
    /// Normalised objective `f` at the solution (see the module docs); scikit-learn's
    /// unnormalised value is `C * n * final_loss`.
    pub final_loss: f64,
    /// Max-abs gradient of `f` at the solution, in the model's coordinates.
    pub final_grad_max: f64,
    /// The standardisation fitted on the training features, when `standardize` was set.
    pub standardization: Option<Standardization>,
}

/// What a probe evaluation reports; serialisable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Classes `K` of the probe.
    pub n_classes: usize,
    /// Accuracy on the training set, 0 to 1.
    pub train_acc: f64,
    /// Accuracy on the test set, 0 to 1.
    pub test_acc: f64,
    /// Test-set confusion matrix: `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// L-BFGS iterations done.
    pub iterations: usize,
    /// True when the gradient or loss-change test fired (see [`StopReason`]).
    pub converged: bool,
    /// Normalised objective `f` at the solution.
    pub final_loss: f64,
}

// ---------------------------------------------------------------------------------------------
// Validation

fn check_finite(x: ArrayView2<f32>, what: &'static str) -> Result<(), ProbeError> {
    let n = x.nrows();
    let hit = (0..n.div_ceil(BLOCK)).into_par_iter().find_map_first(|bi| {
        let r0 = bi * BLOCK;
        let block = x.slice(s![r0..(r0 + BLOCK).min(n), ..]);
        block
            .indexed_iter()
            .find(|(_, v)| !v.is_finite())
            .map(|((r, c), v)| (r0 + r, c, *v))
    });
    match hit {
        Some((row, col, value)) => Err(ProbeError::NonFinite {
            what,
            row,
            col,
            value,
        }),
        None => Ok(()),
    }
}

fn check_labels(y: &[u8], n_classes: usize) -> Result<(), ProbeError> {
    match y.iter().position(|&l| l as usize >= n_classes) {
        Some(index) => Err(ProbeError::LabelOutOfRange {
            index,
            label: y[index],
            n_classes,
        }),
        None => Ok(()),
    }
}

fn check_inputs(
    x: ArrayView2<f32>,
    y: &[u8],
    n_classes: usize,
    what: &'static str,
) -> Result<(), ProbeError> {
    if x.nrows() == 0 || x.ncols() == 0 {
        return Err(ProbeError::Empty(format!(
            "{what} features are {} x {}",
            x.nrows(),
            x.ncols()
        )));
    }
    if x.nrows() != y.len() {
        return Err(ProbeError::LengthMismatch {
            what,
            rows: x.nrows(),
            labels: y.len(),
        });
    }
    if !(2..=256).contains(&n_classes) {
        return Err(ProbeError::Config(format!(
            "n_classes = {n_classes}, need 2..=256"
        )));
    }
    check_labels(y, n_classes)?;
    check_finite(x, what)
}

// ---------------------------------------------------------------------------------------------
// Objective

/// Data term in raw coordinates for weights `w` (`K x d`), intercept `b`: returns
/// `(sum_i CE_i, sum_i r_i x_i^T, sum_i r_i)` with `r_i = softmax_i - onehot(y_i)`.
fn data_term(
    x: ArrayView2<f32>,
    y: &[u8],
    w: ArrayView2<f64>,
    b: ArrayView1<f64>,
) -> (f64, Array2<f64>, Array1<f64>) {
    let (n, d) = x.dim();
    let k = w.nrows();
    let block = |bi: usize| {
        let r0 = bi * BLOCK;
        let r1 = (r0 + BLOCK).min(n);
        let xb: Array2<f64> = x.slice(s![r0..r1, ..]).mapv(f64::from);
        let mut z = xb.dot(&w.t());
        z += &b;
        let mut loss = 0.0;
        for (i, mut row) in z.rows_mut().into_iter().enumerate() {
            let yi = y[r0 + i] as usize;
            let m = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = row.iter().map(|&v| (v - m).exp()).sum();
            let lse = m + sum.ln();
            loss += lse - row[yi];
            row.mapv_inplace(|v| (v - lse).exp());
            row[yi] -= 1.0;
        }
        (loss, z.t().dot(&xb), z.sum_axis(Axis(0)))
    };
    let mut loss = 0.0;
    let mut gw = Array2::<f64>::zeros((k, d));
    let mut gb = Array1::<f64>::zeros(k);
    // Blocks are computed in parallel a wave at a time (bounding memory) and added in block
    // order; the wave size does not affect the result.
    let blocks = n.div_ceil(BLOCK);
    let wave = 4 * rayon::current_num_threads().max(1);
    for w0 in (0..blocks).step_by(wave) {
        let parts: Vec<_> = (w0..(w0 + wave).min(blocks))
            .into_par_iter()
            .map(block)
            .collect();
        for (l, pw, pb) in parts {
            loss += l;
            gw += &pw;
            gb += &pb;
        }
    }
    (loss, gw, gb)
}

/// The normalised objective `f(W, b)` of the module docs on raw features, and its gradient
/// `(df/dW, df/db)`. For checks and diagnostics; [`fit`] uses the same code.
pub fn loss_and_grad(
    x: ArrayView2<f32>,
    y: &[u8],
    c: f64,
    weights: ArrayView2<f64>,
    intercept: ArrayView1<f64>,
) -> Result<(f64, Array2<f64>, Array1<f64>), ProbeError> {
    let k = weights.nrows();
    check_inputs(x, y, k, "features")?;
    if weights.ncols() != x.ncols() || intercept.len() != k {
        return Err(ProbeError::DimensionMismatch {
            expected: weights.ncols(),
            got: x.ncols(),
        });
    }
    if !(c > 0.0 && c.is_finite()) {
        return Err(ProbeError::Config(format!(
            "C = {c}, must be positive and finite"
        )));
    }
    let n = x.nrows() as f64;
    let lam = 1.0 / (c * n);
    let (l, gw, gb) = data_term(x, y, weights, intercept);
    let f = l / n + 0.5 * lam * weights.iter().map(|v| v * v).sum::<f64>();
    Ok((f, gw / n + &weights * lam, gb / n))
}

/// The problem in optimisation coordinates `(U, a)`, flattened as `[U row-major, a]`:
/// logits `U x~ + a` with `x~ = (x - shift) / scale`, penalty `lam/2 sum_kj pen_j U_kj^2`.
struct Problem<'a> {
    x: ArrayView2<'a, f32>,
    y: &'a [u8],
    k: usize,
    d: usize,
    lam: f64,
    shift: Array1<f64>,
    scale: Array1<f64>,
    pen: Array1<f64>,
}

impl Problem<'_> {
    /// Raw-coordinate weights and intercept equivalent to `p`.
    fn raw(&self, p: &[f64]) -> (Array2<f64>, Array1<f64>) {
        let u = ArrayView2::from_shape((self.k, self.d), &p[..self.k * self.d]).unwrap();
        let w = &u / &self.scale;
        let b = &ArrayView1::from(&p[self.k * self.d..]) - &w.dot(&self.shift);
        (w, b)
    }

    fn eval(&self, p: &[f64], grad: &mut [f64]) -> f64 {
        let (k, d) = (self.k, self.d);
        let n = self.x.nrows() as f64;
        let (w, b) = self.raw(p);
        let (l, gw, gb) = data_term(self.x, self.y, w.view(), b.view());
        let u = ArrayView2::from_shape((k, d), &p[..k * d]).unwrap();
        let mut pen = 0.0;
        for c in 0..k {
            let gbc = gb[c] / n;
            for j in 0..d {
                let uv = u[(c, j)];
                pen += self.pen[j] * uv * uv;
                grad[c * d + j] = (gw[(c, j)] / n - gbc * self.shift[j]) / self.scale[j]
                    + self.lam * self.pen[j] * uv;
            }
            grad[k * d + c] = gbc;
        }
        l / n + 0.5 * self.lam * pen
    }
}

/// Column means and population standard deviations, summed in fixed blocks.
fn mean_std(x: ArrayView2<f32>) -> (Array1<f64>, Array1<f64>) {
    let (n, d) = x.dim();
    let blocks = n.div_ceil(BLOCK);
    let block_sum = |f: &(dyn Fn(f64, usize) -> f64 + Sync)| -> Array1<f64> {
        let parts: Vec<Array1<f64>> = (0..blocks)
            .into_par_iter()
            .map(|bi| {
                let mut acc = Array1::<f64>::zeros(d);
                for row in x
                    .slice(s![bi * BLOCK..((bi + 1) * BLOCK).min(n), ..])
                    .rows()
                {
                    for (j, &v) in row.iter().enumerate() {
                        acc[j] += f(f64::from(v), j);
                    }
                }
                acc
            })
            .collect();
        parts.into_iter().fold(Array1::zeros(d), |a, p| a + p)
    };
    let mean = block_sum(&|v, _| v) / n as f64;
    let var = block_sum(&|v, j| (v - mean[j]).powi(2)) / n as f64;
    (mean, var.mapv(f64::sqrt))
}

// ---------------------------------------------------------------------------------------------
// L-BFGS with a strong-Wolfe line search

struct LbfgsResult {
    x: Vec<f64>,
    f: f64,
    g: Vec<f64>,
    iterations: usize,
    evaluations: usize,
    stop: StopReason,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A trial point of the line search.
struct Trial {
    a: f64,
    f: f64,
    dphi: f64,
    x: Vec<f64>,
    g: Vec<f64>,
}

/// Minimiser of the cubic through `(a0, f0, d0)`, `(a1, f1, d1)`, kept inside the middle 80% of
/// the interval; bisection when the cubic is unusable.
fn interpolate(a0: f64, f0: f64, d0: f64, a1: f64, f1: f64, d1: f64) -> f64 {
    let (lo, hi) = (a0.min(a1), a0.max(a1));
    let margin = 0.1 * (hi - lo);
    let mid = 0.5 * (a0 + a1);
    if !(f0.is_finite() && f1.is_finite() && d0.is_finite() && d1.is_finite()) {
        return mid;
    }
    let t1 = d0 + d1 - 3.0 * (f0 - f1) / (a0 - a1);
    let disc = t1 * t1 - d0 * d1;
    if disc < 0.0 {
        return mid;
    }
    let t2 = (a1 - a0).signum() * disc.sqrt();
    let a = a1 - (a1 - a0) * (d1 + t2 - t1) / (d1 - d0 + 2.0 * t2);
    if a.is_finite() && a >= lo + margin && a <= hi - margin {
        a
    } else {
        mid
    }
}

/// Strong-Wolfe line search (Nocedal & Wright, algorithms 3.5 and 3.6) along `dir` from `x`.
/// Returns the accepted point, or a point with sufficient decrease when the curvature condition
/// could not be met, or `None` when no decrease was found.
fn line_search(
    fg: &mut dyn FnMut(&[f64], &mut [f64]) -> f64,
    x: &[f64],
    f0: f64,
    dphi0: f64,
    dir: &[f64],
    a_init: f64,
    evals: &mut usize,
) -> Option<Trial> {
    let mut eval = |a: f64| -> Trial {
        let xt: Vec<f64> = x.iter().zip(dir).map(|(xi, di)| xi + a * di).collect();
        let mut g = vec![0.0; x.len()];
        let f = fg(&xt, &mut g);
        *evals += 1;
        Trial {
            a,
            f,
            dphi: dot(&g, dir),
            x: xt,
            g,
        }
    };
    let armijo_fails = |t: &Trial| !t.f.is_finite() || t.f > f0 + WOLFE_C1 * t.a * dphi0;
    let curvature_ok = |t: &Trial| t.dphi.abs() <= -WOLFE_C2 * dphi0;
    // Approximate Wolfe (Hager & Zhang): near the optimum the decrease `c1 a |dphi0|` sinks
    // below the round-off of `f`; then a point whose value is within round-off of `f0` and
    // whose slope meets the curvature condition is accepted on the slope alone (for a
    // quadratic, strong Wolfe slope + equal value implies sufficient decrease).
    let noise = F_NOISE * f0.abs().max(1.0);
    let approx_ok = |t: &Trial| t.f.is_finite() && t.f <= f0 + noise && curvature_ok(t);

    // Bracketing phase. `prev` is the last accepted trial (None = the start point, a = 0).
    let mut prev: Option<Trial> = None;
    let mut a = a_init;
    let mut used = 0;
    let (mut lo, mut hi): (Option<Trial>, Trial);
    loop {
        if used == MAX_LINE_SEARCH {
            return prev;
        }
        let t = eval(a);
        used += 1;
        if approx_ok(&t) {
            return Some(t);
        }
        let f_prev = prev.as_ref().map_or(f0, |p| p.f);
        if armijo_fails(&t) || (prev.is_some() && t.f >= f_prev) {
            lo = prev;
            hi = t;
            break;
        }
        if curvature_ok(&t) {
            return Some(t);
        }
        if t.dphi >= 0.0 {
            hi = prev.unwrap_or(Trial {
                a: 0.0,
                f: f0,
                dphi: dphi0,
                x: Vec::new(),
                g: Vec::new(),
            });
            lo = Some(t);
            break;
        }
        a = t.a * 2.0;
        prev = Some(t);
    }

    // Zoom phase: `lo` has sufficient decrease and the lowest value so far.
    while used < MAX_LINE_SEARCH {
        let (a_lo, f_lo, d_lo) = lo.as_ref().map_or((0.0, f0, dphi0), |t| (t.a, t.f, t.dphi));
        if (hi.a - a_lo).abs() <= 1e-14 * hi.a.abs().max(a_lo.abs()) {
            break;
        }
        let a = interpolate(a_lo, f_lo, d_lo, hi.a, hi.f, hi.dphi);
        let t = eval(a);
        used += 1;
        if approx_ok(&t) {
            return Some(t);
        }
        if armijo_fails(&t) || t.f >= f_lo {
            hi = t;
        } else {
            if curvature_ok(&t) {
                return Some(t);
            }
            if t.dphi * (hi.a - a_lo) >= 0.0 {
                hi = lo.take().unwrap_or(Trial {
                    a: 0.0,
                    f: f0,
                    dphi: dphi0,
                    x: Vec::new(),
                    g: Vec::new(),
                });
            }
            lo = Some(t);
        }
    }
    lo
}

/// Minimises `fg` from `x0` by L-BFGS. `converged(x, g)` is the gradient test; `on_iter` is
/// told each iteration's number and objective once its step is taken.
fn lbfgs(
    fg: &mut dyn FnMut(&[f64], &mut [f64]) -> f64,
    x0: Vec<f64>,
    max_iter: usize,
    ftol: f64,
    converged: &dyn Fn(&[f64], &[f64]) -> bool,
    on_iter: &mut dyn FnMut(usize, f64),
) -> LbfgsResult {
    let mut x = x0;
    let mut g = vec![0.0; x.len()];
    let mut f = fg(&x, &mut g);
    let mut evaluations = 1;
    let mut hist: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::with_capacity(MEMORY);
    let done = |x, f, g, iterations, evaluations, stop| LbfgsResult {
        x,
        f,
        g,
        iterations,
        evaluations,
        stop,
    };
    if !f.is_finite() {
        return done(x, f, g, 0, evaluations, StopReason::LineSearch);
    }
    if converged(&x, &g) {
        return done(x, f, g, 0, evaluations, StopReason::GradientTol);
    }
    let mut iter = 0;
    while iter < max_iter {
        iter += 1;
        // Two-loop recursion: dir = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        if let Some((s, y, _)) = hist.back() {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|qi| *qi *= gamma);
        }
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut dphi0 = dot(&dir, &g);
        if dphi0.is_nan() || dphi0 >= 0.0 {
            hist.clear();
            dir = g.iter().map(|v| -v).collect();
            dphi0 = -dot(&g, &g);
        }
        let a_init = if hist.is_empty() {
            (1.0 / dot(&g, &g).sqrt()).min(1.0)
        } else {
            1.0
        };
        let trial = match line_search(fg, &x, f, dphi0, &dir, a_init, &mut evaluations) {
            Some(t) => t,
            _ if !hist.is_empty() => {
                // Retry along the steepest descent with a fresh memory.
                hist.clear();
                continue;
            }
            _ => return done(x, f, g, iter, evaluations, StopReason::LineSearch),
        };
        let s: Vec<f64> = trial.x.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = trial.g.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > f64::EPSILON * dot(&y, &y) {
            if hist.len() == MEMORY {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        let f_old = f;
        (x, g, f) = (trial.x, trial.g, trial.f);
        on_iter(iter, f);
        if converged(&x, &g) {
            return done(x, f, g, iter, evaluations, StopReason::GradientTol);
        }
        if ftol > 0.0 && (f_old - f) / f_old.abs().max(f.abs()).max(1.0) <= ftol {
            return done(x, f, g, iter, evaluations, StopReason::LossChange);
        }
    }
    done(x, f, g, iter, evaluations, StopReason::MaxIter)
}

// ---------------------------------------------------------------------------------------------
// Fit / predict

/// Where a probe's fit is: reported after each L-BFGS iteration ([`fit_observed`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeProgress {
    /// Iterations done, 1 to `max_iter`.
    pub iteration: usize,
    /// The iteration limit, [`ProbeConfig::max_iter`].
    pub max_iter: usize,
    /// The regularised objective (mean cross-entropy plus the L2 term) after it.
    pub loss: f64,
}

/// Fits the probe on features `x` (`n x d`) with labels `y` (`< n_classes`).
pub fn fit(
    x: ArrayView2<f32>,
    y: &[u8],
    n_classes: usize,
    cfg: &ProbeConfig,
) -> Result<Probe, ProbeError> {
    fit_observed(x, y, n_classes, cfg, &mut |_| {})
}

/// [`fit`], telling `progress` where it is after every iteration (a fit on large features
/// takes minutes: this is what a progress bar shows).
pub fn fit_observed(
    x: ArrayView2<f32>,
    y: &[u8],
    n_classes: usize,
    cfg: &ProbeConfig,
    progress: &mut dyn FnMut(&ProbeProgress),
) -> Result<Probe, ProbeError> {
    if !(cfg.c > 0.0 && cfg.c.is_finite()) {
        return Err(ProbeError::Config(format!(
            "C = {}, must be positive and finite",
            cfg.c
        )));
    }
    if !(cfg.tol >= 0.0 && cfg.tol.is_finite()) {
        return Err(ProbeError::Config(format!(
            "tol = {}, must be >= 0 and finite",
            cfg.tol
        )));
    }
    if !(cfg.ftol >= 0.0 && cfg.ftol.is_finite()) {
        return Err(ProbeError::Config(format!(
            "ftol = {}, must be >= 0 and finite",
            cfg.ftol
        )));
    }
    check_inputs(x, y, n_classes, "training features")?;
    let (n, d) = x.dim();
    let k = n_classes;
    let lam = 1.0 / (cfg.c * n as f64);

    // `model_pre`: (shift, scale) of a pure preconditioner, whose effect the model's
    // coordinates must undo; None when the optimisation coordinates are the model's.
    let (shift, scale, pen, model_pre, standardization);
    if cfg.standardize || cfg.precondition {
        let (mean, std) = mean_std(x);
        if cfg.standardize {
            let std = std.mapv(|v| if v > 0.0 { v } else { 1.0 });
            (shift, scale, pen) = (mean.clone(), std.clone(), Array1::ones(d));
            model_pre = None;
            standardization = Some(Standardization { mean, std });
        } else {
            let floor = lam.sqrt();
            let s = std.mapv(|v| v.max(floor));
            pen = s.mapv(|v| 1.0 / (v * v));
            model_pre = Some((mean.clone(), s.clone()));
            (shift, scale) = (mean, s);
            standardization = None;
        }
    } else {
        (shift, scale, pen) = (Array1::zeros(d), Array1::ones(d), Array1::ones(d));
        model_pre = None;
        standardization = None;
    }
    let problem = Problem {
        x,
        y,
        k,
        d,
        lam,
        shift,
        scale,
        pen,
    };

    // Gradient in the model's coordinates: G_W = G_U * s + g_a mu^T, g_b = g_a.
    let model_grad_max = |g: &[f64]| -> f64 {
        let gb = &g[k * d..];
        let mut m = gb.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for c in 0..k {
            for j in 0..d {
                let v = match &model_pre {
                    Some((mu, s)) => g[c * d + j] * s[j] + gb[c] * mu[j],
                    None => g[c * d + j],
                };
                m = m.max(v.abs());
            }
        }
        m
    };
    let tol = cfg.tol;
    let converged = |_: &[f64], g: &[f64]| model_grad_max(g) <= tol;
    let mut fg = |p: &[f64], g: &mut [f64]| problem.eval(p, g);
    let r = lbfgs(
        &mut fg,
        vec![0.0; k * d + k],
        cfg.max_iter,
        cfg.ftol,
        &converged,
        &mut |iteration, loss| {
            progress(&ProbeProgress {
                iteration,
                max_iter: cfg.max_iter,
                loss,
            })
        },
    );

    let (weights, intercept) = match model_pre {
        Some(_) => problem.raw(&r.x),
        None => (
            Array2::from_shape_vec((k, d), r.x[..k * d].to_vec()).unwrap(),
            Array1::from(r.x[k * d..].to_vec()),
        ),
    };
    Ok(Probe {
        weights,
        intercept,
        iterations: r.iterations,
        evaluations: r.evaluations,
        converged: matches!(r.stop, StopReason::GradientTol | StopReason::LossChange),
        stop: r.stop,
        final_loss: r.f,
        final_grad_max: model_grad_max(&r.g),
        standardization,
    })
}

impl Probe {
    /// Classes `K` (rows of the weights).
    pub fn n_classes(&self) -> usize {
        self.weights.nrows()
    }

    /// Features `d` per sample (columns of the weights).
    pub fn n_features(&self) -> usize {
        self.weights.ncols()
    }

    /// Class scores (logits) `n x n_classes` for raw features `x`.
    pub fn decision_function(&self, x: ArrayView2<f32>) -> Result<Array2<f64>, ProbeError> {
        if x.ncols() != self.n_features() {
            return Err(ProbeError::DimensionMismatch {
                expected: self.n_features(),
                got: x.ncols(),
            });
        }
        check_finite(x, "features")?;
        let (w, b) = match &self.standardization {
            Some(st) => {
                let w = &self.weights / &st.std;
                let b = &self.intercept - &w.dot(&st.mean);
                (w, b)
            }
            None => (self.weights.clone(), self.intercept.clone()),
        };
        let n = x.nrows();
        let parts: Vec<Array2<f64>> = (0..n.div_ceil(BLOCK))
            .into_par_iter()
            .map(|bi| {
                let xb = x
                    .slice(s![bi * BLOCK..((bi + 1) * BLOCK).min(n), ..])
                    .mapv(f64::from);
                xb.dot(&w.t()) + &b
            })
            .collect();
        let mut out = Array2::zeros((n, self.n_classes()));
        for (bi, p) in parts.into_iter().enumerate() {
            out.slice_mut(s![bi * BLOCK..bi * BLOCK + p.nrows(), ..])
                .assign(&p);
        }
        Ok(out)
    }

    /// Predicted class of each row of `x` (ties go to the lowest class).
    pub fn predict(&self, x: ArrayView2<f32>) -> Result<Vec<u8>, ProbeError> {
        let z = self.decision_function(x)?;
        Ok(z.rows()
            .into_iter()
            .map(|r| {
                let mut best = 0;
                for (c, &v) in r.iter().enumerate() {
                    if v > r[best] {
                        best = c;
                    }
                }
                best as u8
            })
            .collect())
    }
}

/// Fraction of `pred` equal to `y` (NaN when empty). Panics if the lengths differ.
pub fn accuracy(pred: &[u8], y: &[u8]) -> f64 {
    assert_eq!(
        pred.len(),
        y.len(),
        "accuracy: {} predictions but {} labels",
        pred.len(),
        y.len()
    );
    pred.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
}

/// Confusion matrix `[true][predicted]`. Panics if lengths differ or a value is `>= n_classes`.
pub fn confusion(pred: &[u8], y: &[u8], n_classes: usize) -> Array2<u64> {
    assert_eq!(
        pred.len(),
        y.len(),
        "confusion: {} predictions but {} labels",
        pred.len(),
        y.len()
    );
    let mut m = Array2::zeros((n_classes, n_classes));
    for (&p, &t) in pred.iter().zip(y) {
        assert!(
            (p as usize) < n_classes && (t as usize) < n_classes,
            "confusion: class {} or {} not below n_classes = {n_classes}",
            t,
            p
        );
        m[(t as usize, p as usize)] += 1;
    }
    m
}

/// Scores a fitted probe on a training and a test set.
pub fn evaluate(
    probe: &Probe,
    x_train: ArrayView2<f32>,
    y_train: &[u8],
    x_test: ArrayView2<f32>,
    y_test: &[u8],
) -> Result<ProbeReport, ProbeError> {
    let k = probe.n_classes();
    for (x, y, what) in [
        (x_train, y_train, "training features"),
        (x_test, y_test, "test features"),
    ] {
        if x.nrows() != y.len() {
            return Err(ProbeError::LengthMismatch {
                what,
                rows: x.nrows(),
                labels: y.len(),
            });
        }
        // An accuracy over no samples would be 0 / 0.
        if x.nrows() == 0 {
            return Err(ProbeError::Empty(format!("no {what} to score")));
        }
        check_labels(y, k)?;
    }
    let p_train = probe.predict(x_train)?;
    let p_test = probe.predict(x_test)?;
    let conf = confusion(&p_test, y_test, k);
    Ok(ProbeReport {
        n_classes: k,
        train_acc: accuracy(&p_train, y_train),
        test_acc: accuracy(&p_test, y_test),
        confusion: conf.rows().into_iter().map(|r| r.to_vec()).collect(),
        iterations: probe.iterations,
        converged: probe.converged,
        final_loss: probe.final_loss,
    })
}

/// [`fit`] on the training set, then [`evaluate`].
pub fn fit_and_evaluate(
    x_train: ArrayView2<f32>,
    y_train: &[u8],
    x_test: ArrayView2<f32>,
    y_test: &[u8],
    n_classes: usize,
    cfg: &ProbeConfig,
) -> Result<(Probe, ProbeReport), ProbeError> {
    fit_and_evaluate_observed(
        x_train,
        y_train,
        x_test,
        y_test,
        n_classes,
        cfg,
        &mut |_| {},
    )
}

/// [`fit_and_evaluate`] with the fit's progress reported ([`fit_observed`]).
pub fn fit_and_evaluate_observed(
    x_train: ArrayView2<f32>,
    y_train: &[u8],
    x_test: ArrayView2<f32>,
    y_test: &[u8],
    n_classes: usize,
    cfg: &ProbeConfig,
    progress: &mut dyn FnMut(&ProbeProgress),
) -> Result<(Probe, ProbeReport), ProbeError> {
    let probe = fit_observed(x_train, y_train, n_classes, cfg, progress)?;
    let report = evaluate(&probe, x_train, y_train, x_test, y_test)?;
    Ok((probe, report))
}
