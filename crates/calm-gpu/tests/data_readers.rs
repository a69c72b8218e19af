//! Dataset readers: every accepted format round-trips, and every bad input is an error with a
//! one-line message that says what is wrong (never a panic, never a giant allocation).

use std::path::{Path, PathBuf};

mod common;

use calm_gpu::data::{self, DataError, ImageSource, PixelKind, Split, idx, npy};
use common::{gz, npy_bytes};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// IDX images of `n` x `h` x `w` where pixel (i, r, c) = (i * 31 + r * 7 + c) % 256.
fn idx_images(n: u32, h: u32, w: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x0803u32.to_be_bytes());
    for d in [n, h, w] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    for i in 0..n {
        for r in 0..h {
            for c in 0..w {
                b.push(((i * 31 + r * 7 + c) % 256) as u8);
            }
        }
    }
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x0801u32.to_be_bytes());
    b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The error's message, checked to be a single line.
fn err_msg<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    let e = r.expect_err("expected an error");
    let m = e.to_string();
    assert!(!m.contains('\n'), "message is not one line: {m:?}");
    m
}

#[test]
fn idx_roundtrip_plain_and_gzip() {
    let d = tmp();
    let raw = idx_images(3, 4, 5);
    // The gzip name lies on purpose: format comes from the content.
    for (name, bytes) in [
        ("a.idx", raw.clone()),
        ("b.idx", gz(&raw)),
        ("c.gz", raw.clone()),
    ] {
        let p = write(d.path(), name, &bytes);
        let ds = data::load(&p).unwrap();
        assert_eq!(ds.images.shape(), &[3, 1, 4, 5]);
        assert_eq!(ds.images[[2, 0, 1, 3]], (2 * 31 + 7 + 3) as f32 / 255.0);
        assert!(ds.labels.is_none());
        let rawds = idx::read_images_raw(&p).unwrap();
        assert_eq!(rawds.images[[2, 0, 1, 3]], (2 * 31 + 7 + 3) as f32);
    }
    let lab = [3u8, 1, 4];
    for (name, bytes) in [("l.idx", idx_labels(&lab)), ("l.gz", gz(&idx_labels(&lab)))] {
        let p = write(d.path(), name, &bytes);
        assert_eq!(data::load_labels(&p).unwrap(), lab);
    }
    let ip = write(d.path(), "i", &raw);
    let lp = write(d.path(), "l", &idx_labels(&lab));
    let ds = data::load_labelled(&ip, &lp).unwrap();
    assert_eq!(ds.labels.as_deref(), Some(&lab[..]));
    let lp2 = write(d.path(), "l2", &idx_labels(&[1, 2]));
    let m = err_msg(data::load_labelled(&ip, &lp2));
    assert!(m.contains("2 labels for 3 images"), "{m}");
}

#[test]
fn dataset_read_into_checks_the_request() {
    let d = tmp();
    let p = write(d.path(), "a", &idx_images(3, 2, 2));
    let ds = data::load(&p).unwrap();
    let mut out = vec![0.0; 8];
    ds.read_into(1, 2, &mut out).unwrap();
    assert_eq!(out[0], ds.images[[1, 0, 0, 0]]);
    assert!(err_msg(ds.read_into(2, 2, &mut out)).contains("holds 3"));
    let mut short = vec![0.0; 3];
    err_msg(ds.read_into(0, 1, &mut short));
}

#[test]
fn missing_file_is_io_error_naming_the_path() {
    let d = tmp();
    let p = d.path().join("nope.idx");
    let e = data::load(&p).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.idx"), "{e}");
    assert!(matches!(data::load_labels(&p), Err(DataError::Io { .. })));
}

#[test]
fn idx_wrong_magic() {
    let d = tmp();
    let lp = write(d.path(), "labels", &idx_labels(&[1, 2, 3]));
    let m = err_msg(idx::read_images(&lp));
    assert!(m.contains("0x00000801") && m.contains("labels file"), "{m}");
    let ip = write(d.path(), "images", &idx_images(2, 2, 2));
    let m = err_msg(idx::read_labels(&ip));
    assert!(m.contains("images file"), "{m}");
    // float IDX (type 0x0D) is not accepted.
    let mut f = idx_images(1, 1, 1);
    f[2] = 0x0d;
    let p = write(d.path(), "float", &f);
    let m = err_msg(data::load(&p));
    assert!(m.contains("32-bit floats"), "{m}");
    // Neither format.
    let p = write(d.path(), "junk.png", b"\x89PNG\r\n\x1a\n");
    let m = err_msg(data::load(&p));
    assert!(
        m.contains("unrecognised format") && m.contains("junk.png"),
        "{m}"
    );
    let p = write(d.path(), "empty", b"");
    let m = err_msg(data::load(&p));
    assert!(m.contains("empty"), "{m}");
}

#[test]
fn idx_truncated_and_trailing() {
    let d = tmp();
    let full = idx_images(10, 28, 28);
    let cut = &full[..1000];
    let p = write(d.path(), "cut.idx", cut);
    let m = err_msg(data::load(&p));
    assert!(m.contains("cut.idx") && m.contains("truncated"), "{m}");
    assert!(
        m.contains(&(16 + 10 * 784).to_string()) && m.contains("1000"),
        "{m}"
    );

    let p = write(d.path(), "cut.gz", &gz(cut));
    let m = err_msg(data::load(&p));
    assert!(
        m.contains("truncated") && m.contains("decompressed") && m.contains("1000"),
        "{m}"
    );

    // A gzip file cut in the middle of its compressed stream.
    let z = gz(&full);
    let p = write(d.path(), "cutstream.gz", &z[..z.len() / 2]);
    let m = err_msg(data::load(&p));
    assert!(m.contains("truncated"), "{m}");

    // Header cut short.
    let p = write(d.path(), "hdr.idx", &full[..10]);
    let m = err_msg(data::load(&p));
    assert!(m.contains("truncated"), "{m}");

    let mut extra = full.clone();
    extra.extend_from_slice(b"garbage");
    let p = write(d.path(), "extra.idx", &extra);
    let m = err_msg(data::load(&p));
    assert!(m.contains("7 unexpected trailing bytes"), "{m}");
    let p = write(d.path(), "extra.gz", &gz(&extra));
    let m = err_msg(data::load(&p));
    assert!(m.contains("7 unexpected trailing bytes"), "{m}");

    let mut lab = idx_labels(&[1, 2, 3]);
    lab.pop();
    let p = write(d.path(), "lab", &lab);
    assert!(err_msg(data::load_labels(&p)).contains("truncated"));
}

