//! Deep CALM through the library: a one-layer network is today's model file, a deep fit's LL
//! never decreases in any layer, the file keeps every layer, and a fit killed in the middle of
//! any layer resumes to the same bytes.

mod common;

use std::path::Path;
use std::sync::Arc;

use calm_gpu::data::{Dataset, ImageSource, Split, embedded_digits};
use calm_gpu::em::InitMethod;
use calm_gpu::net::{NetEvent, NetParams, NetSpec, NetTrainer, Network};
use calm_gpu::{CalmParams, CancelToken, Device, Model, Trainer};

fn digits(n: usize) -> Arc<dyn ImageSource> {
    let d = embedded_digits(Split::Train);
    let images = d.images.slice(ndarray::s![..n, .., .., ..]).to_owned();
    Arc::new(Dataset::new(images, None))
}

fn base() -> CalmParams {
    CalmParams::recommended()
        .epochs(3)
        .batch(64)
        .seed(3)
        .device(Device::Cpu)
}

const SPEC: &str = "8x5p2 white5 | tri max4s2p1 norm | 12x3p1 | tri^0.5 avg2";

/// Every fixture (files written by earlier releases) loads as a network and writes back the
/// same bytes, through the network and through the model.
#[test]
fn one_layer_files_keep_their_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "spec-k8-w5.safetensors",
        "patches-revive-k12.safetensors",
        "recommended-k16.safetensors",
    ] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap();
        let net = Network::load(&path).unwrap();
        assert!(net.is_single() && net.is_complete(), "{name}");
        assert!(
            net.to_bytes().unwrap() == bytes,
            "{name} through the network"
        );
        assert!(
            Model::load(&path).unwrap().to_bytes().unwrap() == bytes,
            "{name} through the model"
        );
    }
}

/// A network of one layer fitted by the NetTrainer is the Trainer's model, byte for byte.
#[test]
fn a_one_layer_network_is_the_single_layer_fit() {
    let data = digits(300);
    let p = base().width(5).pad(1);
    let spec = NetSpec::single(p.layer);
    let net = NetParams::new(spec, p.clone()).fit(data.clone()).unwrap();
    let mut t = Trainer::new(&p, data).unwrap();
    t.run(&mut ()).unwrap();
    let model = t.model(None).unwrap();
    assert!(net.to_bytes().unwrap() == model.to_bytes().unwrap());
}

#[test]
fn a_deep_fit_keeps_every_layer_and_its_ll_never_decreases() {
    let data = digits(300);
    let spec: NetSpec = SPEC.parse().unwrap();
    let params = NetParams::new(spec.clone(), base());
    let mut starts = Vec::new();
    let mut t = NetTrainer::new(&params, data.clone()).unwrap();
    t.run(&mut |ev| {
        if let NetEvent::LayerStart {
            layer, geometry, ..
        } = ev
        {
            starts.push((*layer, geometry.c, geometry.h, geometry.w));
        }
    })
    .unwrap();
    assert_eq!(starts, [(1, 1, 28, 28), (2, 8, 14, 14)]);
    let net = t.into_network();
    assert!(net.is_complete() && !net.is_single());
    for (i, m) in net.layers.iter().enumerate() {
        let ll: Vec<f64> = m.meta.history.iter().map(|h| h.loglik).collect();
        assert!(ll.len() >= 3, "layer {}", i + 1);
        assert!(
            ll.windows(2).all(|w| w[1] >= w[0]),
            "layer {}: {ll:?}",
            i + 1
        );
        assert!(
            m.whiten.is_some() == (i == 0),
            "whitening where the spec says"
        );
    }
    assert!(net.norms[0].is_some() && net.norms[1].is_none());
    // The file round-trips, and its features are the fitted network's.
    let bytes = net.to_bytes().unwrap();
    let back = Network::from_bytes(Path::new("deep"), &bytes).unwrap();
    assert!(back.to_bytes().unwrap() == bytes);
    assert_eq!(back.spec, spec);
    let features = |n: &Network| {
        n.features(
            Device::Cpu,
            &Default::default(),
            digits(20),
            n.pooling(),
            &CancelToken::new(),
            &mut |_| {},
        )
        .unwrap()
    };
    let f = features(&net);
    assert_eq!(f.dim(), (20, 12 * 7 * 7));
    assert_eq!(f, features(&back));
    assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0));
    // A damaged file is refused: layer 2's theta dropped from the spec's shapes.
    let mut other = net.clone();
    other.spec = "8x5p2 white5 | tri max4s2p1 norm | 12x5 | tri^0.5 avg2"
        .parse()
        .unwrap();
    let e = Network::from_bytes(Path::new("bad"), &other.to_bytes().unwrap()).unwrap_err();
    assert!(e.to_string().contains("layer 2"), "{e}");
}

/// `var F` on a layer fits that layer under variance F (its prior keeps 1/F), and only it.
#[test]
fn a_layer_variance_is_that_layers_alone() {
    let spec: NetSpec = "8x5p2 | tri max4s2p1 norm | 6x3p1 var4".parse().unwrap();
    let net = NetParams::new(spec, base().epochs(2))
        .fit(digits(200))
        .unwrap();
    assert!(
        net.layers[0].prior.is_none(),
        "layer 1 keeps SPEC's variance"
    );
    let p = net.layers[1].prior.as_ref().expect("layer 2's variance");
    assert_eq!(p.inv_var, 0.25);
    let ll: Vec<f64> = net.layers[1]
        .meta
        .history
        .iter()
        .map(|h| h.loglik)
        .collect();
    assert!(ll.windows(2).all(|w| w[1] >= w[0]), "{ll:?}");
}

/// A fit cancelled in the middle of layer 1 and of layer 2, each time checkpointed and resumed
/// by a new trainer, writes the uninterrupted fit's bytes.
#[test]
fn kill_and_resume_in_any_layer_gives_the_same_network() {
    let data = digits(200);
    let params = NetParams::new(
        SPEC.parse().unwrap(),
        base().init_method(InitMethod::Patches),
    );
    let want = params.fit(data.clone()).unwrap().to_bytes().unwrap();
    for stop_layer in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let token = CancelToken::new();
        let mut t = NetTrainer::new(&params, data.clone())
            .unwrap()
            .with_cancel(token.clone());
        let mut layer = 0;
        let mut batches = 0;
        let out = t
            .run(&mut |ev| match ev {
                NetEvent::LayerStart { layer: l, .. } => layer = *l,
                NetEvent::Fit(calm_gpu::em::Event::Progress { .. }) if layer == stop_layer => {
                    batches += 1;
                    // In the middle of the second epoch.
                    if batches == 5 {
                        token.cancel();
                    }
                }
                _ => {}
            })
            .unwrap();
        assert!(out.interrupted, "layer {stop_layer}");
        t.save_checkpoint(dir.path()).unwrap();
        assert_eq!(t.layers_done(), stop_layer - 1);
        let mut t = NetTrainer::resume(&params, data.clone(), dir.path()).unwrap();
        assert!(!t.run(&mut |_| {}).unwrap().interrupted);
        assert!(
            t.into_network().to_bytes().unwrap() == want,
            "stopped in layer {stop_layer}"
        );
    }
}

/// Bad specs are refused before any work, naming the part.
#[test]
fn a_spec_that_does_not_fit_is_refused_before_any_work() {
    let params = NetParams::new("8x5 | tri max30 | 4x3".parse().unwrap(), base());
    let e = NetTrainer::new(&params, digits(10))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("part 2 `tri max30`") && e.contains("24x24"),
        "{e}"
    );
}
