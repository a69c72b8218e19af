//! Tests of the softmax-regression linear probe (`calm_gpu::probe`).

use calm_gpu::probe::{
    ProbeConfig, ProbeError, ProbeReport, StopReason, accuracy, confusion, evaluate, fit,
    fit_and_evaluate, fit_observed, loss_and_grad,
};
use ndarray::{Array1, Array2, Axis};

/// Small deterministic generator (splitmix64), so the tests need no RNG crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unif(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.unif().max(1e-300);
        let u2 = self.unif();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// `n` samples of `d` features from `k` overlapping Gaussian classes: class means drawn with
/// spread `sep`, unit noise; then feature `j` is mapped to `x * scale[j] + offset[j]`.
fn gaussian_problem(
    seed: u64,
    n: usize,
    d: usize,
    k: usize,
    sep: f64,
    scale: &[f64],
    offset: &[f64],
) -> (Array2<f32>, Vec<u8>) {
    let mut rng = Rng(seed);
    let means: Vec<Vec<f64>> = (0..k)
        .map(|_| (0..d).map(|_| sep * rng.normal()).collect())
        .collect();
    let mut x = Array2::<f32>::zeros((n, d));
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % k;
        y.push(c as u8);
        for j in 0..d {
            x[(i, j)] = ((means[c][j] + rng.normal()) * scale[j] + offset[j]) as f32;
        }
    }
    (x, y)
}

fn max_abs(a: &Array2<f64>, b: &Array1<f64>) -> f64 {
    a.iter().chain(b.iter()).fold(0.0f64, |m, v| m.max(v.abs()))
}

