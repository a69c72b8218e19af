//! `train --net` as a user meets it: a deep network trained, described, encoded and probed,
//! kill and resume in the middle of a layer, and a bad spec refused with one line naming its part.

use std::path::{Path, PathBuf};

use super::{assert_ok, calm, fails_with};

/// `n` of the shipped training digits with their labels, as float32 .npy files in `dir`.
fn digits(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let d = calm_gpu::data::embedded_digits(calm_gpu::data::Split::Train);
    let x = d.images.slice(ndarray::s![..n, .., .., ..]).to_owned();
    let y = ndarray::Array1::from(d.labels.unwrap()[..n].to_vec());
    let (px, py) = (dir.join("x.npy"), dir.join("y.npy"));
    ndarray_npy::write_npy(&px, &x).unwrap();
    ndarray_npy::write_npy(&py, &y).unwrap();
    (px, py)
}

const SPEC: &str = "8x5p2 | tri max4s2p1 norm | 12x3p1 | tri avg2";

fn train_args(data: &Path, out: &Path, epochs: &str) -> Vec<String> {
    [
        "train",
        "--backend",
        "cpu",
        "--preset",
        "recommended",
        "--batch",
        "50",
        "--epochs",
        epochs,
        "--seed",
        "3",
        "--net",
        SPEC,
        "--data",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([data.display().to_string(), "--out".into()])
    .chain([out.display().to_string()])
    .collect()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Train, info (text and JSON), features and eval with the three twins on one network; the
/// metrics name each epoch's layer; a one-layer --net is today's model file.
#[test]
fn net_trains_describes_encodes_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = digits(dir.path(), 300);
    let model = dir.path().join("net.safetensors");
    let metrics = dir.path().join("m.jsonl");
    let mut args = train_args(&x, &model, "2");
    args.extend(["--metrics".into(), s(&metrics)]);
    let out = calm().args(&args).output().unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("layer 2: K=12 w=3 p=1 on 8x14x14"),
        "{stdout}"
    );
    assert!(stdout.contains("2 layers, with a feature head"), "{stdout}");
    // Every epoch of each layer, in order, with its layer.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let layers: Vec<u64> = lines.iter().map(|j| j["layer"].as_u64().unwrap()).collect();
    assert_eq!(layers.first(), Some(&1));
    assert_eq!(layers.last(), Some(&2));
    assert!(layers.windows(2).all(|w| w[0] <= w[1]), "{layers:?}");

    let info = calm()
        .args(["info", "--model", &s(&model)])
        .output()
        .unwrap();
    assert_ok(&info);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains(&format!("network:     {SPEC}")), "{text}");
    assert!(text.contains("head 2: tri avg2 -> 12x7x7"), "{text}");
    let info = calm()
        .args(["info", "--json", "--model", &s(&model)])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(j["net"]["layers"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j["net"]["spec"], SPEC);

    let f = dir.path().join("f.npy");
    let out = calm()
        .args(["features", "--backend", "cpu", "--model", &s(&model)])
        .args(["--data", &s(&x), "--out", &s(&f)])
        .output()
        .unwrap();
    assert_ok(&out);
    let feats: ndarray::Array2<f32> = ndarray_npy::read_npy(&f).unwrap();
    assert_eq!(feats.dim(), (300, 12 * 7 * 7));
    assert!(feats.iter().all(|v| v.is_finite()));

    let out = calm()
        .args(["eval", "--backend", "cpu", "--model", &s(&model)])
        .args([
            "--train",
            &s(&x),
            "--train-labels",
            &s(&y),
            "--val-split",
            "0.2",
        ])
        .args(["--baseline", "random", "--baseline", "patches"])
        .args(["--baseline", "kmeans", "--max-iter", "50"])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for row in [
        "calm net (K=12)",
        "random kernels (K=12, seed 3) net",
        "data patches (K=12, seed 3) net",
        "k-means (K=12, seed 3) net",
    ] {
        assert!(text.contains(row), "{row}: {text}");
    }
    // Flags the head does not use are refused.
    fails_with(
        &["eval", "--model", &s(&model), "--pool", "2"],
        "head's map",
    );

    // One layer through --net is the model file of --kernels/--width/--pad.
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let one = |out: &Path, layer: &[&str]| {
        let o = calm()
            .args([
                "train",
                "--backend",
                "cpu",
                "--epochs",
                "2",
                "--batch",
                "50",
            ])
            .args(["--data", &s(&x), "--out", &s(out)])
            .args(layer)
            .output()
            .unwrap();
        assert_ok(&o);
    };
    one(&a, &["--net", "6x5p1"]);
    one(&b, &["--kernels", "6", "--width", "5", "--pad", "1"]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

/// Kill -9 in the middle of layer 2, resume from the checkpoint directory: the network file of
/// an uninterrupted run, byte for byte, and the metrics of every epoch once.
#[test]
fn killed_net_resumes_to_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = digits(dir.path(), 400);
    let straight = dir.path().join("straight.safetensors");
    assert_ok(
        &calm()
            .args(train_args(&x, &straight, "6"))
            .output()
            .unwrap(),
    );

    let resumed = dir.path().join("resumed.safetensors");
    let ckdir = dir.path().join("ck");
    let metrics = dir.path().join("m.jsonl");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(train_args(&x, &resumed, "6"))
        .args(["--checkpoint-dir", &s(&ckdir), "--metrics", &s(&metrics)])
        .env("CALM_TUNE_FILE", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for layer 2's second epoch, then kill within its third.
    let ck = ckdir.join("checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    loop {
        let m = calm_gpu::model::Model::load(&ck);
        if m.is_ok_and(|m| {
            m.extra.get("net_layer").map(String::as_str) == Some("2") && m.meta.history.len() >= 2
        }) {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 120,
            "no layer-2 checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckdir.join("network.safetensors").exists());
    // The kill may land between a checkpoint and its metrics line; make it so here: the last
    // line of layer 2 goes, and the resumed run must write it again from the checkpoint.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    if lines.last().is_some_and(|l| l.contains("\"layer\":2")) {
        lines.pop();
    }
    std::fs::write(
        &metrics,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    // A network that is not complete is refused by the commands that read features.
    fails_with(
        &[
            "features",
            "--model",
            &s(&ckdir.join("network.safetensors")),
            "--out",
            &s(&dir.path().join("f.npy")),
        ],
        "1 of its 2 layers",
    );

    let out = calm()
        .args(["train", "--resume", &s(&ckdir)])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("resuming at layer 2"));
    assert!(
        std::fs::read(&straight).unwrap() == std::fs::read(&resumed).unwrap(),
        "the resumed network's file differs"
    );
    // Each (layer, epoch) once, in order.
    let pairs: Vec<(u64, u64)> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            (j["layer"].as_u64().unwrap(), j["epoch"].as_u64().unwrap())
        })
        .collect();
    let mut sorted = pairs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(pairs, sorted, "metrics after resume");
    let net = calm_gpu::net::Network::load(&resumed).unwrap();
    for (l, m) in net.layers.iter().enumerate() {
        let want: Vec<u64> = (1..=m.meta.history.len() as u64).collect();
        let got: Vec<u64> = pairs
            .iter()
            .filter(|p| p.0 == l as u64 + 1)
            .map(|p| p.1)
            .collect();
        assert_eq!(got, want, "layer {}'s metrics", l + 1);
    }
}

/// Ctrl-C while layer 1 trains: exit 130 with one line naming the checkpoint, and the resumed
/// run writes the uninterrupted run's file.
#[test]
fn ctrl_c_in_a_net_leaves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = digits(dir.path(), 400);
    let straight = dir.path().join("straight.safetensors");
    assert_ok(
        &calm()
            .args(train_args(&x, &straight, "4"))
            .output()
            .unwrap(),
    );
    let out_path = dir.path().join("run.safetensors");
    let metrics = dir.path().join("m.jsonl");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(train_args(&x, &out_path, "4"))
        .args(["--metrics", &s(&metrics)])
        .env("CALM_TUNE_FILE", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 1 {
        assert!(t0.elapsed().as_secs() < 120, "epoch 1 never finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(!out_path.exists(), "an interrupted run wrote its network");
    let ckdir = dir.path().join("run.safetensors.checkpoint");
    assert_ok(
        &calm()
            .args(["train", "--resume", &s(&ckdir)])
            .output()
            .unwrap(),
    );
    assert!(std::fs::read(&straight).unwrap() == std::fs::read(&out_path).unwrap());
}

/// A bad spec is refused before any work, with one line naming the part that is wrong; so are
/// the options --net does not take.
#[test]
fn bad_net_specs_are_refused_naming_their_part() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = digits(dir.path(), 20);
    let out = dir.path().join("m.safetensors");
    let train = |spec: &str, needle: &str| {
        fails_with(
            &[
                "train",
                "--backend",
                "cpu",
                "--net",
                spec,
                "--data",
                &s(&x),
                "--out",
                &s(&out),
            ],
            needle,
        );
        assert!(!out.exists());
    };
    train("8x5 | fancy | 4x3", "part 2");
    train("0x5 | tri", "part 1");
    train("8x5 | tri max0", "part 2");
    // 28 - 5 + 1 = 24, pooled by 8 with stride 8 -> 3; a 5x5 kernel does not fit 3x3.
    train("8x5 | tri max8 | 4x5", "part 3");
    train("8x5 | tri max30", "part 2");
    train("8x5 | | 4x3", "part 2");
    fails_with(
        &["train", "--net", "8x5", "--kernels", "4", "--data", &s(&x)],
        "--kernels",
    );
    fails_with(
        &[
            "train",
            "--backend",
            "cpu",
            "--net",
            "8x5 | tri | 4x3",
            "--data",
            &s(&x),
            "--plot",
            &s(&dir.path().join("p.png")),
        ],
        "--metrics",
    );
}

/// `bench --net` times every layer of a network on its own input shape, a row each (the table
/// and the JSON lines name the layer), and the network's epoch; a spec that does not fit the
/// protocol's images is refused with one line naming its part.
#[test]
fn bench_times_each_layer_of_a_network() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.jsonl");
    let out = calm()
        .args([
            "bench",
            "--backend",
            "cpu",
            "--images",
            "12",
            "--epochs",
            "1",
            "--net",
            SPEC,
            "--json",
            &s(&json),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu: one epoch of every layer"), "{text}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    // Layer 1 on the digits' 1x28x28; layer 2 on its link's 8 channels of 14x14 (max 4, stride
    // 2, padding 1).
    assert_eq!(rows[0]["layer"], 1);
    assert_eq!(rows[0]["shape"], "12x1x28x28 K8 w5 p2");
    assert_eq!(rows[1]["layer"], 2);
    assert_eq!(rows[1]["shape"], "12x8x14x14 K12 w3 p1");
    assert!(
        rows.iter()
            .all(|r| r["epoch_gflops"].as_f64().unwrap() > 0.0)
    );
    fails_with(
        &["bench", "--backend", "cpu", "--net", "8x5p2 | tri max30"],
        "part 2",
    );
}
