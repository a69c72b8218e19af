//! Damaged inputs, generated: every reader of a user's file (IDX, `.npy`, either gzipped, CIFAR-10
//! and STL-10 binaries, safetensors models) takes a valid file with random damage (cut short,
//! bytes flipped, header fields overwritten with edge values, bytes inserted or appended) and
//! must answer with a one-line error or a dataset that is consistent: never a panic, never a
//! giant allocation (a header claiming terabytes would abort the test process).
//!
//! The hand-written cases of `data_readers.rs` name the damage a user meets; these search for the
//! ones nobody thought of. `PROPTEST_CASES=20000 cargo test --test fuzz_inputs` runs a longer
//! search than CI's 256 cases per reader (from a fixed seed; `PROPTEST_RNG_SEED=N` draws from
//! another).

mod common;

use std::path::{Path, PathBuf};

use calm_gpu::LayerConfig;
use calm_gpu::data::{self, DataError, ImageSource};
use calm_gpu::model::{HistoryEntry, Model, ModelMeta};
use calm_gpu::prior::Prior;
use common::{gz, npy_bytes};
use proptest::prelude::*;

fn idx(dims: &[u32], kind: u8, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn pixels(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 37 % 251) as u8).collect()
}

fn floats(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.01 - 0.3).to_le_bytes())
        .collect()
}

fn model_bytes() -> Vec<u8> {
    let layer = LayerConfig {
        kernels: 3,
        width: 2,
        pad: 1,
    };
    let model = Model {
        meta: ModelMeta {
            layer,
            channels: 1,
            height: 4,
            width: 4,
            seed: 1,
            batch: 2,
            epochs_requested: 1,
            preprocess: "scale".into(),
            engine: "cpu".into(),
            images: 2,
            data: vec!["x".into()],
            history: vec![HistoryEntry {
                epoch: 1,
                loglik: -3.5,
                count_sum: 2.0,
                revived: 0,
            }],
            stopped: None,
            options: None,
            features: None,
            calm_gpu_version: "0".into(),
        },
        theta: (0..12).map(|i| i as f32 * 0.1).collect(),
        counts: vec![1.0, 0.5, 0.5],
        prior: Some(Prior {
            inv_var: 1.5,
            log_weight: vec![0.1, -0.05, -0.05],
        }),
        whiten: None,
        extra: Default::default(),
    };
    model.to_bytes().unwrap()
}

