//! Option combinations, generated: `train` on the CPU engine with random subsets of its options,
//! each at edge values (0, 1, huge, negative, NaN, wider than the image), then `info`, `features`
//! and `show` on what it wrote. Every run must end one of three ways: exit 0 with its outputs
//! written and readable, exit 1 with a one-line `error:`, or exit 2 (clap's usage error); never
//! a panic, a crash by signal, or a hang. `tests/cli.rs` names the cases a user meets; this
//! searches for the combinations nobody listed.
//!
//! CI runs 32 cases from a fixed seed (`common::proptest_config`); `PROPTEST_CASES=500 cargo test
//! --test cli_fuzz` searches longer.

#[path = "../../calm-gpu/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use assert_cmd::Command;
use proptest::prelude::*;

fn calm(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("calm-gpu").unwrap();
    c.env("CALM_TUNE_FILE", "off")
        .current_dir(dir)
        .timeout(Duration::from_secs(120));
    c
}

/// An option and its value, as given on the command line.
type Arg = (&'static str, Option<String>);

fn value<T: std::fmt::Debug + Clone + ToString + 'static>(
    name: &'static str,
    values: Vec<T>,
) -> impl Strategy<Value = Arg> {
    prop::sample::select(values).prop_map(move |v| (name, Some(v.to_string())))
}

fn flag(name: &'static str) -> impl Strategy<Value = Arg> {
    Just((name, None))
}

/// One of train's options at an edge value. Sizes stay small enough for a quick run where they
/// are valid (images are 1 x 10 x 10), and cross into impossible where they are not.
fn train_option() -> impl Strategy<Value = Arg> {
    prop_oneof![
        value("--kernels", vec!["0", "1", "3", "17", "-1", "1e3"]),
        value("--width", vec!["0", "1", "3", "10", "14", "15", "40"]),
        value(
            "--pad",
            vec!["0", "1", "2", "7", "1000", "18446744073709551616"]
        ),
        value("--batch", vec!["0", "1", "7", "1000000000000"]),
        value("--epochs", vec!["0", "1", "2"]),
        value("--seed", vec!["0", "18446744073709551615", "-3"]),
        value("--tol", vec!["0", "0.5", "-1", "NaN", "inf", "1e-300"]),
        value("--whiten", vec!["0", "1", "2", "3", "10", "11", "100"]),
        value("--init-method", vec!["normal", "patches", "zeros"]),
        value("--preprocess", vec!["scale", "none", "zca-image", "zca"]),
        value("--protocol", vec!["paper"]),
        value("--preset", vec!["recommended"]),
        value("--init", vec!["init.npy", "bad.npy", "missing.npy"]),
        value("--plot", vec!["ll.png", "sub/ll.png", "ll.png/"]),
        value("--metrics", vec!["m.jsonl", "x.npy"]),
        value("--cache", vec!["cache.npy"]),
        value("--checkpoint-dir", vec!["ck"]),
        value("--data", vec!["x.npy", "y.npy", "nan.npy"]),
        flag("--revive"),
        flag("--learn-weights"),
        flag("--learn-variance"),
        flag("--force"),
        flag("--quiet"),
    ]
}

/// Writes the files the options name: 20 images of 1 x 10 x 10 (`x.npy`), 5 of 1 x 12 x 12
/// (`y.npy`, another shape), images holding a NaN (`nan.npy`), weights for K 3, w 3 (`init.npy`)
/// and weights of a shape no layer here has (`bad.npy`).
fn write_files(dir: &Path) {
    let x = common::random_images(1, 20, 1, 10, 10).images;
    ndarray_npy::write_npy(dir.join("x.npy"), &x).unwrap();
    let y = common::random_images(2, 5, 1, 12, 12).images;
    ndarray_npy::write_npy(dir.join("y.npy"), &y).unwrap();
    let mut nan = x.clone();
    nan[[3, 0, 4, 4]] = f32::NAN;
    ndarray_npy::write_npy(dir.join("nan.npy"), &nan).unwrap();
    let init = ndarray::Array4::<f32>::from_elem((3, 1, 3, 3), 0.1);
    ndarray_npy::write_npy(dir.join("init.npy"), &init).unwrap();
    let bad = ndarray::Array2::<f32>::from_elem((2, 5), 0.1);
    ndarray_npy::write_npy(dir.join("bad.npy"), &bad).unwrap();
}