#[test]
fn separable_toy_problem_is_fit_exactly() {
    // Four well separated blobs in 2-D plus a constant feature.
    let centres = [(-6.0, -6.0), (6.0, -6.0), (-6.0, 6.0), (6.0, 6.0)];
    let mut rng = Rng(1);
    let n = 200;
    let mut x = Array2::<f32>::zeros((n, 3));
    let mut y = Vec::new();
    for i in 0..n {
        let c = i % 4;
        x[(i, 0)] = (centres[c].0 + rng.normal()) as f32;
        x[(i, 1)] = (centres[c].1 + rng.normal()) as f32;
        x[(i, 2)] = 1.0;
        y.push(c as u8);
    }
    for cfg in [
        ProbeConfig::default(),
        ProbeConfig {
            precondition: false,
            ..Default::default()
        },
        ProbeConfig {
            standardize: true,
            ..Default::default()
        },
    ] {
        let probe = fit(x.view(), &y, 4, &cfg).unwrap();
        assert!(probe.converged, "{cfg:?}: {:?}", probe.stop);
        let pred = probe.predict(x.view()).unwrap();
        assert_eq!(accuracy(&pred, &y), 1.0, "{cfg:?}");
        let conf = confusion(&pred, &y, 4);
        assert_eq!(conf.diag().sum(), n as u64);
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let (n, d, k) = (60, 5, 3);
    let (x, y) = gaussian_problem(7, n, d, k, 1.0, &[1.0, 3.0, 0.5, 10.0, 1.0], &[0.0; 5]);
    let mut rng = Rng(11);
    let w = Array2::from_shape_fn((k, d), |_| 0.3 * rng.normal());
    let b = Array1::from_shape_fn(k, |_| 0.3 * rng.normal());
    let c = 0.7;
    let (_, gw, gb) = loss_and_grad(x.view(), &y, c, w.view(), b.view()).unwrap();
    let h = 1e-6;
    let f_at = |w: &Array2<f64>, b: &Array1<f64>| {
        loss_and_grad(x.view(), &y, c, w.view(), b.view())
            .unwrap()
            .0
    };
    for r in 0..k {
        for j in 0..d {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[(r, j)] += h;
            wm[(r, j)] -= h;
            let fd = (f_at(&wp, &b) - f_at(&wm, &b)) / (2.0 * h);
            assert!(
                (fd - gw[(r, j)]).abs() < 1e-7,
                "dW[{r},{j}]: fd {fd} vs {}",
                gw[(r, j)]
            );
        }
        let (mut bp, mut bm) = (b.clone(), b.clone());
        bp[r] += h;
        bm[r] -= h;
        let fd = (f_at(&w, &bp) - f_at(&w, &bm)) / (2.0 * h);
        assert!((fd - gb[r]).abs() < 1e-7, "db[{r}]: fd {fd} vs {}", gb[r]);
    }
}

#[test]
fn solution_is_a_stationary_minimum() {
    // Overlapping classes so the optimum is interior; features of very different scales.
    let scale = [1.0, 50.0, 0.02, 120.0, 3.0, 1.0];
    let offset = [0.0, 30.0, -1.0, 100.0, 0.0, -50.0];
    let (x, y) = gaussian_problem(3, 300, 6, 4, 0.8, &scale, &offset);
    let tol = 1e-8;
    let cfg = ProbeConfig {
        tol,
        ftol: 0.0,
        ..Default::default()
    };
    let probe = fit(x.view(), &y, 4, &cfg).unwrap();
    assert!(
        probe.converged,
        "{:?} after {} iterations",
        probe.stop, probe.iterations
    );
    let (f, gw, gb) = loss_and_grad(
        x.view(),
        &y,
        cfg.c,
        probe.weights.view(),
        probe.intercept.view(),
    )
    .unwrap();
    assert!(
        (f - probe.final_loss).abs() <= 1e-12 * f.abs(),
        "{f} vs {}",
        probe.final_loss
    );
    // The gradient recomputed in raw coordinates is below tol (small slack for round-off).
    let g = max_abs(&gw, &gb);
    assert!(g <= 1.5 * tol, "max |grad| = {g}");
    if probe.stop == StopReason::GradientTol {
        assert!(probe.final_grad_max <= tol);
    }
    // Every perturbation, random or along a coordinate, raises the objective (convex problem).
    let mut rng = Rng(5);
    for t in 0..40 {
        let eps = if t < 20 { 1e-3 } else { 1e-1 };
        let dw = Array2::from_shape_fn(probe.weights.dim(), |(_, j)| eps * rng.normal() / scale[j]);
        let db = Array1::from_shape_fn(probe.intercept.len(), |_| eps * rng.normal());
        let (fp, _, _) = loss_and_grad(
            x.view(),
            &y,
            cfg.c,
            (&probe.weights + &dw).view(),
            (&probe.intercept + &db).view(),
        )
        .unwrap();
        assert!(
            fp >= f,
            "perturbation {t} lowered the objective: {fp} < {f}"
        );
    }
}

#[test]
fn preconditioning_does_not_change_the_minimiser() {
    // Large-scale features as in the project's pooled features (about -110 .. 174).
    let d = 8;
    let scale: Vec<f64> = (0..d).map(|j| [40.0, 5.0, 0.3, 60.0][j % 4]).collect();
    let offset: Vec<f64> = (0..d).map(|j| [30.0, -100.0, 0.0, 90.0][j % 4]).collect();
    let (x, y) = gaussian_problem(21, 400, d, 5, 0.7, &scale, &offset);
    let base = ProbeConfig {
        tol: 1e-9,
        ftol: 0.0,
        max_iter: 50_000,
        ..Default::default()
    };
    let pre = fit(x.view(), &y, 5, &base).unwrap();
    let raw = fit(
        x.view(),
        &y,
        5,
        &ProbeConfig {
            precondition: false,
            ..base.clone()
        },
    )
    .unwrap();
    assert!(pre.converged, "preconditioned: {:?}", pre.stop);
    assert!(
        raw.converged,
        "plain: {:?} after {}",
        raw.stop, raw.iterations
    );
    assert!((pre.final_loss - raw.final_loss).abs() <= 1e-10 * pre.final_loss.abs());
    // Both stationary; weights agree to what the conditioning allows.
    for ((c, j), &a) in pre.weights.indexed_iter() {
        let b = raw.weights[(c, j)];
        assert!((a - b).abs() * scale[j] < 1e-4, "W[{c},{j}]: {a} vs {b}");
    }
    eprintln!(
        "iterations: preconditioned {} ({} evals), plain {} ({} evals)",
        pre.iterations, pre.evaluations, raw.iterations, raw.evaluations
    );
    // Measured: 46 preconditioned vs 32593 plain iterations.
    assert!(pre.iterations * 10 < raw.iterations);
}

#[test]
fn standardize_equals_fitting_standardized_features() {
    let scale = [10.0, 0.1, 1.0, 7.0];
    let offset = [5.0, 1.0, -3.0, 0.0];
    let (mut x, y) = gaussian_problem(9, 200, 4, 3, 1.0, &scale, &offset);
    x.column_mut(2).fill(4.0); // a constant feature: std taken as 1
    let cfg = ProbeConfig {
        standardize: true,
        tol: 1e-9,
        ..Default::default()
    };
    let a = fit(x.view(), &y, 3, &cfg).unwrap();
    let st = a.standardization.clone().expect("standardization stored");
    assert_eq!(st.std[2], 1.0);
    let xs = Array2::from_shape_fn(x.dim(), |(i, j)| {
        ((x[(i, j)] as f64 - st.mean[j]) / st.std[j]) as f32
    });
    let b = fit(
        xs.view(),
        &y,
        3,
        &ProbeConfig {
            standardize: false,
            ..cfg
        },
    )
    .unwrap();
    assert!(b.standardization.is_none());
    for (u, v) in a.weights.iter().zip(b.weights.iter()) {
        assert!((u - v).abs() < 1e-4, "{u} vs {v}");
    }
    assert_eq!(a.predict(x.view()).unwrap(), b.predict(xs.view()).unwrap());
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (x, y) = gaussian_problem(4, 3000, 10, 4, 0.5, &[1.0; 10], &[0.0; 10]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| fit(x.view(), &y, 4, &ProbeConfig::default()).unwrap())
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.iterations, b.iterations);
    assert_eq!(a.final_loss.to_bits(), b.final_loss.to_bits());
    assert!(
        a.weights
            .iter()
            .zip(b.weights.iter())
            .all(|(u, v)| u.to_bits() == v.to_bits())
    );
}

