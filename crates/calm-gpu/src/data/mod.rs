//! Datasets: readers for the formats calm-gpu accepts, preprocessing, and the embedded sample.
//!
//! Every engine reads images through [`ImageSource`], so a dataset can live in memory
//! ([`Dataset`]) or stream from a file in chunks (large files such as STL-10's unlabeled split).

use std::path::Path;

use ndarray::Array4;

pub mod cifar;
pub mod embedded;
pub mod folder;
pub mod idx;
mod input;
pub mod npy;
pub mod preprocess;
pub mod stl10;
pub mod whiten;

pub use embedded::{Split, embedded_digits};
pub use npy::NpyFile;
pub use preprocess::{Concat, Preprocess, Preprocessed};
pub use stl10::Stl10File;
pub use whiten::{Whitened, Whitening};

/// What can go wrong while reading data. Each message is one line saying what and where: what
/// a damaged file puts into a message (a header's text, a dtype, a path) is shown with its line
/// breaks and other control characters escaped ([`crate::text::printable`]).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file failed.
    #[error("{}: {source}", shown(.path))]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file that is not what it should be: damaged, of another format, or in the wrong role.
    #[error("{}: {}", shown(.path), shown(.msg))]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A request or a value that cannot be served (a bad range, mismatched counts, a non-finite
    /// pixel, a filter for other images).
    #[error("{}", shown(.0))]
    Invalid(String),
}

fn shown(text: &str) -> String {
    crate::text::printable(text, 2000)
}

/// A read-only collection of `N` images of `C x H x W` f32 pixels (already preprocessed).
pub trait ImageSource: Send + Sync {
    /// Number of images `N`.
    fn len(&self) -> usize;
    /// True when the source holds no images.
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
    /// Pixels `(N, C, H, W)` ([`Dataset::new`] makes the layout standard).
    pub images: Array4<f32>,
    /// One class per image, where the data has them.
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// A dataset of `images` (copied into standard layout if they are not) and optional `labels`.
    pub fn new(images: Array4<f32>, labels: Option<Vec<u8>>) -> Self {
        let images = if images.is_standard_layout() {
            images
        } else {
            images.as_standard_layout().to_owned()
        };
        Self { images, labels }
    }

    /// Attaches labels, refusing a count that differs from the number of images (a frequent
    /// mistake is pairing a train images file with test labels).
    pub fn with_labels(mut self, labels: Vec<u8>) -> Result<Self, DataError> {
        let n = self.images.shape()[0];
        if labels.len() != n {
            return Err(DataError::Invalid(format!(
                "{} labels for {n} images",
                labels.len()
            )));
        }
        self.labels = Some(labels);
        Ok(self)
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
        let (c, h, w) = self.shape();
        let per = c * h * w;
        check_request(self.len(), per, start, count, out.len())?;
        // `new` makes the layout standard, but the fields are public, so fall back to a copy
        // rather than trusting it.
        match self.images.as_slice() {
            Some(flat) => out.copy_from_slice(&flat[start * per..(start + count) * per]),
            None => {
                let part = self
                    .images
                    .slice(ndarray::s![start..start + count, .., .., ..]);
                for (o, v) in out.iter_mut().zip(part.iter()) {
                    *o = *v;
                }
            }
        }
        Ok(())
    }
}

/// Validates a `read_into` request so that sources fail with a message instead of panicking on a
/// bad range or buffer.
pub fn check_request(
    len: usize,
    per: usize,
    start: usize,
    count: usize,
    out_len: usize,
) -> Result<(), DataError> {
    let end = start.checked_add(count);
    if end.is_none_or(|e| e > len) {
        return Err(DataError::Invalid(format!(
            "asked for images {start}..{} but the source holds {len}",
            start.saturating_add(count)
        )));
    }
    if count.checked_mul(per) != Some(out_len) {
        return Err(DataError::Invalid(format!(
            "output buffer holds {out_len} values but {count} images of {per} pixels need {}",
            count.saturating_mul(per)
        )));
    }
    Ok(())
}