/// Files and directories under `dir` whose names start with a dot.
fn hidden_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                found.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    found
}

/// What every run must end as: exit 0, or a one-line `error:` with exit 1, or clap's usage error
/// with exit 2; no panic, no signal, within the timeout.
fn check_end(what: &str, out: &std::process::Output) -> Result<bool, TestCaseError> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    prop_assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{what} panicked:\n{stderr}"
    );
    let code = out.status.code();
    prop_assert!(
        code.is_some(),
        "{what} ended by a signal or the timeout:\n{stderr}"
    );
    match code.unwrap() {
        0 => Ok(true),
        1 => {
            let last = stderr.lines().last().unwrap_or("");
            prop_assert!(
                last.starts_with("error: "),
                "{what}: exit 1 without `error:`:\n{stderr}"
            );
            prop_assert!(
                stderr.lines().filter(|l| l.starts_with("error")).count() == 1,
                "{what}: more than one error line:\n{stderr}"
            );
            Ok(false)
        }
        2 => Ok(false),
        c => Err(TestCaseError::fail(format!("{what}: exit {c}:\n{stderr}"))),
    }
}

/// One case of `train_option_combinations_end_cleanly` (outside the macro, where rustfmt reaches).
fn train_case(options: Vec<Arg>, data: &str, backend: &str) -> Result<(), TestCaseError> {
    // Each option once (clap refuses a repeat; that case teaches nothing).
    let mut options = options;
    let mut seen = std::collections::HashSet::new();
    options.retain(|(name, _)| seen.insert(*name));
    let data = options
        .iter()
        .find(|(n, _)| *n == "--data")
        .and_then(|(_, v)| v.clone())
        .unwrap_or(data.to_string());
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path());
    // A small layer unless the options say otherwise (clap refuses an option given twice).
    let mut argv: Vec<String> = vec!["train".into()];
    let given = |name: &str| options.iter().any(|(n, _)| *n == name);
    for (name, default) in [
        ("--backend", backend),
        ("--kernels", "4"),
        ("--width", "3"),
        ("--pad", "1"),
        ("--epochs", "2"),
        ("--batch", "8"),
        ("--data", data.as_str()),
    ] {
        if !given(name) {
            argv.extend([name.to_string(), default.to_string()]);
        }
    }
    for (name, v) in &options {
        argv.push(name.to_string());
        argv.extend(v.clone());
    }
    argv.extend(["--out".into(), "model.safetensors".into()]);
    let what = format!("calm-gpu {}", argv.join(" "));
    let out = calm(dir.path()).args(&argv).output().unwrap();
    // Whatever the outcome, no hidden file is left: lock files, metrics in progress, temporaries.
    let hidden = hidden_files(dir.path());
    prop_assert!(hidden.is_empty(), "{what} left {hidden:?}");
    if !check_end(&what, &out)? {
        // A refused run leaves nothing behind: no model, no directory made for its outputs.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        prop_assert_eq!(
            left,
            ["bad.npy", "init.npy", "nan.npy", "x.npy", "y.npy"],
            "{} failed and left files",
            what
        );
        return Ok(());
    }
    let model = dir.path().join("model.safetensors");
    prop_assert!(model.is_file(), "{what}: exit 0 without the model");
    // What it wrote is readable by the other commands.
    let info = calm(dir.path())
        .args(["info", "--model", "model.safetensors"])
        .output()
        .unwrap();
    prop_assert!(
        check_end("info", &info)?,
        "info of {what} failed: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let features = calm(dir.path())
        .args([
            "features",
            "--model",
            "model.safetensors",
            "--backend",
            "cpu",
            "--out",
            "f.npy",
        ])
        .args(["--data", data.as_str()])
        .output()
        .unwrap();
    // The model's own data: features succeed.
    let ok = check_end("features", &features)?;
    prop_assert!(
        ok,
        "features of {what} failed: {}",
        String::from_utf8_lossy(&features.stderr)
    );
    let f: ndarray::Array2<f32> = ndarray_npy::read_npy(dir.path().join("f.npy")).unwrap();
    prop_assert!(
        f.iter().all(|v| v.is_finite()),
        "{what}: features not finite"
    );
    let show = calm(dir.path())
        .args(["show", "--model", "model.safetensors", "--out", "k.png"])
        .output()
        .unwrap();
    prop_assert!(
        check_end("show", &show)?,
        "show of {what} failed: {}",
        String::from_utf8_lossy(&show.stderr)
    );
    Ok(())
}

