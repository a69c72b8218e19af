//! A folder of image files, one sub-folder per class: `root/<class>/*.png|*.jpg|*.jpeg`.
//!
//! Classes are the sub-folder names sorted by name (byte order), labelled 0, 1, ...; files are
//! read in name order within a class, so the dataset is the same on every machine. The content,
//! not the extension, decides how a file is decoded; the extension only selects which files are
//! images (other files and hidden entries are skipped). Grayscale images give one channel, colour
//! images three; an alpha channel is dropped; 16-bit images are reduced to 8 bits. Every image
//! must have the same size and channel count: the model's patch grid depends on it.

use std::fs;
use std::path::{Path, PathBuf};

use ndarray::Array4;
use rayon::prelude::*;

use super::{DataError, Dataset, Preprocess};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Images of a class folder tree with labels, pixels 0..=255; also returns the class names
/// (index = label).
pub fn read_folder_raw(root: &Path) -> Result<(Dataset, Vec<String>), DataError> {
    let io_err = |p: &Path, source| DataError::Io {
        path: p.display().to_string(),
        source,
    };
    let fmt_err = |p: &Path, msg: String| DataError::Format {
        path: p.display().to_string(),
        msg,
    };
    let meta = fs::metadata(root).map_err(|e| io_err(root, e))?;
    if !meta.is_dir() {
        return Err(fmt_err(
            root,
            "is not a folder (expected root/<class>/<image files>)".into(),
        ));
    }
    let mut classes: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| io_err(root, e))? {
        let entry = entry.map_err(|e| io_err(root, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        classes.push((name, path));
    }
    classes.sort();
    if classes.is_empty() {
        return Err(fmt_err(
            root,
            "holds no class sub-folders (expected root/<class>/<image files>)".into(),
        ));
    }
    if classes.len() > 256 {
        return Err(fmt_err(
            root,
            format!(
                "holds {} class folders; at most 256 are supported",
                classes.len()
            ),
        ));
    }
    let mut files: Vec<(u8, PathBuf)> = Vec::new();
    for (label, (_, dir)) in classes.iter().enumerate() {
        let mut found: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            let is_image = path
                .extension()
                .map(|e| EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
                .unwrap_or(false);
            if !hidden && is_image && path.is_file() {
                found.push(path);
            }
        }
        if found.is_empty() {
            return Err(fmt_err(
                dir,
                "class folder holds no .png/.jpg/.jpeg images".into(),
            ));
        }
        found.sort();
        // `classes.len() <= 256`, so the index fits in a byte.
        files.extend(found.into_iter().map(|p| (label as u8, p)));
    }
    let decoded: Vec<Result<Decoded, DataError>> =
        files.par_iter().map(|(_, p)| decode(p)).collect();
    let mut reference: Option<(usize, u32, u32, &Path)> = None;
    let mut px: Vec<f32> = Vec::new();
    for (result, (_, path)) in decoded.into_iter().zip(&files) {
        let (c, w, h, bytes) = result?;
        match reference {
            None => {
                reference = Some((c, w, h, path));
                px.reserve(files.len() * c * (w as usize) * (h as usize));
            }
            Some((c0, w0, h0, first)) if (c0, w0, h0) != (c, w, h) => {
                return Err(fmt_err(
                    path,
                    format!(
                        "image is {w}x{h} with {c} channel(s) but {} is {w0}x{h0} with {c0}; all images must match",
                        first.display()
                    ),
                ));
            }
            Some(_) => {}
        }
        // Interleaved (H, W, C) to planar (C, H, W).
        let plane = (w as usize) * (h as usize);
        for ch in 0..c {
            px.extend((0..plane).map(|i| bytes[i * c + ch] as f32));
        }
    }
    let (c, w, h, _) = reference.ok_or_else(|| fmt_err(root, "holds no images".into()))?;
    let images = Array4::from_shape_vec((files.len(), c, h as usize, w as usize), px)
        .map_err(|e| fmt_err(root, format!("internal shape mismatch: {e}")))?;
    let labels = files.iter().map(|(l, _)| *l).collect();
    Ok((
        Dataset::new(images, Some(labels)),
        classes.into_iter().map(|(n, _)| n).collect(),
    ))
}

/// [`read_folder_raw`] with pixels `byte / 255`.
pub fn read_folder(root: &Path) -> Result<(Dataset, Vec<String>), DataError> {
    let (mut data, classes) = read_folder_raw(root)?;
    Preprocess::Scale.apply_dataset(&mut data)?;
    Ok((data, classes))
}

/// Interleaved 8-bit pixels of one file: `(channels, width, height, bytes)`.
type Decoded = (usize, u32, u32, Vec<u8>);

/// Decodes one file to interleaved 8-bit pixels.
fn decode(path: &Path) -> Result<Decoded, DataError> {
    let name = path.display().to_string();
    let reader = image::ImageReader::open(path)
        .map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?;
    let img = reader.decode().map_err(|e| DataError::Format {
        path: name,
        msg: format!("cannot decode image: {e}"),
    })?;
    let (w, h) = (img.width(), img.height());
    Ok(if img.color().has_color() {
        (3, w, h, img.to_rgb8().into_raw())
    } else {
        (1, w, h, img.to_luma8().into_raw())
    })
}
