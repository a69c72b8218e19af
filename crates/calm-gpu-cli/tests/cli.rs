//! The binary as a user meets it: help, the main job, output files, and one-line errors.

#[path = "../../calm-gpu/tests/common/mod.rs"]
mod common;
/// `train --net`: deep networks.
#[path = "cli/net.rs"]
mod net;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use ndarray::{Array3, Array4};

/// The binary, with no tuning file: a developer's own `calm-gpu tune` results must not change
/// what the tests run (the tune test names its own file).
fn calm() -> Command {
    let mut c = Command::cargo_bin("calm-gpu").unwrap();
    c.env("CALM_TUNE_FILE", "off");
    c
}

/// The command succeeded; otherwise fails with its stderr.
#[track_caller]
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_npy_f32(path: &Path, a: &Array4<f32>) {
    ndarray_npy::write_npy(path, a).unwrap();
}

fn small_data(dir: &Path) -> PathBuf {
    let d = common::random_images(1, 20, 1, 10, 10);
    let p = dir.join("x.npy");
    write_npy_f32(&p, &d.images);
    p
}

/// `train` on the CPU engine with `layer` = "K w p batch epochs seed".
fn train_argv(data: &Path, out: &Path, layer: &str) -> Vec<String> {
    let v: Vec<&str> = layer.split(' ').collect();
    let mut argv: Vec<String> = [
        "train",
        "--backend",
        "cpu",
        "--kernels",
        v[0],
        "--width",
        v[1],
        "--pad",
        v[2],
    ]
    .into_iter()
    .chain(["--batch", v[3], "--epochs", v[4], "--seed", v[5]])
    .map(String::from)
    .collect();
    argv.extend([
        "--data".into(),
        data.to_string_lossy().into(),
        "--out".into(),
        out.to_string_lossy().into(),
    ]);
    argv
}

/// Runs and expects failure with a single `error: ...` line on stderr mentioning `needle`.
#[track_caller]
fn fails_with(args: &[&str], needle: &str) {
    let out = calm().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: `{}` lacks `{needle}`",
        lines[0]
    );
}

#[test]
fn help_for_every_command() {
    for cmd in [
        vec!["--help"],
        vec!["train", "--help"],
        vec!["features", "--help"],
        vec!["validate", "--help"],
        vec!["devices", "--help"],
        vec!["bench", "--help"],
        vec!["tune", "--help"],
    ] {
        let out = calm().args(&cmd).output().unwrap();
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{cmd:?}"
        );
    }
    let out = calm().args(["train", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--backend",
        "--kernels",
        "--width",
        "--pad",
        "--batch",
        "--epochs",
        "--seed",
        "--data",
        "--out",
        "--init",
        "--metrics",
    ] {
        assert!(s.contains(opt), "train --help lacks {opt}");
    }
}

#[test]
fn train_cpu_writes_model_metrics_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("sub/m.safetensors");
    let metrics = dir.path().join("m.jsonl");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "3",
            "--width",
            "3",
            "--pad",
            "1",
            "--batch",
            "7",
            "--epochs",
            "3",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .arg("--metrics")
        .arg(&metrics)
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("epoch   3/3"), "{stdout}");
    assert!(stdout.contains("GFLOP/s"), "{stdout}");
    let m = calm_gpu::model::Model::load(&model).unwrap();
    assert_eq!(m.theta.len(), 3 * 9);
    assert_eq!(m.meta.history.len(), 3);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
        for key in ["loglik", "seconds", "gflops"] {
            assert!(l[key].is_number(), "{key} missing in {l}");
        }
        assert_eq!(l["loglik"].as_f64().unwrap(), m.meta.history[i].loglik);
    }
    let feats = dir.path().join("f.npy");
    let out = calm()
        .args(["features", "--backend", "cpu"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&feats)
        .output()
        .unwrap();
    assert_ok(&out);
    let f: ndarray::Array2<f32> = ndarray_npy::read_npy(&feats).unwrap();
    assert_eq!(f.shape(), &[20, 3]);
    assert!(f.iter().all(|v| v.is_finite()));
}