#[test]
fn idx_absurd_header_is_refused_without_allocating() {
    let d = tmp();
    let mut b = Vec::new();
    b.extend_from_slice(&0x0803u32.to_be_bytes());
    for v in [u32::MAX, 1_000_000, 1_000_000] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&[0; 100]);
    let p = write(d.path(), "huge.idx", &b);
    err_msg(data::load(&p));
    let p = write(d.path(), "huge.gz", &gz(&b));
    err_msg(data::load(&p));
    let mut b = Vec::new();
    b.extend_from_slice(&0x0803u32.to_be_bytes());
    for v in [1_000_000u32, 1000, 1000] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    let p = write(d.path(), "big.gz", &gz(&b));
    assert!(err_msg(data::load(&p)).contains("truncated"));
}

#[test]
fn npy_f32_and_u8_roundtrip() {
    let d = tmp();
    // (N, C, H, W) = (2, 3, 4, 5): value = index.
    let v: Vec<f32> = (0..120).map(|i| i as f32 * 0.5 - 3.0).collect();
    let p = write(
        d.path(),
        "a.npy",
        &npy_bytes("<f4", false, &[2, 3, 4, 5], &f32_bytes(&v)),
    );
    let ds = data::load(&p).unwrap();
    assert_eq!(ds.images.shape(), &[2, 3, 4, 5]);
    let at = |n: usize, c: usize, h: usize, w: usize| ((n * 3 + c) * 4 + h) * 5 + w;
    assert_eq!(ds.images[[1, 2, 3, 1]], v[at(1, 2, 3, 1)]);

    // (N, H, W) becomes C = 1; gzip wrapping works for .npy too.
    let p = write(
        d.path(),
        "b.npy.gz",
        &gz(&npy_bytes("<f4", false, &[4, 6, 5], &f32_bytes(&v))),
    );
    let ds = data::load(&p).unwrap();
    assert_eq!(ds.images.shape(), &[4, 1, 6, 5]);
    assert_eq!(ds.images[[3, 0, 2, 4]], v[3 * 30 + 2 * 5 + 4]);

    // uint8 is scaled by 1/255 (raw keeps the bytes).
    let bytes: Vec<u8> = (0..60).map(|i| (i * 4) as u8).collect();
    let p = write(
        d.path(),
        "c.npy",
        &npy_bytes("|u1", false, &[3, 4, 5], &bytes),
    );
    let ds = data::load(&p).unwrap();
    assert_eq!(ds.images.shape(), &[3, 1, 4, 5]);
    assert_eq!(
        ds.images[[2, 0, 1, 2]],
        bytes[2 * 20 + 5 + 2] as f32 / 255.0
    );
    let (raw, kind) = data::load_raw(&p).unwrap();
    assert_eq!(kind, PixelKind::U8);
    assert_eq!(raw.images[[2, 0, 1, 2]], bytes[47] as f32);

    // Big-endian float32.
    let be: Vec<u8> = v.iter().flat_map(|x| x.to_be_bytes()).collect();
    let p = write(
        d.path(),
        "d.npy",
        &npy_bytes(">f4", false, &[2, 3, 4, 5], &be),
    );
    assert_eq!(
        data::load(&p).unwrap().images[[1, 2, 3, 1]],
        v[at(1, 2, 3, 1)]
    );

    // Fortran order: the file holds the array column-major.
    let (n, c, h, w) = (2, 3, 4, 5);
    let mut fort = vec![0f32; 120];
    for ni in 0..n {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    fort[ni + n * (ci + c * (hi + h * wi))] = v[at(ni, ci, hi, wi)];
                }
            }
        }
    }
    let p = write(
        d.path(),
        "e.npy",
        &npy_bytes("<f4", true, &[2, 3, 4, 5], &f32_bytes(&fort)),
    );
    let ds = data::load(&p).unwrap();
    assert_eq!(ds.images.as_slice().unwrap(), &v[..]);

    // The writer helper produces what the reader accepts.
    let p = d.path().join("f.npy");
    npy::write_images_f32(&p, &ds.images).unwrap();
    assert_eq!(data::load(&p).unwrap().images, ds.images);
}

#[test]
fn npy_version2_header() {
    let d = tmp();
    let mut b = npy_bytes("<f4", false, &[1, 2, 2], &f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
    // Rewrite as version 2.0: 4-byte header length.
    let hl = u16::from_le_bytes([b[8], b[9]]) as u32;
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&hl.to_le_bytes());
    v2.extend_from_slice(&b.split_off(10));
    let p = write(d.path(), "v2.npy", &v2);
    assert_eq!(data::load(&p).unwrap().images[[0, 0, 1, 0]], 3.0);
}

