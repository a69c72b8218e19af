//! A refactor keeps the numbers: the CPU engine writes the same bytes of `theta`, `counts`, the
//! prior, the whitening filter and the LL history as the release that wrote `tests/fixtures/`
//! (its README holds the command lines), for the same command line.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use calm_gpu::model::Model;

/// `(fixture file, train arguments after --backend cpu)`, as in tests/fixtures/README.md.
const FIXTURES: &[(&str, &str)] = &[
    (
        "spec-k8-w5.safetensors",
        "--kernels 8 --width 5 --pad 1 --epochs 3 --batch 300 --seed 1",
    ),
    (
        "recommended-k16.safetensors",
        "--preset recommended --patch-norm off --kernels 16 --epochs 2 --learn-weights --learn-variance --seed 3",
    ),
    (
        "patches-revive-k12.safetensors",
        "--init-method patches --revive --tol 1e-3 --epochs 4 --kernels 12 --width 7 --pad 0 --batch 777 --seed 5",
    ),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../calm-gpu/tests/fixtures")
        .join(name)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Everything the data and the command line determine, as bits.
fn same_numbers(got: &Model, want: &Model, what: &str) {
    assert_eq!(bits(&got.theta), bits(&want.theta), "{what}: theta");
    assert_eq!(bits(&got.counts), bits(&want.counts), "{what}: counts");
    assert_eq!(got.meta.history.len(), want.meta.history.len(), "{what}");
    for (a, b) in got.meta.history.iter().zip(&want.meta.history) {
        assert_eq!(
            (
                a.epoch,
                a.loglik.to_bits(),
                a.count_sum.to_bits(),
                a.revived
            ),
            (
                b.epoch,
                b.loglik.to_bits(),
                b.count_sum.to_bits(),
                b.revived
            ),
            "{what}: history"
        );
    }
    assert_eq!(got.prior, want.prior, "{what}: prior");
    assert_eq!(
        got.whiten.as_ref().map(|w| bits(&w.filter)),
        want.whiten.as_ref().map(|w| bits(&w.filter)),
        "{what}: whitening filter"
    );
    assert_eq!(got.meta.layer, want.meta.layer, "{what}: layer");
    assert_eq!(got.meta.options, want.meta.options, "{what}: options");
    assert_eq!(got.meta.stopped, want.meta.stopped, "{what}: stopped");
}

#[test]
fn the_cpu_engine_writes_the_previous_releases_numbers() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in FIXTURES {
        let out = dir.path().join(name);
        let run = Command::cargo_bin("calm-gpu")
            .unwrap()
            .env("CALM_TUNE_FILE", "off")
            .args(["train", "--backend", "cpu", "-q", "--out"])
            .arg(&out)
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got = Model::load(&out).unwrap();
        let want = Model::load(&fixture(name)).unwrap();
        same_numbers(&got, &want, name);
    }
}