#[test]
fn same_seed_gives_identical_model_file_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let run = |name: &str| {
        let p = dir.path().join(name);
        let out = calm()
            .args([
                "train",
                "--backend",
                "cpu",
                "--kernels",
                "4",
                "--width",
                "5",
                "--pad",
                "0",
                "--epochs",
                "2",
                "--seed",
                "7",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::read(p).unwrap()
    };
    assert_eq!(run("a.safetensors"), run("b.safetensors"));
}

#[test]
fn gpu_train_and_features_match_cpu() {
    let Some(_) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let init = dir.path().join("init.npy");
    write_npy_f32(
        &init,
        &Array4::from_shape_vec((4, 1, 3, 3), common::random_theta(3, 36, 0.3)).unwrap(),
    );
    let mut thetas = Vec::new();
    for backend in ["cpu", common::backend_name()] {
        let model = dir.path().join(format!("{backend}.safetensors"));
        let out = calm()
            .args([
                "train",
                "--backend",
                backend,
                "--kernels",
                "4",
                "--width",
                "3",
                "--pad",
                "1",
                "--epochs",
                "3",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--init")
            .arg(&init)
            .arg("--out")
            .arg(&model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        thetas.push(calm_gpu::model::Model::load(&model).unwrap().theta);
    }
    let cpu: Vec<f64> = thetas[0].iter().map(|&v| v as f64).collect();
    assert!(common::rel_err(&thetas[1], &cpu) < 1e-4);
}

/// `CALM_GPU_MEMORY` (MiB) below what the data needs: the GPU engine streams the images in
/// smaller batches, says so, and still agrees with the CPU engine; a bad value is an error.
#[test]
fn gpu_streams_data_larger_than_its_memory_budget() {
    let Some(_) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 400 padded 32x32 images: 1.6 MiB of data against a 1 MiB budget.
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &common::random_images(5, 400, 1, 28, 28).images);
    let init = dir.path().join("init.npy");
    write_npy_f32(
        &init,
        &Array4::from_shape_vec((4, 1, 3, 3), common::random_theta(6, 36, 0.3)).unwrap(),
    );
    let train = |backend: &str, model: &Path| {
        let mut cmd = calm();
        cmd.env("CALM_GPU_MEMORY", "1").args([
            "train",
            "--backend",
            backend,
            "--kernels",
            "4",
            "--width",
            "3",
            "--pad",
            "2",
            "--epochs",
            "2",
        ]);
        cmd.arg("--data")
            .arg(&data)
            .arg("--init")
            .arg(&init)
            .arg("--out")
            .arg(model);
        cmd.output().unwrap()
    };
    let (cpu, gpu) = (dir.path().join("cpu.st"), dir.path().join("gpu.st"));
    assert!(train("cpu", &cpu).status.success());
    let out = train(common::backend_name(), &gpu);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ok(&out);
    assert!(stdout.contains("data streamed in batches of"), "{stdout}");
    let a = calm_gpu::model::Model::load(&cpu).unwrap().theta;
    let b = calm_gpu::model::Model::load(&gpu).unwrap().theta;
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    assert!(common::rel_err(&b, &a) < 1e-4);

    let bad = calm()
        .env("CALM_GPU_MEMORY", "lots")
        .args([
            "train",
            "--backend",
            common::backend_name(),
            "--epochs",
            "1",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("bad.st"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("CALM_GPU_MEMORY=lots"));
}

/// `--cache`: the preprocessed images are written once and read back on every epoch and by a
/// later run, giving the same model bytes as no cache; a cache of other data is refused.
#[test]
fn cache_of_preprocessed_images_is_reused_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let other = dir.path().join("other.npy");
    write_npy_f32(&other, &common::random_images(9, 20, 1, 10, 10).images);
    let cache = dir.path().join("cache.npy");
    let run = |data: &Path, out: &str, cache_on: bool| {
        let mut argv = train_argv(data, &dir.path().join(out), "3 3 1 7 2 0");
        argv.extend(["--preprocess".into(), "zca-image".into()]);
        if cache_on {
            argv.extend(["--cache".into(), cache.to_string_lossy().into()]);
        }
        calm().args(&argv).output().unwrap()
    };
    for (out, on) in [("plain.st", false), ("first.st", true), ("again.st", true)] {
        let o = run(&data, out, on);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(cache.exists());
    let bytes = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    assert_eq!(bytes("plain.st"), bytes("first.st"));
    assert_eq!(bytes("plain.st"), bytes("again.st"));
    let cached = std::fs::read(&cache).unwrap();
    let o = run(&other, "other.st", true);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds other data"), "{err}");
    assert_eq!(
        std::fs::read(&cache).unwrap(),
        cached,
        "the cache is left alone"
    );
    // A run refused for its layer, its --init or its --whiten writes no cache (those checks come
    // before the cache is written; --init and --whiten came after it).
    let bad = dir.path().join("bad_init.npy");
    ndarray_npy::write_npy(&bad, &Array4::<f32>::zeros((2, 1, 3, 3))).unwrap();
    let fresh = dir.path().join("fresh.npy");
    for extra in [
        vec!["--init".to_string(), bad.to_string_lossy().into_owned()],
        vec!["--whiten".into(), "100".into()],
        vec!["--width".into(), "100".into()],
    ] {
        let o = calm()
            .args([
                "train",
                "--backend",
                "cpu",
                "--epochs",
                "1",
                "--kernels",
                "4",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--cache")
            .arg(&fresh)
            .args(&extra)
            .arg("--out")
            .arg(dir.path().join("refused.st"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        assert!(!fresh.exists(), "{extra:?} wrote the cache");
    }
}

#[test]
fn numerical_precision_limit_keeps_last_finite_theta() {
    let dir = tempfile::tempdir().unwrap();
    // Pixels of 1e30: L overflows f32 once theta has grown to their scale.
    let x = Array4::<f32>::from_elem((4, 1, 6, 6), 1e30);
    let data = dir.path().join("big.npy");
    write_npy_f32(&data, &x);
    let model = dir.path().join("m.safetensors");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "2",
            "--width",
            "3",
            "--pad",
            "0",
            "--epochs",
            "3",
            "--seed",
            "1",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert_ok(&out);
    // Epoch 1 is finite (|L| ~ 1e31 fits f32); its update makes theta ~ 1e30, so L of epoch 2
    // overflows: training stops there and keeps epoch 1's theta.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("numerical precision limit reached at epoch 2")
    );
    let m = calm_gpu::model::Model::load(&model).unwrap();
    assert_eq!(m.meta.history.len(), 1);
    assert!(m.theta.iter().all(|v| v.is_finite()));
    assert_ne!(m.theta, calm_gpu::em::init_theta(&m.geometry().unwrap(), 1));
    assert!(m.meta.stopped.unwrap().contains("epoch 2"));
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = small_data(d);
    let p = |name: &str| d.join(name).to_string_lossy().to_string();
    let g = good.to_string_lossy().to_string();
    let out = p("out.safetensors");
    let train = |extra: &[&str]| {
        let mut v = vec!["train", "--backend", "cpu", "--out", out.as_str()];
        for (flag, value) in [("--kernels", "3"), ("--width", "3"), ("--epochs", "1")] {
            if !extra.contains(&flag) {
                v.extend([flag, value]);
            }
        }
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, needle: &str| {
        fails_with(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needle)
    };

    run(train(&["--data", &p("missing.npy")]), "missing.npy");
    std::fs::write(
        p("bad.idx"),
        [0u8, 0, 9, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4],
    )
    .unwrap();
    run(train(&["--data", &p("bad.idx")]), "bad.idx");
    std::fs::write(
        p("trunc.idx"),
        [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4, 1, 2, 3],
    )
    .unwrap();
    run(train(&["--data", &p("trunc.idx")]), "trunc.idx");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(p("trunc.npy"), &bytes[..bytes.len() - 100]).unwrap();
    run(train(&["--data", &p("trunc.npy")]), "trunc.npy");
    ndarray_npy::write_npy(p("f64.npy"), &Array3::<f64>::zeros((2, 5, 5))).unwrap();
    run(train(&["--data", &p("f64.npy")]), "f64.npy");
    ndarray_npy::write_npy(p("rank2.npy"), &ndarray::Array2::<f32>::zeros((2, 5))).unwrap();
    run(train(&["--data", &p("rank2.npy")]), "rank2.npy");
    for (name, v) in [("nan.npy", f32::NAN), ("inf.npy", f32::INFINITY)] {
        let mut x = Array4::<f32>::zeros((3, 1, 5, 5));
        x[[1, 0, 2, 2]] = v;
        write_npy_f32(&d.join(name), &x);
        run(train(&["--data", &p(name)]), name);
    }
    run(
        train(&["--data", &g, "--width", "15", "--pad", "2"]),
        "does not fit",
    );
    run(train(&["--data", &g, "--kernels", "0"]), "kernels");
    run(train(&["--data", &g, "--batch", "0"]), "batch");
    run(train(&["--data", &g, "--epochs", "0"]), "epochs");
    write_npy_f32(&d.join("init.npy"), &Array4::zeros((5, 1, 3, 3)));
    run(train(&["--data", &g, "--init", &p("init.npy")]), "shape");
    std::fs::write(&out, b"precious").unwrap();
    run(train(&["--data", &g]), "--force");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"precious",
        "an existing file was touched"
    );
    fails_with(
        &[
            "features",
            "--model",
            &p("nomodel.safetensors"),
            "--out",
            &p("f.npy"),
        ],
        "nomodel",
    );
    fails_with(
        &[
            "train",
            "--backend",
            "metal",
            "--width",
            "3",
            "--data",
            &g,
            "--out",
            &p("x.safetensors"),
        ],
        "metal",
    );
}

/// Kill -9 during an epoch, resume from the checkpoint, and get the same model file, byte for
/// byte, as a run that was never interrupted (CPU engine).
#[test]
fn killed_run_resumes_to_the_same_model() {
    killed_run_resumes(&[]);
}

/// The same with mixing weights and variance learned and whitened images: the checkpoint
/// carries the prior and the whitening filter.
#[test]
fn killed_run_with_learned_prior_resumes_to_the_same_model() {
    killed_run_resumes(&[
        "--learn-weights",
        "--learn-variance",
        "--init-method",
        "patches",
        "--whiten",
        "5",
    ]);
}

fn killed_run_resumes(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = common::random_images(5, 400, 1, 28, 28);
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &d.images);
    let args = |out: &Path| {
        let mut a = train_argv(&data, out, "16 9 1 50 6 3");
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let straight = dir.path().join("straight.safetensors");
    assert!(
        calm()
            .args(args(&straight))
            .output()
            .unwrap()
            .status
            .success()
    );

    let resumed = dir.path().join("resumed.safetensors");
    let ckdir = dir.path().join("ck");
    let metrics = dir.path().join("m.jsonl");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(args(&resumed))
        .arg("--checkpoint-dir")
        .arg(&ckdir)
        .arg("--metrics")
        .arg(&metrics)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the second epoch's checkpoint, then a little into epoch 3, and kill.
    let ck = ckdir.join("checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    loop {
        if calm_gpu::model::Model::load(&ck).is_ok_and(|m| m.meta.history.len() >= 2) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.exists() || calm_gpu::model::Model::load(&resumed).is_ok());

    let out = calm()
        .arg("train")
        .arg("--resume")
        .arg(&ckdir)
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("resuming at epoch"));
    let (a, b) = (
        calm_gpu::model::Model::load(&straight).unwrap(),
        calm_gpu::model::Model::load(&resumed).unwrap(),
    );
    assert_eq!(a.meta, b.meta, "resumed model's metadata differs");
    assert_eq!(a.prior, b.prior, "resumed model's prior differs");
    assert_eq!(a.theta, b.theta, "resumed model's theta differs");
    assert!(
        std::fs::read(&straight).unwrap() == std::fs::read(&resumed).unwrap(),
        "resumed model's file differs: counts {:?} vs {:?}, extra {:?} vs {:?}",
        a.counts,
        b.counts,
        a.extra,
        b.extra
    );
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let epochs: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, vec![1, 2, 3, 4, 5, 6], "metrics after resume");
    let m = calm_gpu::model::Model::load(&resumed).unwrap();
    assert_eq!(m.prior.is_some(), !extra.is_empty(), "{:?}", m.prior);
    assert_eq!(m.whiten.is_some(), !extra.is_empty());
}

#[test]
fn show_info_and_plot_write_readable_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("m.safetensors");
    let plot = dir.path().join("pics/ll.png");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "5",
            "--width",
            "4",
            "--pad",
            "0",
            "--epochs",
            "2",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    assert_ok(&out);
    let img = image::open(&plot).unwrap();
    assert_eq!((img.width(), img.height()), (800, 500));
    let grid = dir.path().join("k.png");
    let out = calm()
        .args(["show", "--per-row", "4", "--scale", "3"])
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&grid)
        .output()
        .unwrap();
    assert_ok(&out);
    let img = image::open(&grid).unwrap();
    // 5 kernels, 4 per row: 4 columns x 2 rows of 4*3 px tiles with 1 px borders.
    let (w, h) = calm_gpu::viz::kernel_grid_size(5, 4, 4, 3);
    assert_eq!((img.width(), img.height()), (w, h));
    assert_eq!((w, h), (4 * 13 + 1, 2 * 13 + 1));
    // An existing PNG is refused without --force.
    fails_with(
        &[
            "show",
            "--model",
            &model.to_string_lossy(),
            "--out",
            &grid.to_string_lossy(),
        ],
        "--force",
    );
    let out = calm()
        .arg("info")
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "K=5",
        "epoch   2",
        "unused kernels (count < 1)",
        "preprocess",
    ] {
        assert!(s.contains(needle), "info lacks {needle}: {s}");
    }
    let out = calm()
        .args(["info", "--json", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = calm_gpu::model::Model::load(&model).unwrap();
    let usage = calm_gpu::model::kernel_use(&m.theta, &m.counts);
    assert_eq!(j["layer"]["kernels"], 5);
    assert_eq!(j["kernels_unused"], usage.unused);
    assert_eq!(j["kernels_distinct"], usage.distinct);
    assert_eq!(j["history"].as_array().unwrap().len(), 2);
    // A reader that closes the pipe early (`calm-gpu info | head`): no panic from println!.
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .arg("info")
        .arg("--model")
        .arg(&model)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// Ctrl-C (SIGINT) during an epoch: the run stops after the current batch, exits 130 with a
/// one-line message naming the checkpoint, and resuming gives the uninterrupted run's model.
#[test]
fn ctrl_c_leaves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = common::random_images(6, 600, 1, 28, 28);
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &d.images);
    // About 0.15 s per epoch here: long enough to be interrupted inside epoch 2.
    let args = |out: &Path| train_argv(&data, out, "64 20 2 50 4 5");
    let straight = dir.path().join("straight.safetensors");
    assert!(
        calm()
            .args(args(&straight))
            .output()
            .unwrap()
            .status
            .success()
    );
    let out_path = dir.path().join("run.safetensors");
    let metrics = dir.path().join("m.jsonl");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(args(&out_path))
        .arg("--metrics")
        .arg(&metrics)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for epoch 1 to finish (its metrics line), then interrupt during epoch 2.
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 1 {
        assert!(t0.elapsed().as_secs() < 120, "epoch 1 never finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(
        !out_path.exists(),
        "an interrupted run must not write its final model"
    );
    let ckdir = dir.path().join("run.safetensors.checkpoint");
    let out = calm()
        .arg("train")
        .arg("--resume")
        .arg(&ckdir)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        std::fs::read(&straight).unwrap(),
        std::fs::read(&out_path).unwrap()
    );
}

#[test]
fn preset_recommended_trains_from_patches_and_pools_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let d = common::random_images(8, 40, 1, 10, 10);
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &d.images);
    let labels = dir.path().join("y.npy");
    ndarray_npy::write_npy(
        &labels,
        &ndarray::Array1::from_iter((0..40u8).map(|i| i % 3)),
    )
    .unwrap();
    let model = dir.path().join("m.safetensors");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "4",
            "--width",
            "3",
            "--pad",
            "1",
            "--epochs",
            "2",
            "--preset",
            "recommended",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert_ok(&out);
    let m = calm_gpu::model::Model::load(&model).unwrap();
    let opts = m.meta.options.unwrap();
    assert_eq!(opts["init_method"], "patches");
    assert_eq!(opts["whiten"], 7);
    assert_eq!(opts["schedule"]["revive"], true);
    assert_eq!(m.whiten.as_ref().map(|w| w.width), Some(7));
    // Without explicit values the preset's layer: K 128 of 8 x 8, no padding.
    let model2 = dir.path().join("m2.safetensors");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--epochs",
            "1",
            "--preset",
            "recommended",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&model2)
        .output()
        .unwrap();
    assert_ok(&out);
    let l = calm_gpu::model::Model::load(&model2).unwrap().meta.layer;
    assert_eq!((l.kernels, l.width, l.pad), (128, 8, 0));
    let json = dir.path().join("e.json");
    let out = calm()
        .args([
            "eval",
            "--backend",
            "cpu",
            "--preset",
            "recommended",
            "--val-split",
            "0.25",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--train")
        .arg(&data)
        .arg("--train-labels")
        .arg(&labels)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_ok(&out);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["pool"], 4);
    assert_eq!(j["encode"], "triangle");
    assert_eq!(j["held_out"], "validation");
    assert_eq!(j["results"][0]["dims"], 4 * 16);
    fails_with(
        &[
            "train",
            "--protocol",
            "paper",
            "--init-method",
            "patches",
            "--data",
            &data.to_string_lossy(),
            "--out",
            &dir.path().join("z.safetensors").to_string_lossy(),
            "--width",
            "3",
        ],
        "protocol paper",
    );
    fails_with(
        &[
            "train",
            "--protocol",
            "paper",
            "--learn-variance",
            "--whiten",
            "3",
            "--data",
            &data.to_string_lossy(),
            "--out",
            &dir.path().join("z.safetensors").to_string_lossy(),
            "--width",
            "3",
        ],
        "--learn-variance",
    );
    // The preset starts from patches; an explicit `--init-method normal` beside it is refused, not
    // silently replaced (it was, while the option's default could not be told from its absence).
    fails_with(
        &[
            "train",
            "--preset",
            "recommended",
            "--init-method",
            "normal",
            "--data",
            &data.to_string_lossy(),
            "--out",
            &dir.path().join("z.safetensors").to_string_lossy(),
        ],
        "drop --init-method normal",
    );
}

/// `train --variance F` trains with that variance kept fixed and says so, and the model keeps
/// it; a value that is not a positive number, and the paper's protocol, are refused naming the
/// flag.
#[test]
fn a_fixed_variance_is_kept_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("v.safetensors");
    let mut argv = train_argv(&data, &model, "3 3 1 7 2 0");
    argv.extend(["--variance".into(), "0.5".into()]);
    let out = calm().args(&argv).output().unwrap();
    assert_ok(&out);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("fixed variance 0.500000"), "{said}");
    let prior = calm_gpu::model::Model::load(&model).unwrap().prior.unwrap();
    assert_eq!(prior.inv_var, 2.0);
    let (d, z) = (data.to_string_lossy(), dir.path().join("z.safetensors"));
    let z = z.to_string_lossy();
    for bad in ["0", "-1", "nan", "inf"] {
        fails_with(
            &[
                "train",
                "--backend",
                "cpu",
                "--data",
                &d,
                "--out",
                &z,
                "--width",
                "3",
                "--variance",
                bad,
            ],
            "--variance must be a positive number",
        );
    }
    fails_with(
        &[
            "train",
            "--protocol",
            "paper",
            "--variance",
            "2",
            "--data",
            &d,
            "--out",
            &z,
            "--width",
            "3",
        ],
        "--variance",
    );
}