#[test]
fn iteration_cap_is_reported() {
    let (x, y) = gaussian_problem(8, 300, 6, 3, 0.5, &[1.0; 6], &[0.0; 6]);
    let p = fit(
        x.view(),
        &y,
        3,
        &ProbeConfig {
            max_iter: 2,
            tol: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.iterations, 2);
    assert!(!p.converged);
    assert_eq!(p.stop, StopReason::MaxIter);
}

#[test]
fn progress_is_reported_every_iteration_and_the_loss_falls() {
    let (x, y) = gaussian_problem(9, 400, 8, 4, 0.7, &[1.0; 8], &[0.0; 8]);
    let cfg = ProbeConfig::default();
    let mut seen = Vec::new();
    let p = fit_observed(x.view(), &y, 4, &cfg, &mut |s| seen.push(*s)).unwrap();
    assert!(p.iterations > 3, "a problem that takes a few iterations");
    assert_eq!(seen.len(), p.iterations);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!((s.iteration, s.max_iter), (i + 1, cfg.max_iter));
    }
    // The line search only takes steps that lower the objective.
    assert!(seen.windows(2).all(|w| w[1].loss <= w[0].loss), "{seen:?}");
    assert_eq!(seen.last().unwrap().loss, p.final_loss);
    // Observed or not, the same fit.
    let q = fit(x.view(), &y, 4, &cfg).unwrap();
    assert_eq!((q.weights, q.intercept), (p.weights, p.intercept));
}

#[test]
fn class_absent_from_training_set_is_never_predicted() {
    // n_classes = 4 but no sample of class 3: its unpenalised intercept drifts down until the
    // gradient test is met; the fit must still terminate and converge.
    let (x, y) = gaussian_problem(31, 300, 4, 3, 1.0, &[1.0; 4], &[0.0; 4]);
    let p = fit(x.view(), &y, 4, &ProbeConfig::default()).unwrap();
    assert!(p.converged, "{:?} after {}", p.stop, p.iterations);
    assert!(
        p.intercept[3]
            < p.intercept
                .iter()
                .take(3)
                .cloned()
                .fold(f64::INFINITY, f64::min)
    );
    assert!(p.predict(x.view()).unwrap().iter().all(|&c| c < 3));
}