/// One piece of damage.
#[derive(Clone, Debug)]
enum Damage {
    /// Keep only this share (per mille) of the bytes.
    Cut(u16),
    /// XOR the byte at this share (per mille) of the length with a nonzero mask.
    Flip(u16, u8),
    /// Overwrite 4 bytes at this share with an edge value, big- or little-endian.
    Word(u16, u32, bool),
    /// Insert bytes at this share.
    Insert(u16, Vec<u8>),
    /// Set the byte at this share to a character that numbers and headers are made of.
    Char(u16, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    let at = 0u16..=1000;
    let edge = prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(255),
        Just(65_535),
        Just(1 << 24),
        Just(i32::MAX as u32),
        Just(u32::MAX),
        any::<u32>(),
    ];
    prop_oneof![
        at.clone().prop_map(Damage::Cut),
        (at.clone(), 1u8..=255).prop_map(|(a, m)| Damage::Flip(a, m)),
        (at.clone(), edge, any::<bool>()).prop_map(|(a, v, be)| Damage::Word(a, v, be)),
        (at.clone(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Damage::Insert(a, b)),
        (
            at,
            prop::sample::select(b"0123456789,()[]{}:' -e.9".to_vec())
        )
            .prop_map(|(a, c)| Damage::Char(a, c)),
    ]
}

fn apply(mut b: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    let pos = |len: usize, at: u16| len * at as usize / 1000;
    for d in damage {
        match d {
            Damage::Cut(at) => b.truncate(pos(b.len(), *at)),
            Damage::Flip(at, m) if !b.is_empty() => {
                let i = pos(b.len() - 1, *at);
                b[i] ^= m;
            }
            Damage::Word(at, v, be) if b.len() >= 4 => {
                let i = pos(b.len() - 4, *at);
                let w = if *be {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                b[i..i + 4].copy_from_slice(&w);
            }
            Damage::Insert(at, bytes) => {
                let i = pos(b.len(), *at);
                b.splice(i..i, bytes.iter().copied());
            }
            Damage::Char(at, c) if !b.is_empty() => {
                let i = pos(b.len() - 1, *at);
                b[i] = *c;
            }
            _ => {}
        }
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// An error must be one line; a dataset must be as large as its shape says and finite, with one
/// label per image if it has labels.
fn check_images(r: Result<data::Dataset, DataError>) -> Result<(), TestCaseError> {
    match r {
        Err(e) => {
            let m = e.to_string();
            prop_assert!(!m.contains('\n'), "error is not one line: {m:?}");
            prop_assert!(!m.is_empty());
        }
        Ok(d) => {
            let (n, c, h, w) = d.images.dim();
            prop_assert!(
                n > 0 && c > 0 && h > 0 && w > 0,
                "empty dataset {:?}",
                d.images.dim()
            );
            prop_assert!(d.images.iter().all(|v| v.is_finite()));
            if let Some(l) = &d.labels {
                prop_assert_eq!(l.len(), n);
            }
        }
    }
    Ok(())
}

fn check_labels(r: Result<Vec<u8>, DataError>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let m = e.to_string();
        prop_assert!(!m.contains('\n'), "error is not one line: {m:?}");
    }
    Ok(())
}

/// A streaming source: every image it claims must be readable, or the read must fail cleanly.
fn check_source(r: Result<Box<dyn ImageSource>, DataError>) -> Result<(), TestCaseError> {
    match r {
        Err(e) => prop_assert!(!e.to_string().contains('\n')),
        Ok(s) => {
            let (c, h, w) = s.shape();
            let n = s.len().min(4);
            let mut out = vec![0f32; n * c * h * w];
            if let Err(e) = s.read_into(0, n, &mut out) {
                prop_assert!(!e.to_string().contains('\n'));
            }
            // Beyond the end is refused, not read.
            let mut one = vec![0f32; c * h * w];
            prop_assert!(s.read_into(s.len(), 1, &mut one).is_err());
        }
    }
    Ok(())
}

fn many_damages() -> impl Strategy<Value = Vec<Damage>> {
    prop::collection::vec(damage(), 1..4)
}

proptest! {
    #![proptest_config(common::proptest_config(256))]

    #[test]
    fn idx_images_and_labels(d in many_damages(), zip in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let images = idx(&[3, 5, 4], 0x08, &pixels(60));
        let labels = idx(&[3], 0x08, &[1, 2, 3]);
        let (images, labels) = (apply(images, &d), apply(labels, &d));
        let (images, labels) = if zip { (gz(&images), gz(&labels)) } else { (images, labels) };
        let p = write(dir.path(), "images-idx3-ubyte", &images);
        check_images(data::load(&p))?;
        let q = write(dir.path(), "labels-idx1-ubyte", &labels);
        check_labels(data::load_labels(&q))?;
        check_images(data::load_labelled(&p, &q))?;
    }

    /// Damage inside the gzip stream itself (its header, CRC and length trailer).
    #[test]
    fn gzip_stream(d in many_damages()) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "x.gz", &apply(gz(&idx(&[2, 3, 3], 0x08, &pixels(18))), &d));
        check_images(data::load(&p))?;
    }

    #[test]
    fn npy_images_and_labels(d in many_damages(), which in 0usize..5, zip in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let base = match which {
            0 => npy_bytes("<f4", false, &[2, 1, 3, 4], &floats(24)),
            1 => npy_bytes("<f4", true, &[2, 3, 4], &floats(24)),
            2 => npy_bytes("|u1", false, &[3, 2, 2], &pixels(12)),
            3 => npy_bytes(">f8", false, &[2, 2, 2], &[0x3f; 64]),
            _ => npy_bytes("<i8", false, &[3], &[1i64, 2, 9].map(i64::to_le_bytes).concat()),
        };
        let bytes = apply(base, &d);
        let bytes = if zip { gz(&bytes) } else { bytes };
        let p = write(dir.path(), "x.npy", &bytes);
        check_images(data::load(&p))?;
        check_labels(data::load_labels(&p))?;
        check_source(data::open_source(&p, None))?;
        check_source(data::NpyFile::open(&p).map(|f| Box::new(f) as Box<dyn ImageSource>))?;
    }

    #[test]
    fn cifar_batch(d in many_damages()) {
        let dir = tempfile::tempdir().unwrap();
        let mut base = Vec::new();
        for i in 0..2u8 {
            base.push(i * 4);
            base.extend(pixels(3072));
        }
        let p = write(dir.path(), "data_batch_1.bin", &apply(base, &d));
        check_images(data::load(&p))?;
        check_labels(data::load_labels(&p))?;
    }

    #[test]
    fn stl10_images_and_labels(d in many_damages()) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "train_X.bin", &apply(pixels(2 * 3 * 96 * 96), &d));
        let q = write(dir.path(), "train_y.bin", &apply(vec![1, 10], &d));
        check_images(data::load(&p))?;
        check_source(data::open_source(&p, None))?;
        check_labels(data::load_labels(&q))?;
        check_images(data::load_labelled(&p, &q))?;
    }

    /// A model that loads is one a run could have written: its geometry is possible and its
    /// arrays have the sizes and the finite values the metadata implies.
    #[test]
    fn safetensors_model(d in many_damages()) {
        let path = Path::new("damaged.safetensors");
        match Model::from_bytes(path, &apply(model_bytes(), &d)) {
            Err(e) => prop_assert!(!e.to_string().contains('\n'), "{e}"),
            Ok(m) => {
                let g = m.geometry().expect("a loaded model has a geometry");
                prop_assert_eq!(m.theta.len(), g.k * g.c * g.kw * g.kw);
                prop_assert_eq!(m.counts.len(), g.k);
                prop_assert!(m.theta.iter().chain(&m.counts).all(|v| v.is_finite()));
                if let Some(p) = &m.prior {
                    prop_assert_eq!(p.log_weight.len(), g.k);
                }
            }
        }
    }
}