/// `train --whiten W` fits the filter on the training images, keeps it in the model, trains on
/// whitened images, and `features` whitens new data with it: the features equal those of the
/// model's layer on the whitened images computed through the library.
#[test]
fn whitened_model_whitens_the_data_it_encodes() {
    use calm_gpu::data::{ImageSource, Whitened};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("w.safetensors");
    let mut argv = train_argv(&data, &model, "3 3 1 7 2 0");
    argv.extend(["--whiten".into(), "3".into()]);
    let out = calm().args(&argv).output().unwrap();
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("patch-whitening"));
    let m = calm_gpu::model::Model::load(&model).unwrap();
    let wh = m
        .whiten
        .clone()
        .expect("the model keeps its whitening filter");
    assert_eq!((wh.channels, wh.width), (1, 3));

    let feats = dir.path().join("f.npy");
    let out = calm()
        .args(["features", "--backend", "cpu", "--pool", "2"])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&feats)
        .output()
        .unwrap();
    assert_ok(&out);
    let got: ndarray::Array2<f32> = ndarray_npy::read_npy(&feats).unwrap();
    let g = m.geometry().unwrap();
    let features = |src: Arc<dyn ImageSource>| {
        calm_gpu::run::features(
            calm_gpu::Device::Cpu,
            g,
            src,
            &m.theta,
            &m.prior_or_uniform(),
            7,
            calm_gpu::features::Pooling {
                grid: 2,
                encoding: calm_gpu::features::Encoding::Lse,
            },
            &Default::default(),
            &Default::default(),
            &mut |_| {},
        )
        .unwrap()
    };
    let d = common::random_images(1, 20, 1, 10, 10);
    let want = features(Arc::new(Whitened::new(d.clone(), Arc::new(wh)).unwrap()));
    assert_eq!(got, want);
    // Unwhitened data would give other features.
    let plain = features(Arc::new(d));
    assert_ne!(got, plain);
}

/// Revival after the last epoch runs settling epochs, which the epoch lines label as such
/// (not "epoch 2/1"), and the model's history records them.
#[test]
fn settling_epochs_are_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("m.safetensors");
    // N(0,1) weights on 16 kernels: after one epoch most are unused, so revival settles.
    let out = calm()
        .args(train_argv(&data, &model, "16 3 1 10 1 0"))
        .arg("--revive")
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("epoch   1/1 "), "{stdout}");
    assert!(stdout.contains("one more epoch trains them"), "{stdout}");
    assert!(stdout.contains("epoch   2 settling "), "{stdout}");
    assert!(!stdout.contains("epoch   2/1"), "{stdout}");
    let m = calm_gpu::model::Model::load(&model).unwrap();
    assert!(m.meta.history.len() >= 2, "{:?}", m.meta.history);
}

/// On a headless machine without XDG_RUNTIME_DIR, Mesa's Wayland probe prints "error:
/// XDG_RUNTIME_DIR is invalid or not set" while adapters are enumerated; calm-gpu gives it a
/// private runtime directory so that no such line reaches the user (main.rs).
#[cfg(target_os = "linux")]
#[test]
fn no_runtime_dir_error_on_a_headless_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let out = calm()
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .env("TMPDIR", tmp.path())
        .arg("devices")
        .output()
        .unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