#[test]
fn npy_labels() {
    let d = tmp();
    let p = write(
        d.path(),
        "u8.npy",
        &npy_bytes("|u1", false, &[4], &[0, 9, 3, 255]),
    );
    assert_eq!(data::load_labels(&p).unwrap(), vec![0, 9, 3, 255]);
    let i64s: Vec<u8> = [7i64, 0, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
    let p = write(d.path(), "i8.npy", &npy_bytes("<i8", false, &[3], &i64s));
    assert_eq!(data::load_labels(&p).unwrap(), vec![7, 0, 2]);
    let i32s: Vec<u8> = [1i32, 5].iter().flat_map(|x| x.to_be_bytes()).collect();
    let p = write(d.path(), "i4.npy", &npy_bytes(">i4", false, &[2], &i32s));
    assert_eq!(data::load_labels(&p).unwrap(), vec![1, 5]);

    let bad: Vec<u8> = [1i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let p = write(d.path(), "neg.npy", &npy_bytes("<i8", false, &[2], &bad));
    let m = err_msg(data::load_labels(&p));
    assert!(m.contains("label -1 at index 1"), "{m}");
    let p = write(
        d.path(),
        "f.npy",
        &npy_bytes("<f4", false, &[1], &f32_bytes(&[1.0])),
    );
    let m = err_msg(data::load_labels(&p));
    assert!(m.contains("'<f4'") && m.contains("integer"), "{m}");
    let p = write(
        d.path(),
        "2d.npy",
        &npy_bytes("|u1", false, &[2, 2], &[0, 1, 2, 3]),
    );
    assert!(err_msg(data::load_labels(&p)).contains("1-D"));
}

#[test]
fn npy_bad_inputs() {
    let d = tmp();
    let full = npy_bytes("<f4", false, &[10, 8, 8], &f32_bytes(&[0.5; 640]));
    let p = write(d.path(), "cut.npy", &full[..full.len() - 100]);
    let m = err_msg(data::load(&p));
    assert!(m.contains("cut.npy") && m.contains("truncated"), "{m}");
    assert!(
        m.contains(&full.len().to_string()) && m.contains(&(full.len() - 100).to_string()),
        "{m}"
    );
    let p = write(d.path(), "cut.npy.gz", &gz(&full[..full.len() - 100]));
    assert!(err_msg(data::load(&p)).contains("truncated"));
    let p = write(d.path(), "hdr.npy", &full[..30]);
    assert!(err_msg(data::load(&p)).contains("truncated"));
    // A damaged key holding a newline (found by tests/fuzz_inputs.rs): the header is quoted
    // with its control characters escaped, so the message stays one line.
    let mut bad_key = full.clone();
    bad_key[12] = b'\n';
    let p = write(d.path(), "key.npy", &bad_key);
    let m = err_msg(data::load(&p));
    assert!(
        m.contains("malformed .npy header") && m.contains("\\n"),
        "{m}"
    );

    for (descr, name) in [("<f8", "float64"), ("<i4", "int32"), ("|b1", "bool")] {
        let p = write(
            d.path(),
            "dt.npy",
            &npy_bytes(descr, false, &[1, 2, 2], &[0; 32]),
        );
        let m = err_msg(data::load(&p));
        assert!(
            m.contains(descr) && m.contains(name) && m.contains("float32") && m.contains("uint8"),
            "{m}"
        );
    }
    for shape in [&[4][..], &[2, 2], &[1, 1, 1, 2, 2]] {
        let p = write(
            d.path(),
            "rank.npy",
            &npy_bytes("<f4", false, shape, &f32_bytes(&[0.0; 4])),
        );
        let m = err_msg(data::load(&p));
        assert!(
            m.contains(&format!("rank {}", shape.len())) && m.contains("(N, C, H, W)"),
            "{m}"
        );
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.25f32; 32];
        v[20] = bad;
        let p = write(
            d.path(),
            "nan.npy",
            &npy_bytes("<f4", false, &[2, 4, 4], &f32_bytes(&v)),
        );
        let m = err_msg(data::load(&p));
        assert!(
            m.contains("non-finite") && m.contains("image 1") && m.contains("nan.npy"),
            "{m}"
        );
    }
    // A header promising ~10^12 images: refused before any allocation.
    let p = write(
        d.path(),
        "huge.npy",
        &npy_bytes("<f4", false, &[1_000_000_000_000, 28, 28], &[0; 64]),
    );
    assert!(err_msg(data::load(&p)).contains("truncated"));
    let p = write(
        d.path(),
        "huge.npy.gz",
        &gz(&npy_bytes(
            "|u1",
            false,
            &[1_000_000_000_000, 28, 28],
            &[0; 64],
        )),
    );
    assert!(err_msg(data::load(&p)).contains("truncated"));
    let p = write(
        d.path(),
        "overflow.npy",
        &npy_bytes("<f4", false, &[usize::MAX, 4, 4], &[0; 64]),
    );
    err_msg(data::load(&p));
    // Structured dtype and malformed headers.
    let mut s = b"\x93NUMPY\x01\x00".to_vec();
    let h = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }\n";
    s.extend_from_slice(&(h.len() as u16).to_le_bytes());
    s.extend_from_slice(h.as_bytes());
    let p = write(d.path(), "rec.npy", &s);
    assert!(err_msg(data::load(&p)).contains("structured"));
    let mut s = b"\x93NUMPY\x01\x00".to_vec();
    let h = "{'descr': '<f4', 'fortran_order': Nope, 'shape': (2,), }\n";
    s.extend_from_slice(&(h.len() as u16).to_le_bytes());
    s.extend_from_slice(h.as_bytes());
    let p = write(d.path(), "mal.npy", &s);
    assert!(err_msg(data::load(&p)).contains("malformed"));
    let mut s = b"\x93NUMPY\x09\x00".to_vec();
    s.extend_from_slice(&[0; 10]);
    let p = write(d.path(), "ver.npy", &s);
    assert!(err_msg(data::load(&p)).contains("version 9.0"));
}