proptest! {
    #![proptest_config(common::proptest_config(32))]

    #[test]
    fn train_option_combinations_end_cleanly(
        options in prop::collection::vec(train_option(), 0..7),
        data in prop::sample::select(vec!["x.npy", "y.npy"]),
        // A quarter on Vulkan: lavapipe in CI (GL on llvmpipe compiles too slowly for a quick
        // case; validate covers it); auto is the CPU engine there.
        backend in prop::sample::select(vec!["cpu", "cpu", "auto", common::backend_name()]),
    ) {
        train_case(options, data, backend)?;
    }
}

/// `features` options at edge values, on a model trained once (K 4, w 3, p 1 on the 20 images
/// of `x.npy`, with labels 0-3 in `labels.npy`).
fn features_option() -> impl Strategy<Value = Arg> {
    prop_oneof![
        value("--pool", vec!["0", "1", "2", "10", "11", "1000"]),
        value("--encode", vec!["lse", "triangle", "max"]),
        value("--batch", vec!["0", "1", "3", "1000000000000"]),
        value(
            "--out",
            vec!["f.npy", "x.npy", "model.safetensors", "sub/f.npy", "f.npy/"]
        ),
        value("--data", vec!["x.npy", "y.npy", "nan.npy", "labels.npy"]),
        flag("--force"),
    ]
}

/// `eval` options at edge values, on the same model.
fn eval_option() -> impl Strategy<Value = Arg> {
    prop_oneof![
        value("--pool", vec!["0", "1", "2", "10", "11", "1000"]),
        value("--encode", vec!["lse", "triangle"]),
        value("--batch", vec!["0", "1", "3"]),
        value("--c", vec!["0", "1", "-1", "1e30", "NaN", "inf"]),
        value("--max-iter", vec!["0", "1", "5"]),
        value(
            "--val-split",
            vec!["0", "0.05", "0.5", "0.99", "1", "1.5", "-0.1", "NaN"]
        ),
        value("--baseline", vec!["raw", "random"]),
        value("--test", vec!["x.npy", "y.npy", "nan.npy"]),
        value("--test-labels", vec!["labels.npy", "short.npy", "x.npy"]),
        value("--train-labels", vec!["labels.npy", "short.npy"]),
        value("--json", vec!["r.json", "model.safetensors", "x.npy"]),
        value("--preset", vec!["recommended"]),
        flag("--standardize"),
        flag("--force"),
    ]
}

/// The directory with the data files and `model.safetensors`, made once for every case.
fn trained() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let labels = ndarray::Array1::<i64>::from_iter((0..20).map(|i| i % 4));
        ndarray_npy::write_npy(dir.path().join("labels.npy"), &labels).unwrap();
        let short = ndarray::Array1::<i64>::from_iter(0..7);
        ndarray_npy::write_npy(dir.path().join("short.npy"), &short).unwrap();
        calm(dir.path())
            .args([
                "train",
                "--backend",
                "cpu",
                "--data",
                "x.npy",
                "--kernels",
                "4",
            ])
            .args(["--width", "3", "--pad", "1", "--epochs", "2", "--quiet"])
            .args(["--out", "model.safetensors"])
            .assert()
            .success();
        dir
    })
    .path()
}