/// `tune` checks each candidate against the CPU reference, times the ones that pass beside the
/// built-in choice, and keeps a choice only where it beats the built-in one; later engines run a
/// kept choice (until CALM_KERNELS or a new build says otherwise); a candidate the adapter cannot
/// run is reported, not chosen; a broken tuning file stops `tune`, not the other commands.
// About 190 lines, one piece: its steps share one tuning file and build on each other (an entry
// is written, read back by the next command, then made stale and broken in turn).
#[test]
fn tune_checks_times_and_keeps_only_a_faster_choice() {
    let Some(ctx) = common::gpu() else {
        return;
    };
    let backend = common::backend_name();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache").join("tuned.json");
    let jsonl = dir.path().join("tune.jsonl");
    let run = |args: &[&str]| {
        calm()
            .env("CALM_TUNE_FILE", &file)
            .env_remove("CALM_TILES")
            .env_remove("CALM_KERNELS")
            .args(args)
            .output()
            .unwrap()
    };
    let staged = "staged:e=8x4x16@16,m=4x4x16@16";
    let candidates = [
        "uniform:u=4x4",
        staged,
        // 2 x 32 x (256 + 64) x 4 bytes of workgroup memory: more than any adapter allows.
        "staged:e=8x8x32@32d,m=4x4x16@16",
    ];
    let mut argv = vec![
        "tune",
        "--backend",
        &backend,
        "--images",
        "6",
        "--epochs",
        "1",
        "--json",
        jsonl.to_str().unwrap(),
        "--force",
    ];
    for c in candidates {
        argv.extend(["--candidate", c]);
    }
    let out = run(&argv);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The built-in choice is timed first, whether or not it is among the candidates.
    assert_eq!(lines[0]["builtin"], true, "{stdout}");
    let line = |c: &str| {
        lines
            .iter()
            .find(|l| l["choice"] == c)
            .unwrap_or_else(|| panic!("{c} not tried: {stdout}"))
    };
    for c in &candidates[..2] {
        assert_eq!(line(c)["status"], "ok", "{stdout}");
        // Every timed run started from the same theta: the same first LL up to rounding.
        let ll = |l: &serde_json::Value| l["row"]["first_loglik"].as_f64().unwrap();
        let (a, b) = (ll(line(c)), ll(&lines[0]));
        assert!((a - b).abs() <= 1e-4 * b.abs() + 6e-3, "{a} vs {b}");
    }
    let big = line(candidates[2])["status"].as_str().unwrap();
    assert!(
        big.starts_with("not run") && big.contains("workgroup memory"),
        "{big}"
    );
    // Kept only if it beats the built-in choice by the margin.
    let ms = |l: &serde_json::Value| l["row"]["epoch_s"].as_f64().unwrap();
    let best = lines
        .iter()
        .filter(|l| l["status"] == "ok")
        .min_by(|a, b| ms(a).total_cmp(&ms(b)))
        .unwrap();
    let kept = best["builtin"] != true && ms(best) < ms(&lines[0]) * 0.97;
    let entries = |f: &std::path::Path| -> Vec<serde_json::Value> {
        match std::fs::read(f) {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).unwrap()["entries"]
                .as_array()
                .unwrap()
                .clone(),
            Err(_) => Vec::new(),
        }
    };
    if kept {
        assert_eq!(entries(&file).len(), 1, "{stdout}");
        assert_eq!(entries(&file)[0]["choice"], best["choice"], "{stdout}");
    } else {
        assert!(entries(&file).is_empty(), "{stdout}");
        assert!(stdout.contains("the built-in choice stays"), "{stdout}");
    }

    // A kept choice: later engines for this adapter and shape run it, and say so.
    let choice = calm_gpu::gpu::tune::Choice::parse(staged).unwrap();
    let entry = |code: String| calm_gpu::gpu::tune::Entry {
        adapter: calm_gpu::gpu::tune::AdapterKey::of(&ctx.info),
        shape: "1x28x28 K64 w20 p2".into(),
        choice: staged.into(),
        code,
        epoch_ms: 1.0,
        gflops: 1.0,
        builtin: "uniform:u=4x4".into(),
        builtin_epoch_ms: Some(2.0),
        images: 6,
        measured_at: 0,
    };
    calm_gpu::gpu::tune::store(&file, entry(choice.code_hash(64))).unwrap();
    let bench_json = dir.path().join("bench.jsonl");
    let bench = [
        "bench",
        "--backend",
        backend,
        "--images",
        "3",
        "--epochs",
        "1",
        "--json",
        bench_json.to_str().unwrap(),
        "--force",
    ];
    let out = run(&bench);
    assert_ok(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(&format!("kernels: {staged} (tuned")), "{s}");
    let row: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&bench_json).unwrap().trim()).unwrap();
    assert_eq!(row["tiles"], "e=8x4x16@16,m=4x4x16@16");
    // CALM_KERNELS still decides where set.
    let out = calm()
        .env("CALM_TUNE_FILE", &file)
        .env("CALM_KERNELS", "direct")
        .args(bench)
        .output()
        .unwrap();
    assert_ok(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("kernels: direct (CALM_TILES / CALM_KERNELS)"),
        "{s}"
    );

    // Tuning again, where the built-in choice wins, removes the kept entry.
    if !kept {
        let out = run(&argv);
        assert_ok(&out);
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("the earlier entry"), "{s}");
        assert!(entries(&file).is_empty());
    }

    // An entry whose kernels are not this build's is ignored, and said to be.
    calm_gpu::gpu::tune::store(&file, entry("0000000000000000".into())).unwrap();
    let out = run(&bench);
    assert_ok(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("(built-in;") && s.contains("another build"),
        "{s}"
    );

    // A file that is not a tuning file: other commands say they ignore it; tune stops with one
    // line, and leaves it as it was.
    std::fs::write(&file, "{ not json").unwrap();
    let out = run(&bench);
    assert_ok(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("ignored"), "{s}");
    let out = run(&argv);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: tuning file"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{ not json");

    // A sweep past its time limit starts no further candidate and still decides: the built-in
    // choice alone was timed, so it stays.
    std::fs::remove_file(&file).unwrap();
    let mut limited = argv.clone();
    limited.extend(["--time-limit", "0"]);
    let out = run(&limited);
    assert_ok(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("time limit of 0 s reached") && s.contains("the built-in choice stays"),
        "{s}"
    );
    let rows = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(rows.lines().count(), 1, "{rows}");
    assert!(entries(&file).is_empty());
}

#[test]
fn tune_refuses_bad_candidates_and_the_cpu() {
    fails_with(&["tune", "--backend", "cpu"], "tune times the GPU kernels");
    fails_with(
        &["tune", "--backend", "vulkan", "--candidate", "staged"],
        "need their tiles",
    );
    fails_with(
        &[
            "tune",
            "--backend",
            "vulkan",
            "--candidate",
            "staged:e=7x8x16",
        ],
        "kernel choice `staged:e=7x8x16`",
    );
    fails_with(
        &["tune", "--backend", "vulkan", "--time-limit", "-1"],
        "--time-limit",
    );
}