/// The undamaged bases load, so the damage above starts from files the readers accept.
#[test]
fn undamaged_bases_load() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "i", &idx(&[3, 5, 4], 0x08, &pixels(60)));
    assert_eq!(data::load(&p).unwrap().images.dim(), (3, 1, 5, 4));
    let p = write(dir.path(), "x.gz", &gz(&idx(&[2, 3, 3], 0x08, &pixels(18))));
    assert_eq!(data::load(&p).unwrap().images.dim(), (2, 1, 3, 3));
    let q = write(dir.path(), "l", &idx(&[3], 0x08, &[1, 2, 3]));
    assert_eq!(data::load_labels(&q).unwrap(), vec![1, 2, 3]);
    for (bytes, dim) in [
        (
            npy_bytes("<f4", false, &[2, 1, 3, 4], &floats(24)),
            (2, 1, 3, 4),
        ),
        (
            npy_bytes("<f4", true, &[2, 3, 4], &floats(24)),
            (2, 1, 3, 4),
        ),
        (
            npy_bytes("|u1", false, &[3, 2, 2], &pixels(12)),
            (3, 1, 2, 2),
        ),
    ] {
        let p = write(dir.path(), "x.npy", &bytes);
        assert_eq!(data::load(&p).unwrap().images.dim(), dim);
    }
    let mut cifar = Vec::new();
    for i in 0..2u8 {
        cifar.push(i * 4);
        cifar.extend(pixels(3072));
    }
    let p = write(dir.path(), "data_batch_1.bin", &cifar);
    assert_eq!(data::load(&p).unwrap().labels, Some(vec![0, 4]));
    let p = write(dir.path(), "train_X.bin", &pixels(2 * 3 * 96 * 96));
    assert_eq!(data::load(&p).unwrap().images.dim(), (2, 3, 96, 96));
    let q = write(dir.path(), "train_y.bin", &[1, 10]);
    assert_eq!(data::load_labels(&q).unwrap(), vec![0, 9]);
    let m = Model::from_bytes(Path::new("m"), &model_bytes()).unwrap();
    assert_eq!(m.theta.len(), 12);
}