/// The element type a file stored, which decides the default preprocessing: byte images are
/// scaled to [0, 1], float images are taken as already prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelKind {
    /// 0..=255 integers (IDX, uint8 `.npy`, STL-10, CIFAR, PNG/JPEG).
    U8,
    /// float32 values used as they are.
    F32,
}

impl<T: ImageSource + ?Sized> ImageSource for Box<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        (**self).read_into(start, count, out)
    }
}

impl<T: ImageSource + ?Sized> ImageSource for std::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        (**self).read_into(start, count, out)
    }
}

impl<T: ImageSource + ?Sized> ImageSource for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (**self).shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        (**self).read_into(start, count, out)
    }
}

/// The formats [`load`] understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileFormat {
    /// MNIST's IDX (`00 00 08 03` images, `00 00 08 01` labels), plain or gzipped.
    Idx,
    /// NumPy `.npy`, plain or gzipped.
    Npy,
    /// STL-10 `*_X.bin` images / `*_y.bin` labels (no header: recognised by name).
    Stl10,
    /// CIFAR-10 `data_batch_*.bin` / `test_batch.bin` (no header: recognised by name).
    Cifar10,
    /// A folder `root/<class>/*.png|jpg`.
    Folder,
}

impl std::fmt::Display for FileFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileFormat::Idx => "idx",
            FileFormat::Npy => "npy",
            FileFormat::Stl10 => "stl10",
            FileFormat::Cifar10 => "cifar10",
            FileFormat::Folder => "folder",
        })
    }
}

impl std::str::FromStr for FileFormat {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "idx" | "mnist" => Ok(FileFormat::Idx),
            "npy" => Ok(FileFormat::Npy),
            "stl10" | "stl-10" => Ok(FileFormat::Stl10),
            "cifar10" | "cifar-10" | "cifar" => Ok(FileFormat::Cifar10),
            "folder" => Ok(FileFormat::Folder),
            _ => Err(DataError::Invalid(format!(
                "unknown data format '{s}': expected one of idx, npy, stl10, cifar10, folder"
            ))),
        }
    }
}

/// True for STL-10's `*_y.bin` label files, which share the format tag with the image files.
fn is_stl10_labels(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase().ends_with("_y.bin"))
        .unwrap_or(false)
}

/// The error for an STL-10 file passed in the wrong role.
fn stl10_role_error(path: &Path, labels_wanted: bool) -> DataError {
    DataError::Format {
        path: path.display().to_string(),
        msg: if labels_wanted {
            "is an STL-10 image file; its labels are in the matching *_y.bin".into()
        } else {
            "is an STL-10 labels file; images are in the matching *_X.bin".into()
        },
    }
}

/// What the name alone says, for the formats that have no header.
fn format_from_name(path: &Path) -> Option<FileFormat> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with("_x.bin") || name.ends_with("_y.bin") {
        Some(FileFormat::Stl10)
    } else if name.ends_with(".bin")
        && (name.starts_with("data_batch") || name.starts_with("test_batch"))
    {
        Some(FileFormat::Cifar10)
    } else {
        None
    }
}

/// Decides the format: a folder is [`FileFormat::Folder`]; STL-10 and CIFAR-10 files, which have
/// no header, are known by their published names (`*_X.bin`, `*_y.bin`, `data_batch_*.bin`,
/// `test_batch.bin`); everything else by content, not name: IDX starts `00 00 <type>`, `.npy`
/// starts `\x93NUMPY`, and either may be gzipped.
pub fn detect_format(path: &Path) -> Result<FileFormat, DataError> {
    if path.is_dir() {
        return Ok(FileFormat::Folder);
    }
    if let Some(f) = format_from_name(path) {
        return Ok(f);
    }
    let mut input = input::Input::open(path)?;
    let head = input.peek(6)?;
    if head.as_slice() == npy::MAGIC {
        Ok(FileFormat::Npy)
    } else if head.len() >= 4
        && head[0] == 0
        && head[1] == 0
        && matches!(head[2], 0x08 | 0x09 | 0x0B..=0x0E)
    {
        Ok(FileFormat::Idx)
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        Err(input.format_err(format!(
            "unrecognised format: not IDX (starts 00 00 08 ..) nor .npy (starts \\x93NUMPY){}, nor named like STL-10 (*_X.bin) or CIFAR-10 (data_batch_*.bin); first bytes{}: {}",
            if input.gz { " inside the gzip" } else { "" },
            if input.gz { " after decompression" } else { "" },
            if hex.is_empty() { "(the file is empty)".to_string() } else { hex.join(" ") }
        )))
    }
}

