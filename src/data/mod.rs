//! Datasets: readers for the formats calm-gpu accepts, preprocessing, and the embedded sample.
//!
//! Every engine reads images through [`ImageSource`], so a dataset can live in memory
//! ([`Dataset`]) or stream from a file in chunks (large files such as STL-10's unlabeled split).

use ndarray::Array4;

/// What can go wrong while reading data. Each message is one line saying what and where.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

/// A read-only collection of `N` images of `C x H x W` f32 pixels (already preprocessed).
pub trait ImageSource: Send + Sync {
    /// Number of images `N`.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)`.
    fn shape(&self) -> (usize, usize, usize);
    /// Writes images `start .. start + count` into `out` (length `count * C * H * W`), in
    /// `(n, c, h, w)` row-major order.
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError>;
}

/// A dataset held in memory: images `(N, C, H, W)` and optional labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Array4<f32>,
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    pub fn new(images: Array4<f32>, labels: Option<Vec<u8>>) -> Self {
        let images = if images.is_standard_layout() {
            images
        } else {
            images.as_standard_layout().to_owned()
        };
        Self { images, labels }
    }

    /// Fails on the first NaN or infinity, naming the image.
    pub fn check_finite(&self, what: &str) -> Result<(), DataError> {
        let per = self.images.len() / self.images.shape()[0].max(1);
        if let Some(i) = self.images.iter().position(|v| !v.is_finite()) {
            return Err(DataError::Invalid(format!(
                "{what}: image {} holds a non-finite value (NaN or infinity); clean the data first",
                i / per.max(1)
            )));
        }
        Ok(())
    }
}

impl ImageSource for Dataset {
    fn len(&self) -> usize {
        self.images.shape()[0]
    }
    fn shape(&self) -> (usize, usize, usize) {
        let s = self.images.shape();
        (s[1], s[2], s[3])
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        let per = self.images.len() / self.len().max(1);
        let flat = self.images.as_slice().expect("standard layout");
        out.copy_from_slice(&flat[start * per..(start + count) * per]);
        Ok(())
    }
}