/// What a review of the CLI found (2026-11-29): each output is checked before any work, no run
/// writes one file twice or over its own input, a finished checkpoint resumes to its model,
/// impossible sizes are errors rather than aborts, a damaged model is refused.
// About 390 lines: a list of refusals, each a few lines and independent of the others, sharing
// one directory, one data file and the models trained on the way; a candidate to split by
// command (train, resume, eval, bench) the next time it grows.
#[test]
fn outputs_are_checked_before_work_and_never_overwrite_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = small_data(d);
    let data_bytes = std::fs::read(&data).unwrap();
    let p = |name: &str| d.join(name).to_string_lossy().to_string();
    let x = data.to_string_lossy().to_string();
    // `train` on the CPU engine, K 3, w 3, p 0, 2 epochs, with `extra` options.
    let train = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut v = train_argv(&data, Path::new(out), "3 3 0 1000 2 0");
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let fails = |args: Vec<String>, needle: &str| {
        fails_with(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needle)
    };

    // An existing --plot is refused before training: the model is not written either.
    std::fs::write(p("ll.png"), b"precious").unwrap();
    fails(
        train(&p("a.safetensors"), &["--plot", &p("ll.png")]),
        "--force",
    );
    assert!(!d.join("a.safetensors").exists());
    assert_eq!(std::fs::read(p("ll.png")).unwrap(), b"precious");
    // A directory that is a file.
    fails(
        train(&p("a.safetensors"), &["--plot", &p("ll.png/x.png")]),
        "not a directory",
    );
    // One file for two outputs, or an output over an input, even with --force.
    fails(
        train(
            &p("a.safetensors"),
            &["--plot", &p("a.safetensors"), "--force"],
        ),
        "two outputs",
    );
    fails(train(&x, &["--force"]), "input of this run");
    assert_eq!(std::fs::read(&data).unwrap(), data_bytes);

    // Spellings of one file that does not exist yet, in a directory that does not either.
    fails(
        train(
            &p("nd/a.safetensors"),
            &["--plot", &p("nd/../nd/./a.safetensors")],
        ),
        "two outputs",
    );
    // The checkpoint directory is no output file's name, and its checkpoint no other output.
    fails(
        train(
            &p("o.safetensors"),
            &["--checkpoint-dir", &p("o.safetensors")],
        ),
        "two outputs",
    );
    fails(
        train(
            &p("o.safetensors"),
            &[
                "--checkpoint-dir",
                &p("cd"),
                "--metrics",
                &p("cd/checkpoint.safetensors"),
            ],
        ),
        "two outputs",
    );
    // The cache's key file is an input.
    fails(
        train(&p("c.npy.json"), &["--cache", &p("c.npy"), "--force"]),
        "input of this run",
    );
    assert!(!d.join("c.npy").exists() && !d.join("o.safetensors").exists());

    // A run with a checkpoint directory; a second run does not replace its checkpoint.
    let model = p("m.safetensors");
    assert_ok(
        &calm()
            .args(train(&model, &["--checkpoint-dir", &p("ck")]))
            .output()
            .unwrap(),
    );
    fails(
        train(&p("b.safetensors"), &["--checkpoint-dir", &p("ck")]),
        "--resume",
    );
    // Resuming the finished run writes its model again, byte for byte (counts included).
    let first = std::fs::read(&model).unwrap();
    std::fs::remove_file(&model).unwrap();
    assert_ok(
        &calm()
            .args(["train", "--resume", &p("ck")])
            .output()
            .unwrap(),
    );
    assert_eq!(std::fs::read(&model).unwrap(), first);
    // --force applies on resume; training options that differ from the checkpoint's are
    // refused there (issue 19 made equal ones, the original command line, accepted: the refusal
    // now names the option instead of clap's "cannot be used with").
    fails_with(&["train", "--resume", &p("ck")], "--force");
    assert_ok(
        &calm()
            .args(["train", "--resume", &p("ck"), "--force", "--quiet"])
            .output()
            .unwrap(),
    );
    fails_with(
        &["train", "--resume", &p("ck"), "--epochs", "5"],
        "--epochs 5 differs from the checkpoint's",
    );
    // The backend may change on resume (a GPU run finishing on the CPU).
    assert_ok(
        &calm()
            .args(["train", "--resume", &p("ck"), "--backend", "cpu", "--force"])
            .output()
            .unwrap(),
    );
    assert_eq!(std::fs::read(&model).unwrap(), first);
    // Honoured, not ignored: metal is not there on Linux.
    #[cfg(target_os = "linux")]
    fails_with(
        &[
            "train",
            "--resume",
            &p("ck"),
            "--backend",
            "metal",
            "--force",
        ],
        "metal",
    );
    // A missing argument names it.
    fails_with(&["features", "--model", &model], "--out <FILE>");

    fails_with(
        &["features", "--model", &model, "--out", &model, "--force"],
        "input of this run",
    );
    fails_with(
        &["eval", "--model", &model, "--json", &model, "--force"],
        "input of this run",
    );
    fails_with(
        &[
            "show",
            "--model",
            &model,
            "--out",
            &p("s.png"),
            "--plot",
            &p("s.png"),
            "--force",
        ],
        "two outputs",
    );
    assert_eq!(std::fs::read(&model).unwrap(), first);

    // Sizes no machine can hold: one-line errors, not allocation aborts.
    fails_with(
        &[
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "99999999999",
            "--data",
            &x,
            "--out",
            &p("c.safetensors"),
        ],
        "too large",
    );
    fails_with(
        &["bench", "--backend", "cpu", "--images", "99999999999"],
        "fewer --images",
    );
    // bench --json: an existing file is refused before the benchmark runs.
    std::fs::write(p("b.json"), b"precious").unwrap();
    fails_with(
        &[
            "bench",
            "--backend",
            "cpu",
            "--images",
            "2",
            "--json",
            &p("b.json"),
        ],
        "--force",
    );
    assert_eq!(std::fs::read(p("b.json")).unwrap(), b"precious");

    // A model whose weights hold NaN is damaged: refused by every reader.
    let mut m = calm_gpu::model::Model::load(std::path::Path::new(&model)).unwrap();
    m.theta[4] = f32::NAN;
    m.save(&d.join("nan.safetensors"), false).unwrap();
    fails_with(&["info", "--model", &p("nan.safetensors")], "damaged");
    fails_with(
        &[
            "features",
            "--model",
            &p("nan.safetensors"),
            "--data",
            &x,
            "--out",
            &p("f.npy"),
        ],
        "damaged",
    );

    // Metadata no run could write (K 0): damaged, not "--kernels must be at least 1".
    let mut m0 = calm_gpu::model::Model::load(std::path::Path::new(&model)).unwrap();
    m0.meta.layer.kernels = 0;
    m0.theta.clear();
    m0.counts.clear();
    m0.save(&d.join("k0.safetensors"), false).unwrap();
    fails_with(
        &["info", "--model", &p("k0.safetensors")],
        "no possible layer",
    );

    // Numbers: a negative one is named as such, zero is refused where it used to mean 1.
    fails(
        train_argv(&data, Path::new(&p("n.safetensors")), "3 3 0 1000 2 -1"),
        "invalid value '-1'",
    );
    fails_with(
        &[
            "features",
            "--model",
            &model,
            "--out",
            &p("f.npy"),
            "--data",
            &x,
            "--pool",
            "0",
        ],
        "--pool",
    );
    fails_with(
        &[
            "show",
            "--model",
            &model,
            "--out",
            &p("k.png"),
            "--per-row",
            "0",
        ],
        "--per-row",
    );
    fails_with(
        &["eval", "--model", &model, "--max-iter", "0"],
        "--max-iter",
    );
    // Before any data is read (the probe itself refused it only after the features).
    for c in ["0", "-1", "NaN", "inf"] {
        fails_with(
            &[
                "eval",
                "--model",
                &model,
                "--c",
                c,
                "--train",
                &p("missing.npy"),
            ],
            "--c must be a positive finite number",
        );
    }
    fails_with(&["bench", "--backend", "cpu", "--batch", "0"], "--batch");
    // Train and test images of different shapes.
    let other = d.join("other.npy");
    write_npy_f32(&other, &Array4::<f32>::zeros((4, 1, 12, 12)));
    ndarray_npy::write_npy(p("y4.npy"), &ndarray::Array1::<u8>::zeros(4)).unwrap();
    ndarray_npy::write_npy(p("y20.npy"), &ndarray::Array1::<u8>::zeros(20)).unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--train",
            &x,
            "--train-labels",
            &p("y20.npy"),
            "--test",
            &p("other.npy"),
            "--test-labels",
            &p("y4.npy"),
            "--baseline",
            "raw",
        ],
        "one shape",
    );
    // One set given, the other left to the shipped 28 x 28 digits: 10 x 10 images cannot be
    // their kind, so the probe is refused rather than fitted on one and tested on the other.
    // (The model divides by 255 like the digits; a model of unscaled data is refused earlier.)
    let scaled = p("scaled.safetensors");
    let mut argv = train_argv(&data, Path::new(&scaled), "3 3 0 1000 1 0");
    argv.extend(["--preprocess".into(), "scale".into()]);
    assert_ok(&calm().args(&argv).output().unwrap());
    fails_with(
        &[
            "eval",
            "--model",
            &scaled,
            "--train",
            &x,
            "--train-labels",
            &p("y20.npy"),
        ],
        "give --test too",
    );
    fails_with(
        &[
            "eval",
            "--model",
            &scaled,
            "--test",
            &x,
            "--test-labels",
            &p("y20.npy"),
        ],
        "give --train too",
    );
    fails_with(
        &[
            "eval",
            "--model",
            &scaled,
            "--test",
            &x,
            "--test-labels",
            &p("y20.npy"),
            "--val-split",
            "0.5",
        ],
        "--test is not used",
    );

    // A pipe is written to, not refused as existing or replaced.
    #[cfg(target_os = "linux")]
    {
        let out = calm()
            .args([
                "bench",
                "--backend",
                "cpu",
                "--images",
                "2",
                "--epochs",
                "1",
            ])
            .args(["--json", "/dev/stdout"])
            .output()
            .unwrap();
        assert_ok(&out);
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"epoch_gflops\""));
    }
    // --init over --out refines a model in place.
    assert_ok(
        &calm()
            .args(train(&model, &["--init", &model, "--force"]))
            .output()
            .unwrap(),
    );

    // stdout that cannot be written: one line and exit 1, no panic.
    #[cfg(target_os = "linux")]
    {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
            .env("CALM_TUNE_FILE", "off")
            .args(["info", "--model", &model])
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.trim()
                .starts_with("error: cannot write to standard output"),
            "{err}"
        );
    }
}