#[test]
fn embedded_digits_are_real_mnist() {
    let train = data::embedded_digits(Split::Train);
    let test = data::embedded_digits(Split::Test);
    assert_eq!(train.images.shape(), &[8000, 1, 28, 28]);
    assert_eq!(test.images.shape(), &[2000, 1, 28, 28]);
    for ds in [&train, &test] {
        let labels = ds.labels.as_ref().unwrap();
        assert_eq!(labels.len(), ds.images.shape()[0]);
        let mut count = [0usize; 10];
        for &l in labels {
            count[l as usize] += 1;
        }
        assert!(
            count.iter().all(|&c| c > ds.images.shape()[0] / 20),
            "{count:?}"
        );
        assert!(ds.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // MNIST digits have ink (1.0) and a black border.
        assert!(ds.images.iter().any(|&v| v == 1.0));
        assert_eq!(ds.images[[0, 0, 0, 0]], 0.0);
        ds.check_finite("embedded").unwrap();
    }
}

#[test]
fn fashion_mnist_real_files() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let (ip, lp) = (
        dir.join("train-images-idx3-ubyte.gz"),
        dir.join("train-labels-idx1-ubyte.gz"),
    );
    if !ip.exists() || !lp.exists() {
        println!(
            "skipping: Fashion-MNIST is not installed at {}",
            dir.display()
        );
        return;
    }
    let ds = data::load_labelled(&ip, &lp).unwrap();
    assert_eq!(ds.images.shape(), &[60000, 1, 28, 28]);
    assert!(ds.labels.as_ref().unwrap().iter().all(|&l| l < 10));
    assert!(ds.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
    let t = dir.join("t10k-images-idx3-ubyte.gz");
    if t.exists() {
        assert_eq!(data::load(&t).unwrap().images.shape(), &[10000, 1, 28, 28]);
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: STL-10, CIFAR-10, image folders, preprocessing, streaming sources.
// ---------------------------------------------------------------------------------------------

use calm_gpu::data::preprocess::{self, symmetric_eigen, zca_channel};
use calm_gpu::data::{
    Concat, Dataset, FileFormat, Preprocess, Preprocessed, Stl10File, cifar, folder, stl10,
};

/// Deterministic pseudo-random numbers for test data (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The value of STL-10 test image `n`, channel `c`, row `y`, column `x`.
fn stl_px(n: usize, c: usize, y: usize, x: usize) -> u8 {
    ((n * 7 + c * 3 + y + 2 * x) % 251) as u8
}

/// `n` images in STL-10's published layout: byte `c*9216 + x*96 + y` is (row y, column x).
fn stl_images(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n * stl10::IMAGE_BYTES];
    for i in 0..n {
        for c in 0..3 {
            for x in 0..96 {
                for y in 0..96 {
                    b[i * 27648 + c * 9216 + x * 96 + y] = stl_px(i, c, y, x);
                }
            }
        }
    }
    b
}

#[test]
fn stl10_layout_and_labels() {
    let d = tmp();
    let mut bytes = stl_images(3);
    // One unmistakable pixel: image 1, channel 2 (blue), row 5, column 70.
    bytes[27648 + 2 * 9216 + 70 * 96 + 5] = 255;
    let xp = write(d.path(), "train_X.bin", &bytes);
    let yp = write(d.path(), "train_y.bin", &[1, 10, 4]);
    assert_eq!(data::detect_format(&xp).unwrap(), FileFormat::Stl10);

    let raw = stl10::read_images_raw(&xp).unwrap();
    assert_eq!(raw.images.shape(), &[3, 3, 96, 96]);
    assert_eq!(raw.images[[1, 2, 5, 70]], 255.0);
    assert_eq!(raw.images[[1, 2, 70, 5]], stl_px(1, 2, 70, 5) as f32);
    for ((n, c, y, x), &v) in raw.images.indexed_iter() {
        if (n, c, y, x) != (1, 2, 5, 70) {
            assert_eq!(v, stl_px(n, c, y, x) as f32, "at {n},{c},{y},{x}");
        }
    }
    let ds = data::load_labelled(&xp, &yp).unwrap();
    assert_eq!(ds.images[[1, 2, 5, 70]], 1.0);
    assert_eq!(ds.images[[0, 1, 3, 4]], stl_px(0, 1, 3, 4) as f32 / 255.0);
    assert_eq!(ds.labels.as_deref(), Some(&[0u8, 9, 3][..]));
    let ds2 = stl10::read_labelled(&xp, &yp, Preprocess::Scale).unwrap();
    assert_eq!(ds2.images, ds.images);
    assert_eq!(stl10::read_images(&xp).unwrap().images, ds.images);

    // Streaming gives the same images, any sub-range.
    let f = Stl10File::open(&xp).unwrap();
    assert_eq!((f.len(), f.shape()), (3, (3, 96, 96)));
    let mut out = vec![0f32; 2 * 27648];
    f.read_into(1, 2, &mut out).unwrap();
    assert_eq!(&out[..], &raw.images.as_slice().unwrap()[27648..]);
    assert!(err_msg(f.read_into(2, 2, &mut out)).contains("holds 3"));
    let src = data::open_source(&xp, None).unwrap();
    let mut all = vec![0f32; 3 * 27648];
    src.read_into(0, 3, &mut all).unwrap();
    assert_eq!(&all[..], ds.images.as_slice().unwrap());

    // Bad labels and sizes.
    let p = write(d.path(), "bad_y.bin", &[1, 0, 3]);
    let m = err_msg(data::load_labels(&p));
    assert!(
        m.contains("label byte 0 at index 1") && m.contains("1..=10"),
        "{m}"
    );
    let p = write(d.path(), "bad2_y.bin", &[11]);
    assert!(err_msg(stl10::read_labels(&p)).contains("label byte 11"));
    assert!(err_msg(data::load(&yp)).contains("labels file"));
    assert!(err_msg(data::open_source(&yp, None).map(|s| s.len())).contains("labels file"));
    assert!(err_msg(data::load_labels(&xp)).contains("image file"));
    let p = write(d.path(), "short_y.bin", &[1, 2]);
    let m = err_msg(data::load_labelled(&xp, &p));
    assert!(m.contains("2 labels for 3 images"), "{m}");
    let p = write(d.path(), "cut_X.bin", &bytes[..27648 * 2 + 100]);
    let m = err_msg(Stl10File::open(&p));
    assert!(m.contains("cut_X.bin") && m.contains("27648"), "{m}");
    err_msg(data::load(&p));
    let p = write(d.path(), "empty_X.bin", b"");
    err_msg(Stl10File::open(&p));
    assert!(matches!(
        Stl10File::open(&d.path().join("none_X.bin")),
        Err(DataError::Io { .. })
    ));
}

#[test]
fn stl10_streaming_with_preprocessing_and_concat() {
    let d = tmp();
    let mut rng = Rng(7);
    let bytes: Vec<u8> = (0..4 * 27648).map(|_| (rng.next() % 256) as u8).collect();
    let up = write(d.path(), "unlabeled_X.bin", &bytes);
    let tp = write(d.path(), "train_X.bin", &bytes[..27648 * 2]);
    let stream = Preprocessed::new(Stl10File::open(&up).unwrap(), Preprocess::ZcaImage);
    let mut whole = stl10::read_images_raw(&up).unwrap();
    Preprocess::ZcaImage.apply_dataset(&mut whole).unwrap();
    let mut out = vec![0f32; 2 * 27648];
    stream.read_into(2, 2, &mut out).unwrap();
    assert_eq!(&out[..], &whole.images.as_slice().unwrap()[2 * 27648..]);
    assert!(out.iter().all(|v| v.is_finite()));

    // train (2) + unlabeled (4), read across the boundary.
    let cat = Concat::new(vec![
        Box::new(Stl10File::open(&tp).unwrap()),
        Box::new(Stl10File::open(&up).unwrap()),
    ])
    .unwrap();
    assert_eq!(cat.len(), 6);
    let cat = Preprocessed::new(cat, Preprocess::ZcaImage);
    let mut out = vec![0f32; 3 * 27648];
    cat.read_into(1, 3, &mut out).unwrap();
    let w = whole.images.as_slice().unwrap();
    assert_eq!(&out[..27648], &w[27648..2 * 27648]); // train image 1 = unlabeled image 1
    assert_eq!(&out[27648..], &w[..2 * 27648]); // unlabeled images 0, 1
    assert!(err_msg(cat.read_into(4, 3, &mut out)).contains("holds 6"));
}

#[test]
fn concat_checks_shapes() {
    let a = Dataset::new(ndarray::Array4::from_elem((2, 1, 2, 2), 1.0), None);
    let b = Dataset::new(ndarray::Array4::from_elem((3, 1, 2, 2), 2.0), None);
    let c = Dataset::new(ndarray::Array4::from_elem((1, 1, 3, 2), 0.0), None);
    let cat = Concat::new(vec![Box::new(a.clone()), Box::new(b)]).unwrap();
    let mut out = vec![0f32; 3 * 4];
    cat.read_into(1, 3, &mut out).unwrap();
    assert_eq!(
        out,
        [1.0; 4]
            .iter()
            .chain(&[2.0; 8])
            .copied()
            .collect::<Vec<_>>()
    );
    let m = err_msg(Concat::new(vec![Box::new(a), Box::new(c)]));
    assert!(m.contains("source 1 has images 1x3x2"), "{m}");
    err_msg(Concat::new(vec![]));
}

/// CIFAR-10 records: label, then R, G, B planes of 32x32 row-major.
fn cifar_records(labels: &[u8], seed: usize) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        b.push(l);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    b.push(((seed + i * 5 + c * 11 + y * 3 + x) % 256) as u8);
                }
            }
        }
    }
    b
}

