//! The library API as a user calls it: the parameter builder and its checks, a fit that gives
//! the CLI's bits, the Trainer's observer, cancellation and resume, and the fitted layer.

use std::path::Path;
use std::sync::Arc;

use calm_gpu::data::{Dataset, Split, embedded_digits};
use calm_gpu::em::Event;
use calm_gpu::{Calm, CalmError, CancelToken, Checkpoint, Device, Model, Pooling, Trainer};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `Calm::params(..).fit(..)` on the shipped digits gives the bits that
/// `calm-gpu train --backend cpu --kernels 8 --width 5 --pad 1 --epochs 3 --batch 300 --seed 1`
/// wrote at the previous release (tests/fixtures/README.md).
#[test]
fn fit_gives_the_fixture_the_cli_wrote() {
    let digits = embedded_digits(Split::Train);
    let layer = Calm::params(8)
        .width(5)
        .pad(1)
        .epochs(3)
        .batch(300)
        .seed(1)
        .device(Device::Cpu)
        .fit(digits.images.view())
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spec-k8-w5.safetensors");
    let want = Model::load(&path).unwrap();
    assert_eq!(bits(&layer.model().theta), bits(&want.theta));
    assert_eq!(bits(&layer.model().counts), bits(&want.counts));
    let ll: Vec<u64> = layer.history().iter().map(|r| r.loglik.to_bits()).collect();
    let want_ll: Vec<u64> = want
        .meta
        .history
        .iter()
        .map(|r| r.loglik.to_bits())
        .collect();
    assert_eq!(ll, want_ll);
    assert_eq!(layer.theta().dim(), (8, 1, 5, 5));
    assert_eq!(layer.counts().len(), 8);
    // EM's LL never decreases.
    assert!(
        layer
            .history()
            .windows(2)
            .all(|w| w[1].loglik >= w[0].loglik)
    );
}

/// Each bad parameter is refused before any work, naming its field.
#[test]
fn checks_name_the_field() {
    let field = |p: calm_gpu::CalmParams| p.check().unwrap_err().field;
    assert_eq!(field(Calm::params(0)), "kernels");
    assert_eq!(field(Calm::params(4).width(0)), "width");
    assert_eq!(field(Calm::params(4).epochs(0)), "epochs");
    assert_eq!(field(Calm::params(4).batch(0)), "batch");
    assert_eq!(field(Calm::params(4).tol(f64::NAN)), "tol");
    assert_eq!(field(Calm::params(4).whiten(0)), "whiten");
    assert_eq!(field(Calm::params(4).variance(0.0)), "variance");
    assert_eq!(field(Calm::params(4).variance(f64::NAN)), "variance");
    assert_eq!(field(Calm::params(4).variance(-1.0)), "variance");
    assert!(Calm::params(4).check().is_ok());
    let e = Calm::params(0).check().unwrap_err().to_string();
    assert_eq!(e, "kernels must be at least 1");
    // Against the data: kernels wider than the padded image, and weights of the wrong shape.
    let images = ndarray::Array4::<f32>::zeros((3, 1, 6, 6));
    let err = Calm::params(2)
        .width(9)
        .pad(0)
        .device(Device::Cpu)
        .fit(images.view());
    assert!(matches!(err, Err(CalmError::Geometry(_))), "{err:?}");
    let err = Calm::params(2)
        .width(3)
        .init_theta(vec![0.0; 5])
        .device(Device::Cpu)
        .fit(images.view());
    assert!(
        matches!(&err, Err(CalmError::Param(p)) if p.field == "init_theta"),
        "{err:?}"
    );
    let mut nan = images.clone();
    nan[[1, 0, 2, 2]] = f32::NAN;
    let err = Calm::params(2).width(3).device(Device::Cpu).fit(nan.view());
    assert!(err.unwrap_err().to_string().contains("image 1"));
    let empty = ndarray::Array4::<f32>::zeros((0, 1, 6, 6));
    assert!(
        Calm::params(2)
            .width(3)
            .device(Device::Cpu)
            .fit(empty.view())
            .is_err()
    );
}

fn digits(n: usize) -> Arc<Dataset> {
    let d = embedded_digits(Split::Train);
    Arc::new(Dataset::new(
        d.images.slice(ndarray::s![..n, .., .., ..]).to_owned(),
        None,
    ))
}