/// The shipped digits as the four MNIST IDX files in `dir/mnist`, for `reproduce mnist`.
fn digits_as_mnist(dir: &Path) -> PathBuf {
    let data = dir.join("mnist");
    std::fs::create_dir(&data).unwrap();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
    for (from, to) in [
        (
            "digits-train-images-idx3-ubyte.gz",
            "train-images-idx3-ubyte.gz",
        ),
        (
            "digits-train-labels-idx1-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
        ),
        (
            "digits-test-images-idx3-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
        ),
        (
            "digits-test-labels-idx1-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ),
    ] {
        std::fs::copy(assets.join(from), data.join(to)).unwrap();
    }
    data
}

/// `reproduce` refuses an out-dir holding earlier results, and unreadable label files, before
/// it trains.
#[test]
fn reproduce_checks_its_outputs_and_labels_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits_as_mnist(dir.path());
    let out = dir.path().join("r");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("results.md"), b"precious").unwrap();
    let args = |out: &Path| {
        vec![
            "reproduce".to_string(),
            "mnist".into(),
            "--backend".into(),
            "cpu".into(),
            "--epochs".into(),
            "1".into(),
            "--data-dir".into(),
            data.to_string_lossy().into(),
            "--out-dir".into(),
            out.to_string_lossy().into(),
        ]
    };
    let a = args(&out);
    fails_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), "--force");
    assert_eq!(std::fs::read(out.join("results.md")).unwrap(), b"precious");
    assert!(!out.join("model.safetensors").exists());
    // One label too few for the training images: refused before training, and no out-dir.
    let train_labels = data.join("train-labels-idx1-ubyte.gz");
    let good = std::fs::read(&train_labels).unwrap();
    let mut y = calm_gpu::data::load_labels(&train_labels).unwrap();
    y.pop();
    let raw = data.join("train-labels-idx1-ubyte");
    let mut idx = vec![0u8, 0, 8, 1];
    idx.extend((y.len() as u32).to_be_bytes());
    idx.extend(&y);
    std::fs::remove_file(&train_labels).unwrap();
    std::fs::write(&raw, idx).unwrap();
    let fresh = dir.path().join("r1");
    let a = args(&fresh);
    fails_with(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "images but",
    );
    assert!(!fresh.exists());
    std::fs::remove_file(&raw).unwrap();
    std::fs::write(&train_labels, good).unwrap();
    // A truncated test-label file: refused before training.
    let labels = data.join("t10k-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&labels).unwrap();
    std::fs::write(&labels, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = dir.path().join("r2");
    let a = args(&fresh);
    fails_with(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "t10k-labels",
    );
    assert!(!fresh.join("model.safetensors").exists());
    // --epochs 0: refused before the out-dir is made.
    let fresh = dir.path().join("r3").join("deep");
    let mut a = args(&fresh);
    a[5] = "0".into();
    fails_with(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "--epochs",
    );
    assert!(!dir.path().join("r3").exists());
}

/// Findings of an adversarial review (2026-11-29), each a one-line error before any work or any
/// write, or a pipe written in place.
// About 230 lines: a list of independent one-line refusals sharing one directory and data
// file, as the review listed them.
#[test]
fn review_cases_fail_early_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().to_string();
    let data = small_data(dir.path());
    let model = p("m.safetensors");
    assert_ok(
        &calm()
            .args(train_argv(&data, Path::new(&model), "4 3 1 10 1 0"))
            .output()
            .unwrap(),
    );

    // An output ending in a separator names a directory: refused before training, not after.
    let t0 = std::time::Instant::now();
    let mut argv = train_argv(
        &data,
        Path::new(&format!("{}/", p("newdir"))),
        "4 3 1 10 1 0",
    );
    fails_with(
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
        "names a directory",
    );
    argv = train_argv(&data, Path::new(&p("ok.safetensors")), "4 3 1 10 1 0");
    argv.extend(["--plot".into(), format!("{}/", p("plotdir"))]);
    fails_with(
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
        "names a directory",
    );
    assert!(!Path::new(&p("ok.safetensors")).exists());
    assert!(!Path::new(&p("newdir")).exists() && !Path::new(&p("plotdir")).exists());
    assert!(t0.elapsed().as_secs() < 60);

    // Two --data of different shapes: both files named.
    let other = p("other.npy");
    write_npy_f32(
        Path::new(&other),
        &common::random_images(2, 3, 1, 12, 12).images,
    );
    let mut argv = train_argv(&data, Path::new(&p("two.safetensors")), "4 3 1 10 1 0");
    argv.extend(["--data".into(), other.clone()]);
    let out = calm().args(&argv).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("other.npy") && err.contains("x.npy") && err.contains("1x12x12"),
        "{err}"
    );

    // eval: --val-split needs two images; --test beside --val-split is refused with --train
    // too; a format that carries labels refuses --train-labels.
    let one = p("one.npy");
    write_npy_f32(
        Path::new(&one),
        &common::random_images(3, 1, 1, 10, 10).images,
    );
    let y1 = p("y1.npy");
    ndarray_npy::write_npy(&y1, &ndarray::arr1(&[3u8])).unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--train",
            &one,
            "--train-labels",
            &y1,
            "--val-split",
            "0.5",
        ],
        "at least 2 training images",
    );
    let y20 = p("y20.npy");
    ndarray_npy::write_npy(&y20, &ndarray::Array1::<u8>::zeros(20)).unwrap();
    let x = data.to_string_lossy().to_string();
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--train",
            &x,
            "--train-labels",
            &y20,
            "--test",
            &x,
            "--test-labels",
            &y20,
            "--val-split",
            "0.5",
        ],
        "--test is not used",
    );
    let cifar = p("data_batch_1.bin");
    let mut bytes = Vec::new();
    for label in [1u8, 2] {
        bytes.push(label);
        bytes.extend(std::iter::repeat_n(100u8, 3072));
    }
    std::fs::write(&cifar, bytes).unwrap();
    let y2 = p("y2.npy");
    ndarray_npy::write_npy(&y2, &ndarray::arr1(&[0u8, 0])).unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            &model,
            "--train",
            &cifar,
            "--train-labels",
            &y2,
        ],
        "carries its own labels",
    );

    // A damaged header quoted in an error: one printable line, cut when very long.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f4',\n'fortran_order': False,\n'shape': (1, 2, 2), bogus}";
    let padded = format!("{header:<117}\n");
    npy.extend((padded.len() as u16).to_le_bytes());
    npy.extend(padded.as_bytes());
    npy.extend([0u8; 16]);
    let bad = p("bad.npy");
    std::fs::write(&bad, &npy).unwrap();
    let out = calm()
        .args(["features", "--backend", "cpu", "--model", &model])
        .args(["--data", &bad, "--out", &p("f.npy")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let mut npy = b"\x93NUMPY\x02\x00".to_vec();
    let header = format!("{}\n", "[".repeat(200_000));
    npy.extend((header.len() as u32).to_le_bytes());
    npy.extend(header.as_bytes());
    std::fs::write(&bad, &npy).unwrap();
    let out = calm()
        .args(["features", "--backend", "cpu", "--model", &model])
        .args(["--data", &bad, "--out", &p("f.npy")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1);
    assert!(err.len() < 1200, "{} characters", err.len());

    // Values that overflow f32 on the way: features refused, nothing written. Weights that
    // large can be a model calm-gpu wrote itself (SPEC's precision limit keeps the last finite
    // theta), so they load; features from them are refused, and training from them stops at
    // once with the reason.
    let huge = p("huge.npy");
    write_npy_f32(
        Path::new(&huge),
        &Array4::from_elem((2, 1, 10, 10), 3e38f32),
    );
    fails_with(
        &[
            "features",
            "--backend",
            "cpu",
            "--model",
            &model,
            "--data",
            &huge,
            "--out",
            &p("f.npy"),
        ],
        "too large for f32",
    );
    assert!(!Path::new(&p("f.npy")).exists());
    let mut m = calm_gpu::model::Model::load(Path::new(&model)).unwrap();
    m.theta.iter_mut().for_each(|v| *v = 1e30);
    let big = p("big.safetensors");
    m.save(Path::new(&big), false).unwrap();
    fails_with(
        &[
            "features",
            "--backend",
            "cpu",
            "--model",
            &big,
            "--data",
            &x,
            "--out",
            &p("f.npy"),
        ],
        "too large for f32",
    );
    assert!(!Path::new(&p("f.npy")).exists());
    let mut argv = train_argv(&data, Path::new(&p("i.safetensors")), "4 3 1 10 1 0");
    argv.extend(["--init".into(), big.clone(), "--plot".into(), p("i.png")]);
    let out = calm().args(&argv).output().unwrap();
    assert_ok(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("no epoch of this run completed"), "{said}");
    assert!(said.contains("after 0 epochs in 0.00 s"), "{said}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("i.png was not written"));
    assert!(!Path::new(&p("i.png")).exists());

    // A checkpoint whose epoch records are damaged is refused, not resumed from epoch 1.
    let ck = p("ck");
    let mut argv = train_argv(&data, Path::new(&p("c.safetensors")), "4 3 1 10 2 0");
    argv.extend(["--checkpoint-dir".into(), ck.clone()]);
    assert_ok(&calm().args(&argv).output().unwrap());
    let ck_file = Path::new(&ck).join("checkpoint.safetensors");
    let mut c = calm_gpu::model::Model::load(&ck_file).unwrap();
    c.extra.insert("records".into(), "not json".into());
    c.save(&ck_file, true).unwrap();
    fails_with(&["train", "--resume", &ck], "damaged epoch records");

    // Resumed with other data under the run's file name: refused; with its own data: resumes.
    let ck2 = p("ck2");
    let d2 = p("d2.npy");
    std::fs::copy(&data, &d2).unwrap();
    let mut argv = train_argv(
        Path::new(&d2),
        Path::new(&p("c2.safetensors")),
        "4 3 1 10 2 0",
    );
    argv.extend(["--checkpoint-dir".into(), ck2.clone(), "--force".into()]);
    assert_ok(&calm().args(&argv).output().unwrap());
    assert_ok(&calm().args(["train", "--resume", &ck2]).output().unwrap());
    write_npy_f32(
        Path::new(&d2),
        &common::random_images(4, 30, 1, 10, 10).images,
    );
    fails_with(&["train", "--resume", &ck2], "bytes but was");
}

/// A pipe given as a picture's output is written to, not replaced by a regular file.
#[cfg(target_os = "linux")]
#[test]
fn pictures_write_into_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let model = dir.path().join("m.safetensors");
    assert_ok(
        &calm()
            .args(train_argv(&data, &model, "4 3 1 10 1 0"))
            .output()
            .unwrap(),
    );
    let fifo = dir.path().join("k.png");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Held open for reading and writing (so that opening it never blocks, and a failure reads
    // as an empty pipe instead of a hang); the picture is small enough for the pipe's buffer.
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let out = calm()
        .args(["show", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&fifo)
        .output()
        .unwrap();
    assert_ok(&out);
    let mut png = vec![0u8; 1 << 16];
    let got = pipe.read(&mut png).unwrap_or(0);
    assert!(png[..got].starts_with(b"\x89PNG"), "{got} bytes");
    assert!(!std::fs::metadata(&fifo).unwrap().is_file());
}

/// `--force` over an existing metrics file: an interrupted run leaves the old lines (as it
/// leaves the old model); a finished one replaces them. No hidden file is left either way.
/// SIGTERM (a batch scheduler's stop) interrupts as Ctrl-C does: exit 130 and a checkpoint.
#[test]
fn replaced_metrics_survive_an_interrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = common::random_images(6, 600, 1, 28, 28);
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &d.images);
    let out_path = dir.path().join("run.safetensors");
    let metrics = dir.path().join("m.jsonl");
    std::fs::write(&metrics, "old line\n").unwrap();
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(train_argv(&data, &out_path, "64 20 2 50 4 5"))
        .args(["--force", "--metrics"])
        .arg(&metrics)
        .env("CALM_TUNE_FILE", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for epoch 1's line in the hidden file, then interrupt during epoch 2.
    let pending = dir.path().join(format!(".m.jsonl.{}.partial", child.id()));
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&pending).map_or(0, |s| s.lines().count()) < 1 {
        assert_eq!(
            std::fs::read_to_string(&metrics).unwrap(),
            "old line\n",
            "the old lines were replaced while the run was going"
        );
        assert!(t0.elapsed().as_secs() < 120, "epoch 1 never finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), "old line\n");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(
        res.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), "old line\n");
    assert!(!pending.exists());
    assert!(dir.path().join("run.safetensors.checkpoint").is_dir());
    // Finished: the run's own lines.
    let out = calm()
        .args(train_argv(&data, &out_path, "8 3 1 600 2 5"))
        .args(["--force", "--metrics"])
        .arg(&metrics)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.starts_with('{')), "{text}");
    let hidden = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(hidden, 0);
}

