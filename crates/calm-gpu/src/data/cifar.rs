//! CIFAR-10's binary batches (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`).
//!
//! Each record is one label byte (0..=9) then 3072 pixel bytes: the 1024 red values, then green,
//! then blue, each a row-major 32 x 32 plane, which is already `(C, H, W)` order. Several batch
//! files are read as one dataset, in the order given.

use std::path::Path;

use ndarray::Array4;

use super::{DataError, Dataset, Preprocess};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixel bytes per record.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// Bytes per record (label + pixels).
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Reads and concatenates batch files as `(N, 3, 32, 32)` with pixels 0..=255 and labels.
pub fn read_batches_raw<P: AsRef<Path>>(paths: &[P]) -> Result<Dataset, DataError> {
    if paths.is_empty() {
        return Err(DataError::Invalid("CIFAR-10: no batch files given".into()));
    }
    // Check every size before reading anything, so a bad last file fails fast.
    let mut total = 0usize;
    for p in paths {
        let p = p.as_ref();
        let name = p.display().to_string();
        let meta = std::fs::metadata(p).map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?;
        let size = meta.len();
        if meta.is_dir() || size == 0 || size % RECORD_BYTES as u64 != 0 {
            let hint = if size > 0 && size % (RECORD_BYTES as u64 + 1) == 0 {
                "; its size fits CIFAR-100 records (2 label bytes), which are not supported"
            } else {
                "; the file is truncated or not a CIFAR-10 batch"
            };
            return Err(DataError::Format {
                path: name,
                msg: format!(
                    "size {size} bytes is not a whole non-zero number of CIFAR-10 records ({RECORD_BYTES} bytes: 1 label + 3x32x32 pixels){hint}"
                ),
            });
        }
        total += (size / RECORD_BYTES as u64) as usize;
    }
    let mut px = Vec::with_capacity(total * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(total);
    for p in paths {
        let p = p.as_ref();
        let name = p.display().to_string();
        let bytes = std::fs::read(p).map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?;
        if bytes.len() % RECORD_BYTES != 0 {
            return Err(DataError::Format {
                path: name,
                msg: "file changed size while being read".into(),
            });
        }
        for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            if rec[0] > 9 {
                return Err(DataError::Format {
                    path: name,
                    msg: format!("record {i}: label {} is outside 0..=9", rec[0]),
                });
            }
            labels.push(rec[0]);
            px.extend(rec[1..].iter().map(|&b| b as f32));
        }
    }
    let n = labels.len();
    let images = Array4::from_shape_vec((n, 3, SIDE, SIDE), px)
        .map_err(|e| DataError::Invalid(format!("CIFAR-10: internal shape mismatch: {e}")))?;
    Ok(Dataset::new(images, Some(labels)))
}

/// [`read_batches_raw`] with pixels `byte / 255`.
pub fn read_batches<P: AsRef<Path>>(paths: &[P]) -> Result<Dataset, DataError> {
    let mut data = read_batches_raw(paths)?;
    Preprocess::Scale.apply_dataset(&mut data)?;
    Ok(data)
}