#[test]
fn cifar10_batches() {
    let d = tmp();
    let p1 = write(d.path(), "data_batch_1.bin", &cifar_records(&[3, 9], 0));
    let mut second = cifar_records(&[0], 100);
    second[1 + 1024 + 4 * 32 + 30] = 255; // green, row 4, column 30
    let p2 = write(d.path(), "data_batch_2.bin", &second);
    let ds = cifar::read_batches_raw(&[&p1, &p2]).unwrap();
    assert_eq!(ds.images.shape(), &[3, 3, 32, 32]);
    assert_eq!(ds.labels.as_deref(), Some(&[3u8, 9, 0][..]));
    assert_eq!(ds.images[[2, 1, 4, 30]], 255.0);
    assert_eq!(ds.images[[1, 2, 7, 1]], (5 + 22 + 21 + 1) as f32);
    assert_eq!(ds.images[[2, 0, 31, 31]], (100 + 93 + 31) as f32);
    let scaled = cifar::read_batches(&[&p1, &p2]).unwrap();
    assert_eq!(scaled.images[[2, 1, 4, 30]], 1.0);
    // `load` recognises the published names and keeps the labels.
    assert_eq!(data::detect_format(&p1).unwrap(), FileFormat::Cifar10);
    let one = data::load(&p2).unwrap();
    assert_eq!(one.labels.as_deref(), Some(&[0u8][..]));
    assert_eq!(one.images[[0, 1, 4, 30]], 1.0);

    let full = cifar_records(&[1, 2], 0);
    let p = write(d.path(), "test_batch.bin", &full[..full.len() - 1]);
    let m = err_msg(cifar::read_batches(&[&p]));
    assert!(m.contains("test_batch.bin") && m.contains("3073"), "{m}");
    let p = write(d.path(), "c100.bin", &vec![0u8; 3074 * 2]);
    assert!(err_msg(cifar::read_batches(&[&p])).contains("CIFAR-100"));
    let p = write(d.path(), "badlabel.bin", &cifar_records(&[1, 10], 0));
    let m = err_msg(cifar::read_batches(&[&p1, &p]));
    assert!(m.contains("record 1: label 10"), "{m}");
    assert!(matches!(
        cifar::read_batches(&[d.path().join("nope.bin")]),
        Err(DataError::Io { .. })
    ));
    err_msg(cifar::read_batches::<&Path>(&[]));
}