/// `show` draws a grid of at most 16,384 px a side: a smaller scale with a note where the one
/// asked for would pass it, an error naming the `--per-row` values that fit where none does
/// (1,000 kernels of 20x20 at scale 64 drew 10,249 x 160,126 px in 4.9 GB).
#[test]
fn show_keeps_the_kernel_grid_viewable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.npy");
    write_npy_f32(&x, &common::random_images(3, 4, 1, 28, 28).images);
    let model = d.join("big.safetensors");
    let out = calm()
        .args([
            "train",
            "--backend",
            "cpu",
            "--kernels",
            "1000",
            "--width",
            "20",
        ])
        .args(["--epochs", "1", "--quiet", "--data"])
        .arg(&x)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert_ok(&out);
    let png = d.join("k.png");
    let out = calm()
        .args(["show", "--scale", "64", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("drawn at scale 6, not 64"), "{stderr}");
    assert_eq!(image::image_dimensions(&png).unwrap(), (969, 15_126));
    let out = calm()
        .args(["show", "--force", "--per-row", "1", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("22x21001 px even at scale 1")
            && stderr.contains("--per-row from 2 to 780"),
        "{stderr}"
    );
    // The refused run left the earlier picture as it was.
    assert_eq!(image::image_dimensions(&png).unwrap(), (969, 15_126));
}

/// A second `train` writing the same model file, or checkpointing into the same directory, is
/// refused at its start while the first runs (it used to train beside it and overwrite its
/// checkpoints); the lock files go when the first run stops, even by SIGTERM.
#[test]
fn a_second_run_on_the_same_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = common::random_images(7, 600, 1, 28, 28);
    let data = dir.path().join("x.npy");
    write_npy_f32(&data, &d.images);
    let out_path = dir.path().join("run.safetensors");
    let ck = dir.path().join("ck");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("calm-gpu"))
        .args(train_argv(&data, &out_path, "64 20 2 50 100 5"))
        .arg("--checkpoint-dir")
        .arg(&ck)
        .env("CALM_TUNE_FILE", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let locks = [
        dir.path().join(".run.safetensors.lock"),
        ck.join(".checkpoint.safetensors.lock"),
    ];
    let t0 = std::time::Instant::now();
    while !locks.iter().all(|l| l.exists()) {
        assert!(t0.elapsed().as_secs() < 60, "the first run took no locks");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The same --out (with --force, which replaces a finished file, not a running run's).
    let other = dir.path().join("other.safetensors");
    for (out, extra) in [(&out_path, None), (&other, Some(&ck))] {
        let mut cmd = calm();
        cmd.args(train_argv(&data, out, "8 3 1 600 1 5"))
            .arg("--force");
        if let Some(ck) = extra {
            cmd.arg("--checkpoint-dir").arg(ck);
        }
        let res = cmd.output().unwrap();
        assert_eq!(res.status.code(), Some(1));
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains("another calm-gpu run is writing"), "{err}");
        assert!(!other.exists());
    }
    // SIGTERM once the run is training (its first checkpoint is written): before that, during
    // the data loading, no handler is installed yet and the signal kills it outright.
    let t0 = std::time::Instant::now();
    while !ck.join("checkpoint.safetensors").exists() {
        assert!(t0.elapsed().as_secs() < 120, "epoch 1 never finished");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let res = child.wait_with_output().unwrap();
    assert_eq!(
        res.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for l in &locks {
        assert!(!l.exists(), "{} left behind", l.display());
    }
    // Free again: a new run takes both.
    let res = calm()
        .args(train_argv(&data, &out_path, "8 3 1 600 1 5"))
        .arg("--force")
        .arg("--checkpoint-dir")
        .arg(&ck)
        .output()
        .unwrap();
    assert_ok(&res);
    for l in &locks {
        assert!(!l.exists(), "{} left behind", l.display());
    }
}

/// `train --resume DIR` takes the command line that started the run: equal options are
/// accepted and give the uninterrupted run's model; an option that differs is named, and
/// nothing is written.
#[test]
fn resume_accepts_the_command_line_that_started_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let out = dir.path().join("m.safetensors");
    let ck = dir.path().join("ck");
    let mut argv = train_argv(&data, &out, "3 4 1 7 2 5");
    argv.extend(["--checkpoint-dir".into(), ck.to_string_lossy().into()]);
    assert_ok(&calm().args(&argv).output().unwrap());
    let first = std::fs::read(&out).unwrap();
    let mut again = argv.clone();
    again.extend([
        "--resume".into(),
        ck.to_string_lossy().into(),
        "--force".into(),
    ]);
    assert_ok(&calm().args(&again).output().unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), first);
    // Another layer is not this run.
    let mut other = again.clone();
    let k = other.iter().position(|a| a == "--kernels").unwrap();
    other[k + 1] = "4".into();
    std::fs::remove_file(&out).unwrap();
    let run = calm().args(&other).output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("--kernels 4 differs from the checkpoint's 3"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists());
    // Nor is another checkpoint directory.
    let mut elsewhere = again.clone();
    let c = elsewhere
        .iter()
        .position(|a| a == "--checkpoint-dir")
        .unwrap();
    elsewhere[c + 1] = dir.path().join("other").to_string_lossy().into();
    let run = calm().args(&elsewhere).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("--checkpoint-dir"), "{err}");
}

