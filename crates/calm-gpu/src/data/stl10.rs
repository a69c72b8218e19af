//! STL-10's binary files: `train_X.bin`, `test_X.bin`, `unlabeled_X.bin` (images) and
//! `train_y.bin`, `test_y.bin` (labels).
//!
//! Each image is 3 x 96 x 96 bytes, stored channel by channel and column-major within a channel
//! (the layout of the MATLAB arrays the set was published from): the byte at
//! `c * 9216 + x * 96 + y` is channel `c` at row `y`, column `x`. Readers here transpose to the
//! row-major `(C, H, W)` every engine expects. Labels are bytes 1..=10 and become 0..=9.
//!
//! `unlabeled_X.bin` is 2.9 GB, 11 GB once expanded to f32, so [`Stl10File`] reads it on demand:
//! each `read_into` fetches and converts only the images asked for.

use std::fs::File;
use std::path::{Path, PathBuf};

use ndarray::Array4;

use super::input::read_at;
use super::{DataError, Dataset, ImageSource, Preprocess, check_request};

/// Side of an STL-10 image.
pub const SIDE: usize = 96;
/// Channels of an STL-10 image.
pub const CHANNELS: usize = 3;
/// Bytes per image in the `_X.bin` files.
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// Images converted per disk read in [`Stl10File::read_into`] (about 7 MB).
const READ_CHUNK: usize = 256;

/// An STL-10 `_X.bin` image file read on demand, pixels as 0..=255 values (wrap it in
/// [`super::Preprocessed`] to scale or whiten while streaming).
#[derive(Debug)]
pub struct Stl10File {
    path: PathBuf,
    file: File,
    n: usize,
}

impl Stl10File {
    /// Opens the file and checks its size is a whole, non-zero number of images.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let name = path.display().to_string();
        let (file, meta) = super::input::open_file(path, "an STL-10 _X.bin file")?;
        let size = meta.len();
        if size == 0 || size % IMAGE_BYTES as u64 != 0 {
            return Err(DataError::Format {
                path: name,
                msg: format!(
                    "size {size} bytes is not a whole non-zero number of STL-10 images ({IMAGE_BYTES} bytes each: 3x96x96); the file is truncated or not an STL-10 _X.bin file"
                ),
            });
        }
        let n = usize::try_from(size / IMAGE_BYTES as u64).map_err(|_| DataError::Format {
            path: name.clone(),
            msg: "file too large for this platform".into(),
        })?;
        Ok(Stl10File {
            path: path.to_path_buf(),
            file,
            n,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every image into memory (0..=255 values). Meant for `train_X.bin` / `test_X.bin`;
    /// the unlabeled split would take 11 GB.
    pub fn to_dataset(&self) -> Result<Dataset, DataError> {
        let n = self.n;
        let mut px = vec![0f32; n * IMAGE_BYTES];
        for start in (0..n).step_by(READ_CHUNK) {
            let count = READ_CHUNK.min(n - start);
            self.read_into(
                start,
                count,
                &mut px[start * IMAGE_BYTES..(start + count) * IMAGE_BYTES],
            )?;
        }
        let images = Array4::from_shape_vec((n, CHANNELS, SIDE, SIDE), px).map_err(|e| {
            DataError::Invalid(format!(
                "{}: internal shape mismatch: {e}",
                self.path.display()
            ))
        })?;
        Ok(Dataset::new(images, None))
    }
}

impl ImageSource for Stl10File {
    fn len(&self) -> usize {
        self.n
    }
    fn shape(&self) -> (usize, usize, usize) {
        (CHANNELS, SIDE, SIDE)
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        check_request(self.n, IMAGE_BYTES, start, count, out.len())?;
        let mut buf = vec![0u8; READ_CHUNK.min(count.max(1)) * IMAGE_BYTES];
        let mut done = 0;
        while done < count {
            let k = READ_CHUNK.min(count - done);
            let bytes = &mut buf[..k * IMAGE_BYTES];
            let offset = (start + done) as u64 * IMAGE_BYTES as u64;
            read_at(&self.file, bytes, offset).map_err(|source| DataError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
            let dst = &mut out[done * IMAGE_BYTES..(done + k) * IMAGE_BYTES];
            for (src, img) in bytes
                .chunks_exact(IMAGE_BYTES)
                .zip(dst.chunks_exact_mut(IMAGE_BYTES))
            {
                transpose_image(src, img);
            }
            done += k;
        }
        Ok(())
    }
}

/// Column-major channels to row-major: `dst[c][y][x] = src[c*9216 + x*96 + y]`.
fn transpose_image(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src
        .chunks_exact(SIDE * SIDE)
        .zip(dst.chunks_exact_mut(SIDE * SIDE))
    {
        for (x, col) in s.chunks_exact(SIDE).enumerate() {
            for (y, &b) in col.iter().enumerate() {
                d[y * SIDE + x] = b as f32;
            }
        }
    }
}

/// Reads a whole `_X.bin` file as `(N, 3, 96, 96)` with pixels 0..=255.
pub fn read_images_raw(path: &Path) -> Result<Dataset, DataError> {
    Stl10File::open(path)?.to_dataset()
}

/// Reads a whole `_X.bin` file as `(N, 3, 96, 96)` with pixels `byte / 255`.
pub fn read_images(path: &Path) -> Result<Dataset, DataError> {
    let mut data = read_images_raw(path)?;
    Preprocess::Scale.apply_dataset(&mut data)?;
    Ok(data)
}

/// Reads a `_y.bin` labels file: bytes 1..=10, returned as 0..=9.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: name.clone(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(DataError::Format {
            path: name,
            msg: "labels file is empty".into(),
        });
    }
    bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| match b {
            1..=10 => Ok(b - 1),
            _ => Err(DataError::Format {
                path: name.clone(),
                msg: format!("label byte {b} at index {i} is outside 1..=10 (STL-10 numbers its classes from 1)"),
            }),
        })
        .collect()
}

/// Images and their labels (`train_X.bin` with `train_y.bin`, say); the counts must agree.
pub fn read_labelled(images: &Path, labels: &Path, pre: Preprocess) -> Result<Dataset, DataError> {
    let mut data = read_images_raw(images)?;
    pre.apply_dataset(&mut data)?;
    let y = read_labels(labels)?;
    data.with_labels(y).map_err(|e| {
        DataError::Invalid(format!(
            "{} with {}: {e}",
            images.display(),
            labels.display()
        ))
    })
}