fn save_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder() {
    let d = tmp();
    let root = d.path().join("root");
    for class in ["dog", "cat"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    save_rgb(&root.join("cat/b.png"), 5, 4, |x, y| {
        [x as u8 * 10, y as u8 * 20, 7]
    });
    save_rgb(&root.join("cat/a.PNG"), 5, 4, |_, _| [1, 2, 3]);
    save_rgb(&root.join("dog/z.png"), 5, 4, |x, y| {
        [(x + y) as u8, 0, 200]
    });
    std::fs::write(root.join("dog/notes.txt"), "ignored").unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    let (ds, classes) = folder::read_folder_raw(&root).unwrap();
    assert_eq!(classes, ["cat", "dog"]);
    assert_eq!(ds.images.shape(), &[3, 3, 4, 5]);
    assert_eq!(ds.labels.as_deref(), Some(&[0u8, 0, 1][..]));
    assert_eq!(ds.images[[0, 2, 0, 0]], 3.0); // a.PNG sorts before b.png
    assert_eq!(ds.images[[1, 0, 2, 3]], 30.0); // b.png red at row 2, column 3
    assert_eq!(ds.images[[1, 1, 2, 3]], 40.0);
    assert_eq!(ds.images[[2, 0, 3, 4]], 7.0);
    assert_eq!(data::detect_format(&root).unwrap(), FileFormat::Folder);
    let loaded = data::load(&root).unwrap();
    assert_eq!(loaded.images[[2, 2, 0, 0]], 200.0 / 255.0);
    assert_eq!(folder::read_folder(&root).unwrap().0.images, loaded.images);

    // Grayscale folder, with a JPEG.
    let g = d.path().join("gray");
    std::fs::create_dir_all(g.join("0")).unwrap();
    image::GrayImage::from_fn(6, 3, |x, _| image::Luma([x as u8 * 40]))
        .save(g.join("0/a.png"))
        .unwrap();
    image::GrayImage::from_fn(6, 3, |_, _| image::Luma([128]))
        .save(g.join("0/b.jpg"))
        .unwrap();
    let (ds, _) = folder::read_folder_raw(&g).unwrap();
    assert_eq!(ds.images.shape(), &[2, 1, 3, 6]);
    assert_eq!(ds.images[[0, 0, 1, 5]], 200.0);
    assert!((ds.images[[1, 0, 2, 2]] - 128.0).abs() <= 2.0);

    // Mismatches name the offending file.
    save_rgb(&root.join("dog/y.png"), 6, 4, |_, _| [0, 0, 0]);
    let m = err_msg(folder::read_folder(&root));
    assert!(
        m.contains("y.png") && m.contains("6x4") && m.contains("5x4"),
        "{m}"
    );
    std::fs::remove_file(root.join("dog/y.png")).unwrap();
    image::GrayImage::from_fn(5, 4, |_, _| image::Luma([0]))
        .save(root.join("dog/x.png"))
        .unwrap();
    let m = err_msg(folder::read_folder(&root));
    assert!(m.contains("x.png") && m.contains("1 channel"), "{m}");
    std::fs::remove_file(root.join("dog/x.png")).unwrap();
    std::fs::write(root.join("dog/broken.png"), b"not a png at all").unwrap();
    let m = err_msg(folder::read_folder(&root));
    assert!(m.contains("broken.png"), "{m}");
    std::fs::remove_file(root.join("dog/broken.png")).unwrap();
    std::fs::create_dir_all(root.join("emu")).unwrap();
    let m = err_msg(folder::read_folder(&root));
    assert!(m.contains("emu") && m.contains("no .png"), "{m}");
    let m = err_msg(folder::read_folder(&d.path().join("root/cat/a.PNG")));
    assert!(m.contains("not a folder"), "{m}");
    let e = d.path().join("empty");
    std::fs::create_dir_all(&e).unwrap();
    assert!(err_msg(folder::read_folder(&e)).contains("no class"));
}

#[test]
fn preprocess_names() {
    for p in [Preprocess::Scale, Preprocess::ZcaImage, Preprocess::None] {
        assert_eq!(p.to_string().parse::<Preprocess>().unwrap(), p);
    }
    assert_eq!(
        "zca-image".parse::<Preprocess>().unwrap(),
        Preprocess::ZcaImage
    );
    assert!(err_msg("zca".parse::<Preprocess>()).contains("scale, zca-image, none"));
    assert_eq!(Preprocess::default_for(PixelKind::U8), Preprocess::Scale);
    assert_eq!(Preprocess::default_for(PixelKind::F32), Preprocess::None);
    for f in ["idx", "npy", "stl10", "cifar10", "folder"] {
        assert_eq!(f.parse::<FileFormat>().unwrap().to_string(), f);
    }
    // Preprocessing choices through `load_with` on a byte source.
    let d = tmp();
    let p = write(d.path(), "a", &idx_images(2, 3, 4));
    let none = data::load_with(&p, Some(Preprocess::None)).unwrap();
    assert_eq!(none.images[[1, 0, 2, 3]], (31 + 14 + 3) as f32);
    let z = data::load_with(&p, Some(Preprocess::ZcaImage)).unwrap();
    assert!(z.images.iter().all(|v| v.is_finite()));
}

/// Reference eigendecomposition: cyclic Jacobi, independent of the library's Householder + QL.
/// Returns eigenvalues and eigenvectors as columns of `v` (row-major n x n).
fn jacobi(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| (0..n).filter(move |&q| q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q].powi(2))
            .sum();
        if off.sqrt() <= 1e-15 * norm.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// SPEC.md's per-channel ZCA written out plainly with the Jacobi reference.
fn zca_reference(x: &[f32], h: usize, w: usize) -> Vec<f64> {
    let mut xc = vec![0.0f64; h * w];
    for i in 0..h {
        let mean = x[i * w..(i + 1) * w].iter().map(|&v| v as f64).sum::<f64>() / w as f64;
        for j in 0..w {
            xc[i * w + j] = x[i * w + j] as f64 - mean;
        }
    }
    let mut cov = vec![0.0f64; h * h];
    for i in 0..h {
        for j in 0..h {
            cov[i * h + j] = (0..w).map(|k| xc[i * w + k] * xc[j * w + k]).sum::<f64>() / w as f64;
        }
        cov[i * h + i] += 1e-7;
    }
    let (d, v) = jacobi(&cov, h);
    let s: Vec<f64> = d
        .iter()
        .map(|&d| d.max(0.0).sqrt())
        .map(|s| if s < 1e-5 { s + 1.0 } else { s })
        .collect();
    // out = V diag(1/s) V^T xc
    let mut out = vec![0.0f64; h * w];
    for i in 0..h {
        for j in 0..w {
            let mut acc = 0.0;
            for e in 0..h {
                let proj: f64 = (0..h).map(|k| v[k * h + e] * xc[k * w + j]).sum();
                acc += v[i * h + e] * proj / s[e];
            }
            out[i * w + j] = acc;
        }
    }
    out
}

fn random_channel(rng: &mut Rng, h: usize, w: usize, scale: f64) -> Vec<f32> {
    (0..h * w).map(|_| (rng.unit() * scale) as f32).collect()
}

#[test]
fn symmetric_eigen_matches_definition() {
    let mut rng = Rng(99);
    let check = |a: &[f64], n: usize| {
        let (d, vt) = symmetric_eigen(a, n).unwrap();
        assert!(d.windows(2).all(|p| p[0] <= p[1]), "ascending");
        let scale = a.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        for i in 0..n {
            for j in 0..n {
                let dotv: f64 = (0..n).map(|k| vt[i * n + k] * vt[j * n + k]).sum();
                assert!(
                    (dotv - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10,
                    "orthonormal"
                );
            }
            // A v_i = d_i v_i
            for r in 0..n {
                let av: f64 = (0..n).map(|k| a[r * n + k] * vt[i * n + k]).sum();
                assert!(
                    (av - d[i] * vt[i * n + r]).abs() < 1e-10 * scale * n as f64,
                    "eigenpair"
                );
            }
        }
        let (dj, _) = jacobi(a, n);
        let mut dj = dj;
        dj.sort_by(f64::total_cmp);
        for (x, y) in d.iter().zip(&dj) {
            assert!((x - y).abs() < 1e-9 * scale, "{x} vs {y}");
        }
    };
    for n in [1, 2, 3, 7, 40] {
        let b: Vec<f64> = (0..n * n).map(|_| rng.unit() - 0.5).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = b[i * n + j] + b[j * n + i];
            }
        }
        check(&a, n);
    }
    // Repeated eigenvalues, zero matrix, diagonal.
    let n = 6;
    let mut id = vec![0.0; n * n];
    for i in 0..n {
        id[i * n + i] = if i < 3 { 2.0 } else { 5.0 };
    }
    check(&id, n);
    check(&[0.0; 25], 5);
    assert!(symmetric_eigen(&[f64::NAN], 1).is_err());
    assert!(symmetric_eigen(&[1.0, 2.0], 2).is_err());
}