/// A model trained with `--preset recommended` carries its feature recipe: `features` and
/// `eval` use it without the preset, say so, and flags override it.
#[test]
fn a_recommended_model_carries_its_feature_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let m = dir.path().join("m.safetensors");
    let train = calm()
        .args(["train", "--backend", "cpu", "--preset", "recommended", "-q"])
        .args([
            "--kernels",
            "3",
            "--width",
            "4",
            "--whiten",
            "3",
            "--epochs",
            "1",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&m)
        .output()
        .unwrap();
    assert_ok(&train);
    let model = calm_gpu::Model::load(&m).unwrap();
    let r = model.meta.features.expect("a recipe");
    assert_eq!(
        (r.grid, r.encoding, r.standardize),
        (4, calm_gpu::Encoding::Triangle, true)
    );
    let f = dir.path().join("f.npy");
    let run = calm()
        .args(["features", "--backend", "cpu", "--model"])
        .arg(&m)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&f)
        .output()
        .unwrap();
    assert_ok(&run);
    assert!(String::from_utf8_lossy(&run.stderr).contains("model's recipe"));
    let got: ndarray::Array2<f32> = ndarray_npy::read_npy(&f).unwrap();
    assert_eq!(got.ncols(), 3 * 16);
    let run = calm()
        .args([
            "features",
            "--backend",
            "cpu",
            "--pool",
            "1",
            "--force",
            "--model",
        ])
        .arg(&m)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&f)
        .output()
        .unwrap();
    assert_ok(&run);
    let got: ndarray::Array2<f32> = ndarray_npy::read_npy(&f).unwrap();
    assert_eq!(got.ncols(), 3);
    // A model of SPEC's protocol has none: its features are SPEC's, with no note.
    let p = dir.path().join("p.safetensors");
    assert_ok(
        &calm()
            .args(train_argv(&data, &p, "3 4 1 7 1 0"))
            .output()
            .unwrap(),
    );
    assert!(calm_gpu::Model::load(&p).unwrap().meta.features.is_none());
}

/// `train` on the CPU engine of 4 kernels of 3 x 3, no padding, 3 epochs, quiet, forced, with
/// `extra` options.
fn small_train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = train_argv(data, out, "4 3 0 1000 3 0");
    v.extend(
        ["--force", "-q"]
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from),
    );
    v
}

/// `train --posterior patch`: the model says so in `info` and resumes only with the same
/// posterior; the GPU engines, which do not have it yet, refuse it in one line.
#[test]
fn per_patch_posterior_is_kept_and_refused_where_it_does_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let out = dir.path().join("m.safetensors");
    let ck = dir.path().join("ck");
    let args = |extra: &[&str]| {
        let mut v = vec!["--posterior", "patch"];
        v.extend(extra);
        small_train_args(&data, &out, &v)
    };
    assert_ok(
        &calm()
            .args(args(&["--checkpoint-dir", ck.to_str().unwrap()]))
            .output()
            .unwrap(),
    );
    let info = calm()
        .args(["info", "--model", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&info);
    assert!(String::from_utf8_lossy(&info.stdout).contains("posterior:   per patch"));
    fails_with(
        &[
            "train",
            "--resume",
            ck.to_str().unwrap(),
            "--posterior",
            "image",
        ],
        "--posterior",
    );
    if common::backend_name() == "vulkan" {
        let gpu_out = dir.path().join("g.safetensors");
        fails_with(
            &[
                "train",
                "--backend",
                "vulkan",
                "--data",
                data.to_str().unwrap(),
                "--kernels",
                "4",
                "--width",
                "3",
                "--epochs",
                "1",
                "--posterior",
                "patch",
                "--out",
                gpu_out.to_str().unwrap(),
            ],
            "CPU engine only",
        );
        assert!(!gpu_out.exists());
    }
}

/// `train --patch-norm EPS`: kept in the model (`info` says so), carried into `features` (whose
/// values then ignore each image's contrast and brightness), checked on resume; bad values and
/// a learned variance beside it are refused in one line before any file is written; on the GPU
/// engine the same layer and features as on the CPU engine.
#[test]
fn patch_norm_is_kept_carried_into_features_and_runs_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let d = common::random_images(1, 20, 1, 10, 10);
    let brighter = dir.path().join("b.npy");
    write_npy_f32(&brighter, &d.images.mapv(|v| 3.0 * v + 0.5));
    let out = dir.path().join("m.safetensors");
    let ck = dir.path().join("ck");
    let args = |eps: &str, extra: &[&str]| {
        let mut v = vec!["--patch-norm", eps];
        v.extend(extra);
        small_train_args(&data, &out, &v)
    };
    assert_ok(
        &calm()
            .args(args("0.0001", &["--checkpoint-dir", ck.to_str().unwrap()]))
            .output()
            .unwrap(),
    );
    let m = calm_gpu::Model::load(&out).unwrap();
    assert_eq!(m.patch_norm(), Some(1e-4));
    assert_eq!(m.geometry().unwrap().patch_norm, Some(1e-4));
    let info = calm()
        .args(["info", "--model", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&info);
    assert!(String::from_utf8_lossy(&info.stdout).contains("contrast-normalised"));
    let features = |input: &Path, name: &str| {
        let f = dir.path().join(name);
        assert_ok(
            &calm()
                .args(["features", "--backend", "cpu", "--model"])
                .arg(&out)
                .arg("--data")
                .arg(input)
                .arg("--out")
                .arg(&f)
                .output()
                .unwrap(),
        );
        let f: ndarray::Array2<f32> = ndarray_npy::read_npy(&f).unwrap();
        f
    };
    let (f0, f1) = (features(&data, "f0.npy"), features(&brighter, "f1.npy"));
    let scale_f = f0.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = (&f0 - &f1).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(diff < 1e-3 * scale_f, "{diff} of {scale_f}");
    fails_with(
        &[
            "train",
            "--resume",
            ck.to_str().unwrap(),
            "--patch-norm",
            "0.1",
        ],
        "--patch-norm",
    );
    // `--preset recommended` normalises with 0.01; `--patch-norm off` turns that off.
    for (extra, want) in [
        (&["--preset", "recommended"][..], Some(0.01)),
        (&["--preset", "recommended", "--patch-norm", "off"], None),
    ] {
        let p = dir.path().join("preset.safetensors");
        assert_ok(
            &calm()
                .args(small_train_args(&data, &p, extra))
                .output()
                .unwrap(),
        );
        assert_eq!(calm_gpu::Model::load(&p).unwrap().patch_norm(), want);
    }
    let v = small_train_args(
        &data,
        &out,
        &["--preset", "recommended", "--learn-variance"],
    );
    let v: Vec<&str> = v.iter().map(String::as_str).collect();
    fails_with(&v, "--patch-norm off");
    let fresh = dir.path().join("fresh.safetensors");
    for (eps, extra, needle) in [
        ("0", &[][..], "--patch-norm"),
        ("-1", &[], "--patch-norm"),
        ("NaN", &[], "--patch-norm"),
        ("abc", &[], "--patch-norm"),
        ("0.01", &["--learn-variance"], "learned variance"),
    ] {
        let mut v = args(eps, extra);
        let at = v.iter().position(|a| a == "--out").unwrap();
        v[at + 1] = fresh.to_str().unwrap().into();
        let v: Vec<&str> = v
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "-q")
            .collect();
        fails_with(&v, needle);
        assert!(!fresh.exists(), "{eps} {extra:?}");
    }
    // The GPU engine trains the same layer and computes the same features, to f32 rounding.
    if common::backend_name() == "vulkan" {
        let mut v = args("0.0001", &[]);
        let at = v.iter().position(|a| a == "cpu").unwrap();
        v[at] = "vulkan".into();
        let at = v.iter().position(|a| a == "--out").unwrap();
        v[at + 1] = fresh.to_str().unwrap().into();
        assert_ok(&calm().args(&v).output().unwrap());
        let (a, b) = (m.theta(), calm_gpu::Model::load(&fresh).unwrap().theta());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = (&a - &b).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(diff < 1e-3 * scale, "GPU weights {diff} of {scale}");
        let f = dir.path().join("fv.npy");
        assert_ok(
            &calm()
                .args(["features", "--backend", "vulkan", "--model"])
                .arg(&out)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&f)
                .output()
                .unwrap(),
        );
        let f: ndarray::Array2<f32> = ndarray_npy::read_npy(&f).unwrap();
        let diff = (&f0 - &f).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(diff < 1e-3 * scale_f, "GPU features {diff} of {scale_f}");
    }
}

/// `reproduce --preset recommended --patch-norm EPS` trains with contrast-normalised patches
/// and says so in results.md; a bad EPS, or the flag without the preset, is refused before any
/// folder is made.
#[test]
fn reproduce_takes_patch_norm_with_the_preset() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits_as_mnist(dir.path());
    let out = dir.path().join("r");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "reproduce",
            "mnist",
            "--backend",
            "cpu",
            "--epochs",
            "1",
            "--data-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend([data.to_string_lossy().into(), "--out-dir".into()]);
        v.push(out.to_string_lossy().into());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (extra, needle) in [
        (
            &["--preset", "recommended", "--patch-norm", "0"][..],
            "--patch-norm",
        ),
        (&["--patch-norm", "0.01"], "--preset"),
    ] {
        let a = args(extra);
        fails_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle);
        assert!(!out.exists(), "{extra:?}");
    }
    assert_ok(
        &calm()
            .args(args(&["--preset", "recommended", "--patch-norm", "0.01"]))
            .output()
            .unwrap(),
    );
    let m = calm_gpu::Model::load(&out.join("model.safetensors")).unwrap();
    assert_eq!(m.patch_norm(), Some(0.01));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("--patch-norm 0.01"), "{md}");
}