/// Loads images with the default preprocessing for the element type (bytes become
/// `byte / 255`, floats are kept). NaN and infinity are refused. The format is found by
/// [`detect_format`]. Labels come with CIFAR-10 batches and class folders; for the others see
/// [`load_labels`] and [`load_labelled`]. For STL-10's 100,000 unlabeled images prefer
/// [`open_source`], which streams.
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    load_with(path, None)
}

/// [`load`] with a chosen preprocessing (`None`: the default for the element type).
pub fn load_with(path: &Path, pre: Option<Preprocess>) -> Result<Dataset, DataError> {
    let (mut data, kind) = load_raw(path)?;
    pre.unwrap_or(Preprocess::default_for(kind))
        .apply_dataset(&mut data)?;
    data.check_finite(&path.display().to_string())?;
    Ok(data)
}

/// Loads images keeping byte values as 0..=255, with the element type the file held, for callers
/// that apply a preprocessing of their own choosing.
pub fn load_raw(path: &Path) -> Result<(Dataset, PixelKind), DataError> {
    let (data, kind) = match detect_format(path)? {
        FileFormat::Idx => (idx::read_images_raw(path)?, PixelKind::U8),
        FileFormat::Npy => npy::read_images_raw(path)?,
        FileFormat::Stl10 if is_stl10_labels(path) => return Err(stl10_role_error(path, false)),
        FileFormat::Stl10 => (stl10::read_images_raw(path)?, PixelKind::U8),
        FileFormat::Cifar10 => (cifar::read_batches_raw(&[path])?, PixelKind::U8),
        FileFormat::Folder => (folder::read_folder_raw(path)?.0, PixelKind::U8),
    };
    data.check_finite(&path.display().to_string())?;
    Ok((data, kind))
}

/// Uncompressed `.npy` files larger than this are streamed by [`open_source`] rather than loaded.
pub const STREAM_ABOVE_BYTES: u64 = 2 << 30;

/// Opens images as a source, preprocessed with `pre` (`None`: the default for the element type).
/// STL-10 `_X.bin` files, and uncompressed C-order `.npy` files above [`STREAM_ABOVE_BYTES`],
/// stream from disk and are preprocessed chunk by chunk as they are read; everything else is
/// loaded into memory as [`load_with`] does.
pub fn open_source(
    path: &Path,
    pre: Option<Preprocess>,
) -> Result<Box<dyn ImageSource>, DataError> {
    match detect_format(path)? {
        FileFormat::Stl10 => {
            if is_stl10_labels(path) {
                return Err(stl10_role_error(path, false));
            }
            let file = stl10::Stl10File::open(path)?;
            let pre = pre.unwrap_or(Preprocess::default_for(PixelKind::U8));
            return Ok(Box::new(Preprocessed::new(file, pre)));
        }
        FileFormat::Npy
            if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) > STREAM_ABOVE_BYTES =>
        {
            // Gzip and Fortran order cannot stream; those fall through to loading.
            if let Ok(file) = npy::NpyFile::open(path) {
                let pre = pre.unwrap_or(Preprocess::default_for(file.kind()));
                return Ok(Box::new(Preprocessed::new(file, pre)));
            }
        }
        _ => {}
    }
    Ok(Box::new(load_with(path, pre)?))
}