/// A fixed variance (the posterior's temperature) is the model's prior from the first epoch and
/// stays: every epoch's `L` is divided by it, EM still never lowers LL, and the model keeps it.
/// Variance 1 is SPEC's model bit for bit; another one fits other kernels.
#[test]
fn a_fixed_variance_is_kept_and_tempers_the_posterior() {
    let data = digits(400);
    let fit = |v: Option<f64>| {
        let mut p = Calm::params(8)
            .width(5)
            .pad(1)
            .epochs(4)
            .batch(150)
            .init_method(calm_gpu::em::InitMethod::Patches)
            .device(Device::Cpu);
        if let Some(v) = v {
            p = p.variance(v);
        }
        p.fit_source(data.clone()).unwrap()
    };
    let spec = fit(None);
    let one = fit(Some(1.0));
    assert_eq!(bits(&one.model().theta), bits(&spec.model().theta));
    let hot = fit(Some(0.25));
    let prior = hot
        .model()
        .prior
        .clone()
        .expect("a fixed variance is kept in the model");
    assert_eq!(prior.inv_var, 4.0);
    assert!(prior.log_weight.iter().all(|&w| w == 0.0));
    assert_ne!(bits(&hot.model().theta), bits(&spec.model().theta));
    let ll: Vec<f64> = hot.history().iter().map(|r| r.loglik).collect();
    for e in 1..ll.len() {
        // 1e-9 of |LL|: rounding, as for a learned prior (em_properties.rs).
        assert!(ll[e] >= ll[e - 1] - 1e-9 * ll[e - 1].abs(), "{ll:?}");
    }
    let path =
        std::env::temp_dir().join(format!("calm-variance-{}.safetensors", std::process::id()));
    hot.save(&path).unwrap();
    assert_eq!(Model::load(&path).unwrap().prior, Some(prior));
    std::fs::remove_file(&path).ok();
}

/// A token cancelled from the observer stops the fit after the batch in progress with a state
/// that resumes exactly: the resumed run ends with the uninterrupted run's bits. A second
/// trainer in the same process, with its own token, is not stopped.
#[test]
fn cancel_then_resume_gives_the_uninterrupted_bits() {
    let params = Calm::params(6)
        .width(5)
        .pad(0)
        .epochs(4)
        .batch(100)
        .revive(true)
        .device(Device::Cpu);
    let data = digits(400);
    let whole = params.fit_source(data.clone()).unwrap();

    let cancel = CancelToken::new();
    let mut t = Trainer::new(&params, data.clone())
        .unwrap()
        .with_cancel(cancel.clone());
    let other = CancelToken::new();
    let mut bystander = Trainer::new(&params, data.clone())
        .unwrap()
        .with_cancel(other.clone());
    let (mut batches, mut epochs) = (0, 0);
    let outcome = t
        .run(&mut |ev: &Event| match ev {
            Event::Progress { .. } => {
                batches += 1;
                // In the middle of epoch 3: that epoch is abandoned.
                if epochs == 2 && batches > 1 {
                    cancel.cancel();
                }
            }
            Event::EpochEnd(_) => epochs += 1,
            _ => {}
        })
        .unwrap();
    assert!(outcome.interrupted, "{outcome:?}");
    assert_eq!(outcome.history.len(), 2);
    assert!(!other.is_cancelled());
    let b = bystander.run(&mut ()).unwrap();
    assert!(!b.interrupted);
    assert_eq!(b.history.len(), whole.history().len());

    let dir = tempfile::tempdir().unwrap();
    t.save_checkpoint(dir.path()).unwrap();
    let ck = Checkpoint::load(dir.path()).unwrap();
    assert_eq!(ck.records.len(), 2);
    let mut resumed = Trainer::resume(&params, data, ck).unwrap();
    let outcome = resumed.run(&mut ()).unwrap();
    assert!(!outcome.interrupted);
    let done = resumed.model(outcome.stopped).unwrap();
    assert_eq!(bits(&done.theta), bits(&whole.model().theta));
    assert_eq!(bits(&done.counts), bits(&whole.model().counts));
    assert_eq!(done.meta.history, whole.model().meta.history);
}

