//! MNIST's IDX format (also used by Fashion-MNIST and by the embedded digits), plain or gzipped.
//!
//! An IDX file is a 4-byte magic `00 00 <type> <rank>`, `rank` big-endian u32 dimensions, then
//! the data in row-major order. Only unsigned bytes (type 0x08) occur in the MNIST family, so
//! images are `0x00000803` (N, H, W) and labels `0x00000801` (N). Gzip is recognised by its magic
//! bytes, not by the file name, because downloads are often decompressed and keep the `.gz` name
//! or the other way round.

use std::path::Path;

use ndarray::Array4;

use super::input::Input;
use super::{DataError, Dataset};

/// Magic of an IDX file of unsigned bytes with 3 dimensions (images N x H x W).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads an IDX images file as `(N, 1, H, W)` with pixels `byte / 255` (labels `None`).
pub fn read_images(path: &Path) -> Result<Dataset, DataError> {
    read_images_scaled(path, true)
}

/// Like [`read_images`] but keeps the byte values 0..=255, for callers that choose the
/// preprocessing themselves.
pub fn read_images_raw(path: &Path) -> Result<Dataset, DataError> {
    read_images_scaled(path, false)
}

fn read_images_scaled(path: &Path, scale: bool) -> Result<Dataset, DataError> {
    let mut input = Input::open(path)?;
    parse_images(&mut input, scale)
}

/// Reads an IDX labels file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let mut input = Input::open(path)?;
    parse_labels(&mut input)
}

/// Parses IDX images held in memory (plain or gzipped), as `byte / 255` if `scale` else 0..=255;
/// `name` is used in error messages.
pub fn images_from_bytes(name: &str, bytes: &[u8], scale: bool) -> Result<Dataset, DataError> {
    parse_images(&mut Input::from_bytes(name, bytes), scale)
}

/// Parses IDX labels held in memory (plain or gzipped); `name` is used in error messages.
pub fn labels_from_bytes(name: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    parse_labels(&mut Input::from_bytes(name, bytes))
}

fn describe_magic(m: u32) -> String {
    let [a, b, t, r] = m.to_be_bytes();
    if a != 0 || b != 0 {
        return format!(
            "magic bytes {a:02x} {b:02x} {t:02x} {r:02x} are not IDX (which starts 00 00)"
        );
    }
    let ty = match t {
        0x08 => "unsigned bytes",
        0x09 => "signed bytes",
        0x0B => "16-bit integers",
        0x0C => "32-bit integers",
        0x0D => "32-bit floats",
        0x0E => "64-bit floats",
        _ => "an unknown element type",
    };
    format!("magic 0x{m:08x} means {ty} in {r} dimension(s)")
}

fn read_magic(input: &mut Input, expected: u32, kind: &str) -> Result<(), DataError> {
    let h = input.header(4, "the IDX magic")?;
    let m = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if m != expected {
        let hint = match (expected, m) {
            (IMAGES_MAGIC, LABELS_MAGIC) => "; this looks like a labels file, pass it as labels",
            (LABELS_MAGIC, IMAGES_MAGIC) => "; this looks like an images file, pass it as images",
            _ => "",
        };
        return Err(input.format_err(format!(
            "not an IDX {kind} file: {}, expected 0x{expected:08x} (unsigned bytes, {} dimension(s)){hint}",
            describe_magic(m),
            expected & 0xff
        )));
    }
    Ok(())
}

fn read_dims(input: &mut Input, n: usize) -> Result<Vec<u64>, DataError> {
    let h = input.header(4 * n, "the IDX dimensions")?;
    Ok(h.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64)
        .collect())
}

/// The images of an IDX file that `keep` selects by index, with byte values 0..=255, and the
/// number of images in the file: one rank's shard of a data-parallel run, in host memory no
/// larger than the shard's. (The whole file is read through, since gzip cannot seek; only the
/// kept images are stored.)
pub fn read_images_raw_where(
    path: &Path,
    keep: &dyn Fn(usize) -> bool,
) -> Result<(Dataset, usize), DataError> {
    let mut input = Input::open(path)?;
    parse_images_where(&mut input, false, keep)
}

fn parse_images(input: &mut Input, scale: bool) -> Result<Dataset, DataError> {
    Ok(parse_images_where(input, scale, &|_| true)?.0)
}

fn parse_images_where(
    input: &mut Input,
    scale: bool,
    keep: &dyn Fn(usize) -> bool,
) -> Result<(Dataset, usize), DataError> {
    read_magic(input, IMAGES_MAGIC, "images")?;
    let d = read_dims(input, 3)?;
    let (n, h, w) = (d[0], d[1], d[2]);
    if n == 0 || h == 0 || w == 0 {
        return Err(input.format_err(format!(
            "header claims {n} images of {h}x{w}: nothing to read"
        )));
    }
    // Three u32 factors can overflow u64, hence the checked product.
    let nbytes = n
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .ok_or_else(|| {
            input.format_err(format!(
                "header claims {n} images of {h}x{w}: impossibly large"
            ))
        })?;
    let claim = format!("the header claims {n} images of {h}x{w}");
    let cap = input.check_payload(nbytes, 1, &claim)?;
    // The sizes were verified against the data, so they fit in usize.
    let (n, per) = (n as usize, (h * w) as usize);
    let kept = (0..n).filter(|&i| keep(i)).count();
    let mut px: Vec<f32> = Vec::with_capacity(cap.min(kept * per));
    let mut pos = 0usize;
    input.stream(nbytes, 1, &claim, |chunk| {
        let mut at = 0;
        while at < chunk.len() {
            let (img, off) = (pos / per, pos % per);
            let take = (per - off).min(chunk.len() - at);
            if keep(img) {
                let part = &chunk[at..at + take];
                if scale {
                    px.extend(part.iter().map(|&b| b as f32 / 255.0))
                } else {
                    px.extend(part.iter().map(|&b| b as f32))
                }
            }
            at += take;
            pos += take;
        }
    })?;
    let shape = (kept, 1, h as usize, w as usize);
    let images = Array4::from_shape_vec(shape, px)
        .map_err(|e| input.format_err(format!("internal shape mismatch: {e}")))?;
    Ok((Dataset::new(images, None), n))
}

fn parse_labels(input: &mut Input) -> Result<Vec<u8>, DataError> {
    read_magic(input, LABELS_MAGIC, "labels")?;
    let n = read_dims(input, 1)?[0];
    let claim = format!("the header claims {n} labels");
    let cap = input.check_payload(n, 1, &claim)?;
    let mut labels = Vec::with_capacity(cap);
    input.stream(n, 1, &claim, |chunk| labels.extend_from_slice(chunk))?;
    Ok(labels)
}