#[test]
fn zca_image_matches_reference_and_whitens() {
    let mut rng = Rng(2026);
    // Square (as STL-10, rank deficient by the row centring), wide and tall channels, and the
    // 0..255 scale of raw bytes.
    for (h, w, scale) in [(96, 96, 255.0), (16, 40, 1.0), (12, 5, 1.0), (9, 9, 255.0)] {
        let x = random_channel(&mut rng, h, w, scale);
        let mut y = x.clone();
        zca_channel(&mut y, h, w).unwrap();
        let r = zca_reference(&x, h, w);
        let err = y
            .iter()
            .zip(&r)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        let mag = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            err < 1e-4 * mag.max(1.0),
            "{h}x{w}: max error {err} (values up to {mag})"
        );
    }
    // Full row rank (h < w): the whitened rows have covariance I - 1e-7 Cov^-1, i.e. ~ identity.
    let (h, w) = (16, 64);
    let mut y = random_channel(&mut rng, h, w, 255.0);
    zca_channel(&mut y, h, w).unwrap();
    for i in 0..h {
        let mean: f64 = y[i * w..(i + 1) * w].iter().map(|&v| v as f64).sum::<f64>() / w as f64;
        assert!(mean.abs() < 1e-4, "rows stay centred");
        for j in 0..h {
            let c: f64 = (0..w)
                .map(|k| y[i * w + k] as f64 * y[j * w + k] as f64)
                .sum::<f64>()
                / w as f64;
            assert!(
                (c - if i == j { 1.0 } else { 0.0 }).abs() < 1e-3,
                "cov[{i}][{j}] = {c}"
            );
        }
    }
    // A constant channel has zero variance: it becomes zeros, never NaN.
    let mut img: Vec<f32> = vec![42.0; 3 * 8 * 8];
    let other = random_channel(&mut rng, 8, 8, 1.0);
    img[64..128].copy_from_slice(&other);
    Preprocess::ZcaImage.apply(&mut img, (3, 8, 8)).unwrap();
    assert!(img.iter().all(|v| v.is_finite()));
    assert!(img[..64].iter().chain(&img[128..]).all(|&v| v == 0.0));
    let mut alone = other.clone();
    zca_channel(&mut alone, 8, 8).unwrap();
    assert_eq!(
        &img[64..128],
        &alone[..],
        "channels are whitened independently"
    );
    // Constant rows in an otherwise varied channel: still finite.
    let mut x = random_channel(&mut rng, 10, 10, 1.0);
    x[..20].iter_mut().for_each(|v| *v = 3.0);
    zca_channel(&mut x, 10, 10).unwrap();
    assert!(x.iter().all(|v| v.is_finite()));
    // Non-finite input and bad shapes are errors.
    let mut bad = vec![0.0f32; 4];
    bad[1] = f32::NAN;
    err_msg(zca_channel(&mut bad, 2, 2));
    err_msg(Preprocess::Scale.apply(&mut [0.0; 5], (1, 2, 2)));
    let _ = preprocess::ZCA_EPS;
}