/// The images of `path` that `keep` selects by their index in the data, preprocessed with `pre`,
/// in order, and the number of images in `path`: `first` is the index of the file's first image
/// in the data (`--data` files after the first). One rank's shard of a data-parallel run
/// ([`crate::dist::Sharding`]): IDX files are read through and only the kept images stored;
/// STL-10 and uncompressed C-order `.npy` files are read by offset when the images are asked
/// for; the other formats are loaded whole ([`open_source`]) and their other images dropped only
/// from the view.
pub fn open_shard(
    path: &Path,
    pre: Preprocess,
    first: usize,
    keep: &dyn Fn(usize) -> bool,
) -> Result<(Box<dyn ImageSource>, usize), DataError> {
    if detect_format(path)? == FileFormat::Idx {
        let (mut data, n) = idx::read_images_raw_where(path, &|i| keep(first + i))?;
        pre.apply_dataset(&mut data)?;
        data.check_finite(&path.display().to_string())?;
        return Ok((Box::new(data), n));
    }
    // An uncompressed C-order `.npy` of any size is read by offset (gzip and Fortran order
    // cannot be, and are loaded).
    if detect_format(path)? == FileFormat::Npy
        && let Ok(file) = npy::NpyFile::open(path)
    {
        let n = file.len();
        let all: std::sync::Arc<dyn ImageSource> =
            std::sync::Arc::new(Preprocessed::new(file, pre));
        return Ok((open_shard_of(all, first, keep)?, n));
    }
    let all: std::sync::Arc<dyn ImageSource> = std::sync::Arc::from(open_source(path, Some(pre))?);
    let n = all.len();
    Ok((open_shard_of(all, first, keep)?, n))
}

/// The images of `all` that `keep` selects by index (`first` is the index of `all`'s first
/// image), as a view that reads them from `all` when asked.
pub fn open_shard_of(
    all: std::sync::Arc<dyn ImageSource>,
    first: usize,
    keep: &dyn Fn(usize) -> bool,
) -> Result<Box<dyn ImageSource>, DataError> {
    let n = all.len();
    // Runs of kept images, each a view of the source.
    let mut parts: Vec<Box<dyn ImageSource>> = Vec::new();
    let mut i = 0;
    while i < n {
        let start = i;
        let kept = keep(first + i);
        while i < n && keep(first + i) == kept {
            i += 1;
        }
        if kept {
            parts.push(Box::new(Subset::new(all.clone(), start, i - start)?));
        }
    }
    if parts.is_empty() {
        parts.push(Box::new(Subset::new(all, 0, 0)?));
    }
    Ok(Box::new(Concat::new(parts)?))
}

/// Loads labels: IDX labels, a 1-D integer `.npy`, or STL-10's `*_y.bin` (1..=10 become 0..=9).
pub fn load_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    match detect_format(path)? {
        FileFormat::Idx => idx::read_labels(path),
        FileFormat::Npy => npy::read_labels(path),
        FileFormat::Stl10 if !is_stl10_labels(path) => Err(stl10_role_error(path, true)),
        FileFormat::Stl10 => stl10::read_labels(path),
        FileFormat::Cifar10 => Ok(cifar::read_batches_raw(&[path])?.labels.unwrap_or_default()),
        FileFormat::Folder => Ok(folder::read_folder_raw(path)?.0.labels.unwrap_or_default()),
    }
}

/// [`load`] plus the labels from a second file; the counts must agree.
pub fn load_labelled(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let data = load(images)?;
    let values = load_labels(labels)?;
    data.with_labels(values).map_err(|e| {
        DataError::Invalid(format!(
            "{} with {}: {e}",
            images.display(),
            labels.display()
        ))
    })
}

/// Images `start .. start + len` of another source (e.g. a validation split carved from the
/// training images).
pub struct Subset {
    inner: std::sync::Arc<dyn ImageSource>,
    start: usize,
    len: usize,
}

impl Subset {
    /// Images `start .. start + len` of `inner`; an error when they are not all in it.
    pub fn new(
        inner: std::sync::Arc<dyn ImageSource>,
        start: usize,
        len: usize,
    ) -> Result<Self, DataError> {
        if start.checked_add(len).is_none_or(|end| end > inner.len()) {
            return Err(DataError::Invalid(format!(
                "images {start}..{} asked of a source of {}",
                start as u128 + len as u128,
                inner.len()
            )));
        }
        Ok(Self { inner, start, len })
    }
}

impl ImageSource for Subset {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        let (c, h, w) = self.shape();
        check_request(self.len, c * h * w, start, count, out.len())?;
        self.inner.read_into(self.start + start, count, out)
    }
}