/// One case of `features_and_eval_option_combinations_end_cleanly`.
fn probe_case(eval: bool, options: Vec<Arg>) -> Result<(), TestCaseError> {
    let mut options = options;
    let mut seen = std::collections::HashSet::new();
    options.retain(|(name, _)| seen.insert(*name));
    let given = |name: &str| options.iter().any(|(n, _)| *n == name);
    // Each case works in its own copy of the files (outputs may not collide).
    let base = trained();
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "x.npy",
        "y.npy",
        "nan.npy",
        "labels.npy",
        "short.npy",
        "model.safetensors",
    ] {
        std::fs::copy(base.join(f), dir.path().join(f)).unwrap();
    }
    let keep = ["model.safetensors", "x.npy"].map(|f| std::fs::read(dir.path().join(f)).unwrap());
    let mut argv: Vec<String> = vec![
        if eval { "eval" } else { "features" }.into(),
        "--model".into(),
        "model.safetensors".into(),
        "--backend".into(),
        "cpu".into(),
    ];
    // What the command needs, unless the options give it: the model's data (its
    // preprocessing is `none`, so eval has no shipped test set to fall back on) and labels.
    let defaults: &[(&str, &str)] = if eval {
        &[
            ("--train", "x.npy"),
            ("--train-labels", "labels.npy"),
            ("--test", "x.npy"),
            ("--test-labels", "labels.npy"),
        ]
    } else {
        &[("--data", "x.npy"), ("--out", "f.npy")]
    };
    for (name, v) in defaults {
        let held_out = given("--val-split") && name.starts_with("--test");
        if !given(name) && !held_out {
            argv.extend([name.to_string(), v.to_string()]);
        }
    }
    for (name, v) in &options {
        argv.push(name.to_string());
        argv.extend(v.clone());
    }
    let what = format!("calm-gpu {}", argv.join(" "));
    let out = calm(dir.path()).args(&argv).output().unwrap();
    let ok = check_end(&what, &out)?;
    // Inputs are never overwritten, whatever the outputs are named.
    for (f, bytes) in ["model.safetensors", "x.npy"].iter().zip(&keep) {
        prop_assert!(
            &std::fs::read(dir.path().join(f)).unwrap() == bytes,
            "{what} changed {f}"
        );
    }
    let features_out = options
        .iter()
        .find(|(n, _)| *n == "--out")
        .and_then(|(_, v)| v.clone())
        .unwrap_or("f.npy".into());
    if ok && !eval {
        let f: ndarray::Array2<f32> =
            ndarray_npy::read_npy(dir.path().join(&features_out)).unwrap();
        let data = options
            .iter()
            .find(|(n, _)| *n == "--data")
            .and_then(|(_, v)| v.clone());
        // One row per image of the data given (y.npy: 5 images of 12 x 12, which a layer
        // trained on 10 x 10 images encodes as well).
        let images = if data.as_deref() == Some("y.npy") {
            5
        } else {
            20
        };
        // K 4 columns per region of the G x G grid.
        let grid: usize = options
            .iter()
            .find(|(n, _)| *n == "--pool")
            .and_then(|(_, v)| v.as_deref()?.parse().ok())
            .unwrap_or(1);
        prop_assert_eq!(f.shape(), &[images, 4 * grid * grid]);
        prop_assert!(
            f.iter().all(|v| v.is_finite()),
            "{what}: features not finite"
        );
    }
    if ok
        && eval
        && options
            .iter()
            .any(|(n, v)| *n == "--json" && v.as_deref() == Some("r.json"))
    {
        let text = std::fs::read_to_string(dir.path().join("r.json")).unwrap();
        prop_assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok(),
            "{what}: bad JSON"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(common::proptest_config(32))]

    #[test]
    fn features_and_eval_option_combinations_end_cleanly(
        (eval, options) in prop_oneof![
            prop::collection::vec(features_option(), 0..5).prop_map(|o| (false, o)),
            prop::collection::vec(eval_option(), 0..6).prop_map(|o| (true, o)),
        ],
    ) {
        probe_case(eval, options)?;
    }
}