#[test]
fn npy_streaming_source_and_cache_writer() {
    let d = tmp();
    let v: Vec<f32> = (0..5 * 2 * 3 * 4).map(|i| i as f32 * 0.25).collect();
    let p = write(
        d.path(),
        "a.npy",
        &npy_bytes("<f4", false, &[5, 2, 3, 4], &f32_bytes(&v)),
    );
    let f = data::NpyFile::open(&p).unwrap();
    assert_eq!(
        (f.len(), f.shape(), f.kind()),
        (5, (2, 3, 4), PixelKind::F32)
    );
    let mut out = vec![0f32; 2 * 24];
    f.read_into(3, 2, &mut out).unwrap();
    assert_eq!(&out[..], &v[72..]);
    assert!(err_msg(f.read_into(4, 2, &mut out)).contains("holds 5"));

    let bytes: Vec<u8> = (0..3 * 16).map(|i| i as u8).collect();
    let p = write(
        d.path(),
        "u.npy",
        &npy_bytes("|u1", false, &[3, 4, 4], &bytes),
    );
    let f = data::NpyFile::open(&p).unwrap();
    assert_eq!((f.shape(), f.kind()), ((1, 4, 4), PixelKind::U8));
    let mut out = vec![0f32; 16];
    f.read_into(2, 1, &mut out).unwrap();
    assert_eq!(out[5], 37.0);

    // Cache writer: preprocess once, stream later; the result equals preprocessing in memory.
    let mut rng = Rng(5);
    let raw: Vec<u8> = (0..3 * 27648).map(|_| (rng.next() % 256) as u8).collect();
    let xp = write(d.path(), "unlabeled_X.bin", &raw);
    let src = Preprocessed::new(Stl10File::open(&xp).unwrap(), Preprocess::ZcaImage);
    let cache = d.path().join("cache.npy");
    let mut seen = Vec::new();
    npy::write_source_f32(&cache, &src, 2, |n| seen.push(n)).unwrap();
    assert_eq!(seen, [2, 3]);
    let back = data::load(&cache).unwrap();
    let mut want = vec![0f32; 3 * 27648];
    src.read_into(0, 3, &mut want).unwrap();
    assert_eq!(back.images.as_slice().unwrap(), &want[..]);
    let streamed = data::NpyFile::open(&cache).unwrap();
    let mut got = vec![0f32; 27648];
    streamed.read_into(2, 1, &mut got).unwrap();
    assert_eq!(&got[..], &want[2 * 27648..]);

    // Refusals: gzip, Fortran order, truncation, NaN found while streaming.
    let p = write(
        d.path(),
        "z.npy.gz",
        &gz(&npy_bytes("<f4", false, &[1, 2, 2], &f32_bytes(&[0.0; 4]))),
    );
    assert!(err_msg(data::NpyFile::open(&p)).contains("gzipped"));
    let p = write(
        d.path(),
        "f.npy",
        &npy_bytes("<f4", true, &[2, 2, 2], &f32_bytes(&[0.0; 8])),
    );
    assert!(err_msg(data::NpyFile::open(&p)).contains("Fortran"));
    let full = npy_bytes("<f4", false, &[2, 2, 2], &f32_bytes(&[0.0; 8]));
    let p = write(d.path(), "t.npy", &full[..full.len() - 3]);
    assert!(err_msg(data::NpyFile::open(&p)).contains("truncated"));
    let mut vals = [0.0f32; 8];
    vals[6] = f32::NAN;
    let p = write(
        d.path(),
        "n.npy",
        &npy_bytes("<f4", false, &[2, 2, 2], &f32_bytes(&vals)),
    );
    let f = data::NpyFile::open(&p).unwrap();
    let mut out = vec![0f32; 8];
    let m = err_msg(f.read_into(0, 2, &mut out));
    assert!(m.contains("image 1") && m.contains("non-finite"), "{m}");
}

/// A subset that reaches past its source is refused, even where `start + len` would overflow.
#[test]
fn subsets_past_the_source_are_refused() {
    let d: std::sync::Arc<dyn calm_gpu::data::ImageSource> =
        std::sync::Arc::new(calm_gpu::data::embedded_digits(calm_gpu::data::Split::Test));
    assert!(calm_gpu::data::Subset::new(d.clone(), 1990, 10).is_ok());
    assert!(calm_gpu::data::Subset::new(d.clone(), 1990, 11).is_err());
    let Err(e) = calm_gpu::data::Subset::new(d, usize::MAX, 2) else {
        panic!("a subset from usize::MAX was accepted");
    };
    assert!(e.to_string().contains("asked of a source of 2000"), "{e}");
}