/// A checkpoint written after every epoch holds the caller's entries and the records.
#[test]
fn checkpoints_every_epoch_keep_the_callers_entries() {
    let dir = tempfile::tempdir().unwrap();
    let params = Calm::params(4).width(5).epochs(2).device(Device::Cpu);
    let mut t = Trainer::new(&params, digits(200))
        .unwrap()
        .checkpoint_every_epoch(dir.path().to_path_buf())
        .checkpoint_extra([("run".to_string(), "{\"mine\":1}".to_string())].into());
    let mut seen = Vec::new();
    t.run(&mut |ev: &Event| {
        if let Event::EpochEnd(r) = ev {
            seen.push(r.epoch);
        }
    })
    .unwrap();
    assert_eq!(seen, [1, 2]);
    let ck = Checkpoint::load(dir.path()).unwrap();
    assert_eq!(ck.records.len(), 2);
    assert_eq!(ck.extra("run"), Some("{\"mine\":1}"));
    assert_eq!(bits(&ck.model.theta), bits(&t.model(None).unwrap().theta));
}

/// The fitted layer's features equal the saved model's, and the file reads back.
#[test]
fn a_layer_saves_loads_and_encodes() {
    let d = embedded_digits(Split::Test);
    let images = d.images.slice(ndarray::s![..50, .., .., ..]);
    let layer = Calm::params(5)
        .width(7)
        .epochs(2)
        .whiten(3)
        .device(Device::Cpu)
        .fit(images)
        .unwrap();
    let f = layer.features(images, Pooling::default()).unwrap();
    assert_eq!(f.dim(), (50, 5));
    assert!(f.iter().all(|v| v.is_finite()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    layer.save(&path).unwrap();
    let back = calm_gpu::Layer::from_model(Model::load(&path).unwrap(), Device::Cpu);
    assert!(back.model().whiten.is_some());
    let g = back
        .features(
            images,
            Pooling {
                grid: 2,
                encoding: calm_gpu::Encoding::Triangle,
            },
        )
        .unwrap();
    assert_eq!(g.dim(), (50, 5 * 4));
    let again = back.features(images, Pooling::default()).unwrap();
    assert_eq!(bits(again.as_slice().unwrap()), bits(f.as_slice().unwrap()));
}

/// The first `n` shipped digits of `split` with their labels, as `eval` takes them.
fn labelled(split: Split, n: usize) -> calm_gpu::eval::Labelled {
    let d: Arc<dyn calm_gpu::data::ImageSource> = Arc::new(embedded_digits(split));
    let labels = embedded_digits(split).labels.unwrap()[..n].to_vec();
    calm_gpu::eval::Labelled {
        images: Arc::new(calm_gpu::data::Subset::new(d, 0, n).unwrap()),
        labels,
    }
}

/// A 6-kernel layer of 5 x 5 whitened over 5 x 5 patches, one epoch from `init`, on the first
/// 300 training digits.
fn whitened_layer(init: calm_gpu::em::InitMethod) -> Model {
    Calm::params(6)
        .width(5)
        .pad(0)
        .epochs(1)
        .seed(3)
        .whiten(5)
        .init_method(init)
        .device(Device::Cpu)
        .fit_source(digits(300))
        .unwrap()
        .into_model()
}

/// `model`'s twin `baseline` scores, on 300 / 100 digits, exactly as the model itself does with
/// the weights `theta` (the same features, so the same probe to the bit).
fn twin_scores_as(model: &Model, baseline: calm_gpu::eval::Baseline, theta: Vec<f32>) {
    use calm_gpu::eval::{EvalConfig, evaluate};
    let (train, test) = (labelled(Split::Train, 300), labelled(Split::Test, 100));
    let cfg = EvalConfig {
        device: Device::Cpu,
        baselines: vec![baseline],
        ..EvalConfig::for_model(model)
    };
    let rows = evaluate(model, &train, &test, &cfg, &mut |_| {}).unwrap();
    let mut other = model.clone();
    other.theta = theta;
    let own = evaluate(&other, &train, &test, &cfg, &mut |_| {}).unwrap();
    assert_eq!(
        rows[1].report.final_loss.to_bits(),
        own[0].report.final_loss.to_bits(),
        "{baseline:?}: {} vs {}",
        rows[1].report.final_loss,
        own[0].report.final_loss
    );
}

/// Every twin sees the images through the model's whitening: the N(0,1) baseline of a whitened
/// model scores exactly as the model itself would with those N(0,1) weights.
#[test]
fn the_random_twin_goes_through_the_models_whitening() {
    let model = whitened_layer(calm_gpu::em::InitMethod::Normal);
    let theta = calm_gpu::em::init_theta(&model.geometry().unwrap(), model.meta.seed);
    twin_scores_as(&model, calm_gpu::eval::Baseline::Random, theta);
}

/// A layer started from k-means (`InitMethod::KMeans`) on the probe's own training images: its
/// k-means twin is where it started (the same centroids through the same whitening), and EM's
/// epoch moved it from there.
#[test]
fn the_kmeans_twin_of_a_kmeans_start_is_its_start() {
    use calm_gpu::em::{InitMethod, initial_theta};
    let model = whitened_layer(InitMethod::KMeans);
    let g = model.geometry().unwrap();
    let whitened = model.whitened(digits(300)).unwrap();
    let start = initial_theta(&g, InitMethod::KMeans, whitened.as_ref(), model.meta.seed).unwrap();
    assert_ne!(bits(&start), bits(&model.theta), "EM moved the centroids");
    twin_scores_as(&model, calm_gpu::eval::Baseline::KMeans, start);
}

/// `eval::evaluate` as a user calls it: the model's row then each baseline's, the sizes each
/// feature set must have, a progress report that opens and closes every phase, and a clear
/// error for labels that do not match their images.
#[test]
fn evaluate_scores_the_model_beside_its_baselines() {
    use calm_gpu::eval::{Baseline, EvalConfig, EvalEvent, Labelled, evaluate};
    let model_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spec-k8-w5.safetensors");
    let model = Model::load(&model_path).unwrap();
    let (train, test) = (labelled(Split::Train, 600), labelled(Split::Test, 200));
    let cfg = EvalConfig {
        device: Device::Cpu,
        baselines: vec![
            Baseline::Raw,
            Baseline::Random,
            Baseline::Patches,
            Baseline::KMeans,
        ],
        pooling: Pooling {
            grid: 2,
            ..Pooling::default()
        },
        ..EvalConfig::for_model(&model)
    };
    let mut events = Vec::new();
    let rows = evaluate(&model, &train, &test, &cfg, &mut |e| {
        events.push(match e {
            EvalEvent::FeaturesStarted { images, .. } => format!("features {images}"),
            EvalEvent::Features { .. } => "f".into(),
            EvalEvent::FeaturesFinished => "features done".into(),
            EvalEvent::ProbeStarted { set, .. } => format!("probe {set}"),
            EvalEvent::Probe(p) => format!("p{}", p.iteration),
            EvalEvent::ProbeFinished => "probe done".into(),
        })
    })
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.features.as_str()).collect();
    assert_eq!(
        names,
        [
            "calm (K=8, pool 2x2)",
            "raw pixels",
            "random kernels (K=8, seed 1)",
            "data patches (K=8, seed 1)",
            "k-means (K=8, seed 1)"
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.dims).collect::<Vec<_>>(),
        [8 * 4, 784, 8 * 4, 8 * 4, 8 * 4]
    );
    for r in &rows {
        assert!(
            r.report.test_acc > 0.2 && r.report.test_acc <= 1.0,
            "{}",
            r.report.test_acc
        );
    }
    // Two feature sets per row with features, one probe per row, each opened and closed.
    let count = |what: &str| events.iter().filter(|e| e.starts_with(what)).count();
    assert_eq!((count("features 600"), count("features 200")), (4, 4));
    assert_eq!((count("features done"), count("probe done")), (8, 5));
    let probes: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("probe ") && *e != "probe done")
        .collect();
    assert_eq!(probes.len(), 5);
    let first = events.iter().filter(|e| *e == "p1").count();
    assert_eq!(first, 5, "every probe reports its first iteration");
    // The same rows as a fit without an observer: the baselines are seeded (k-means too).
    let again = evaluate(&model, &train, &test, &cfg, &mut |_| {}).unwrap();
    for (a, b) in again.iter().zip(&rows) {
        assert_eq!(a.report, b.report, "{}", a.features);
    }

    let short = Labelled {
        labels: vec![0; 3],
        ..labelled(Split::Test, 200)
    };
    let e = evaluate(&model, &train, &short, &cfg, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("200 images but 3 labels"), "{e}");
}