#[test]
fn bad_inputs_are_errors() {
    let (mut x, y) = gaussian_problem(2, 20, 3, 2, 1.0, &[1.0; 3], &[0.0; 3]);
    let cfg = ProbeConfig::default();

    x[(7, 2)] = f32::NAN;
    let e = fit(x.view(), &y, 2, &cfg).unwrap_err();
    assert!(
        matches!(e, ProbeError::NonFinite { row: 7, col: 2, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("row 7") && !msg.contains('\n'), "{msg}");
    x[(7, 2)] = f32::INFINITY;
    assert!(matches!(
        fit(x.view(), &y, 2, &cfg),
        Err(ProbeError::NonFinite { .. })
    ));
    x[(7, 2)] = 0.0;

    // Scoring on no samples is an error, not an accuracy of NaN.
    let p = fit(x.view(), &y, 2, &cfg).unwrap();
    let none = x.slice(ndarray::s![..0, ..]);
    let e = evaluate(&p, x.view(), &y, none, &[]).unwrap_err();
    assert!(matches!(e, ProbeError::Empty(_)), "{e}");

    let mut bad = y.clone();
    bad[4] = 2;
    let e = fit(x.view(), &bad, 2, &cfg).unwrap_err();
    assert!(
        matches!(
            e,
            ProbeError::LabelOutOfRange {
                index: 4,
                label: 2,
                n_classes: 2
            }
        ),
        "{e}"
    );

    let empty = Array2::<f32>::zeros((0, 3));
    assert!(matches!(
        fit(empty.view(), &[], 2, &cfg),
        Err(ProbeError::Empty(_))
    ));
    let no_features = Array2::<f32>::zeros((20, 0));
    assert!(matches!(
        fit(no_features.view(), &y, 2, &cfg),
        Err(ProbeError::Empty(_))
    ));
    assert!(matches!(
        fit(x.view(), &y[..10], 2, &cfg),
        Err(ProbeError::LengthMismatch { .. })
    ));
    assert!(matches!(
        fit(x.view(), &y, 1, &cfg),
        Err(ProbeError::Config(_))
    ));
    let c0 = ProbeConfig {
        c: 0.0,
        ..Default::default()
    };
    assert!(matches!(
        fit(x.view(), &y, 2, &c0),
        Err(ProbeError::Config(_))
    ));

    let probe = fit(x.view(), &y, 2, &cfg).unwrap();
    let narrow = Array2::<f32>::zeros((4, 2));
    assert!(matches!(
        probe.predict(narrow.view()),
        Err(ProbeError::DimensionMismatch { .. })
    ));
    x[(0, 0)] = f32::NAN;
    assert!(matches!(
        probe.predict(x.view()),
        Err(ProbeError::NonFinite { .. })
    ));
}

#[test]
fn accuracy_confusion_and_report() {
    let pred = [0u8, 1, 2, 2, 1, 0];
    let y = [0u8, 1, 1, 2, 1, 2];
    assert!((accuracy(&pred, &y) - 4.0 / 6.0).abs() < 1e-15);
    let m = confusion(&pred, &y, 3);
    assert_eq!(m, ndarray::arr2(&[[1, 0, 0], [0, 2, 1], [1, 0, 1]]));
    assert_eq!(m.sum_axis(Axis(1)).to_vec(), vec![1, 3, 2]); // rows are true classes

    let (all_x, all_y) = gaussian_problem(12, 490, 5, 3, 1.0, &[1.0; 5], &[0.0; 5]);
    let (x, y) = (all_x.slice(ndarray::s![..400, ..]), &all_y[..400]);
    let (xt, yt) = (all_x.slice(ndarray::s![400.., ..]), &all_y[400..]);
    let (probe, report) = fit_and_evaluate(x, y, xt, yt, 3, &ProbeConfig::default()).unwrap();
    assert_eq!(report, evaluate(&probe, x, y, xt, yt).unwrap());
    assert_eq!(report.confusion.iter().flatten().sum::<u64>(), 90);
    let diag: u64 = (0..3).map(|c| report.confusion[c][c]).sum();
    assert_eq!(diag as f64 / 90.0, report.test_acc);
    assert!(
        report.test_acc > 0.6 && report.train_acc > 0.6,
        "{report:?}"
    );
    assert_eq!(report.iterations, probe.iterations);
    // JSON round trip (floats compared loosely: serde_json's default parser is not exact).
    let json = serde_json::to_string(&report).unwrap();
    let back: ProbeReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.confusion, report.confusion);
    assert_eq!(
        (back.iterations, back.converged),
        (report.iterations, report.converged)
    );
    assert!((back.test_acc - report.test_acc).abs() < 1e-12);
    assert!((back.final_loss - report.final_loss).abs() < 1e-12);
}

/// Raw Fashion-MNIST pixels (scaled to [0, 1]) on a subset: first 10000 training and first
/// 2000 test images. Skipped when the dataset is not installed.
///
/// Bound measured on this subset with the default config (C = 1, tol = 1e-4, max_iter 1000,
/// preconditioned): train 0.9275, test 0.8435 after 469 iterations (499 evaluations),
/// converged on the gradient test; 5.4 s release / 11-17 s test profile (opt-level 2) on 2
/// shared cores. scikit-learn 1.9.1 `LogisticRegression()` on the same subset: test 0.8455.
/// The assertion leaves a margin of about 2 points. On the full 60000/10000 split the probe
/// reaches test 0.8426 (486 iterations, 45 s), near the published ~84% for logistic regression
/// on raw pixels.
#[test]
fn fashion_mnist_raw_pixels_subset() {
    let dir = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    let files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    if let Some(f) = files.iter().find(|f| !dir.join(f).exists()) {
        eprintln!(
            "skipping: {} not found (Fashion-MNIST not installed)",
            dir.join(f).display()
        );
        return;
    }
    // The first `take` images as an `n x 784` matrix of pixels in [0, 1].
    let pixels = |name: &str, take: usize| -> Array2<f32> {
        let ds = calm_gpu::data::load(dir.join(name).as_path()).unwrap();
        let shape = ds.images.shape().to_vec();
        let n = shape[0].min(take);
        let per: usize = shape[1..].iter().product();
        let flat = ds.images.as_standard_layout().into_owned();
        let x = flat.into_shape_with_order((shape[0], per)).unwrap();
        let mut x = x.slice_move(ndarray::s![..n, ..]);
        // Whether the loader already scales to [0, 1] or not, the probe sees pixels / 255.
        if x.iter().any(|&v| v > 1.5) {
            x.mapv_inplace(|v| v / 255.0);
        }
        x
    };
    let labels = |name: &str, take: usize| -> Vec<u8> {
        let mut y = calm_gpu::data::load_labels(dir.join(name).as_path()).unwrap();
        y.truncate(take);
        y
    };
    let (n_train, n_test) = (10_000, 2_000);
    let x = pixels(files[0], n_train);
    let y = labels(files[1], n_train);
    let xt = pixels(files[2], n_test);
    let yt = labels(files[3], n_test);
    let start = std::time::Instant::now();
    let (probe, report) =
        fit_and_evaluate(x.view(), &y, xt.view(), &yt, 10, &ProbeConfig::default()).unwrap();
    eprintln!(
        "fashion-mnist raw pixels {n_train}/{n_test}: train {:.4} test {:.4}, {} iterations, \
         {} evaluations, converged {} ({:?}), {:.1} s",
        report.train_acc,
        report.test_acc,
        probe.iterations,
        probe.evaluations,
        probe.converged,
        probe.stop,
        start.elapsed().as_secs_f64()
    );
    assert!(report.test_acc >= 0.82, "test accuracy {}", report.test_acc);
    assert!(report.train_acc >= report.test_acc);
}
