//! NumPy `.npy` arrays (format versions 1 to 3), plain or gzipped.
//!
//! The reader is written by hand rather than through `ndarray-npy` so that every way a file can
//! be wrong (dtype, rank, a cut-off download, a header promising more than the file holds) gets a
//! one-line message saying what was found and what is accepted, and so that the size promised by
//! the header is checked against the file before the array is allocated.
//!
//! Images: float32 (used as is) or uint8 (scaled by 1/255 unless read raw), shape `(N, H, W)`
//! (one channel) or `(N, C, H, W)`. Labels: a 1-D array of unsigned or signed integers of 1, 2,
//! 4 or 8 bytes whose values lie in 0..=255. Either byte order and either memory order (C or
//! Fortran) is read.

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, IxDyn, ShapeBuilder};

use super::input::{Input, read_at};
use super::{DataError, Dataset, ImageSource, PixelKind, check_request};

/// The six bytes every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy itself refuses headers longer than 10,000 bytes by default; this leaves ample room.
const MAX_HEADER: u64 = 1 << 20;

/// Reads an image array: float32 as is, uint8 scaled by 1/255. Rejects NaN and infinity.
pub fn read_images(path: &Path) -> Result<Dataset, DataError> {
    let (data, kind) = read_images_raw(path)?;
    let mut data = data;
    super::Preprocess::default_for(kind).apply_dataset(&mut data)?;
    Ok(data)
}

/// Reads an image array keeping uint8 values as 0..=255, and says which element type it held so
/// the caller can pick the default preprocessing. Float arrays are checked for NaN and infinity.
pub fn read_images_raw(path: &Path) -> Result<(Dataset, PixelKind), DataError> {
    let mut input = Input::open(path)?;
    parse_images(&mut input)
}

/// Reads a 1-D integer label array (values must lie in 0..=255).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let mut input = Input::open(path)?;
    parse_labels(&mut input)
}

/// What the header says.
#[derive(Debug)]
struct Header {
    dtype: Dtype,
    descr: String,
    fortran: bool,
    shape: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Dtype {
    big_endian: bool,
    kind: char,
    size: usize,
}

fn shape_str(shape: &[u64]) -> String {
    let inner: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if shape.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    }
}

fn dtype_name(d: Dtype) -> String {
    let kind = match d.kind {
        'f' => "float",
        'u' => "uint",
        'i' => "int",
        'b' => "bool",
        'c' => "complex",
        _ => return format!("kind '{}' of {} bytes", d.kind, d.size),
    };
    format!("{kind}{}", d.size * 8)
}

fn parse_header(input: &mut Input) -> Result<Header, DataError> {
    let pre = input.header(8, "the .npy magic and version")?;
    if &pre[..6] != MAGIC {
        return Err(input.format_err("not a .npy file (it does not start with \\x93NUMPY)"));
    }
    let (major, minor) = (pre[6], pre[7]);
    let len = match major {
        1 => {
            let b = input.header(2, "the .npy header length")?;
            u16::from_le_bytes([b[0], b[1]]) as u64
        }
        2 | 3 => {
            let b = input.header(4, "the .npy header length")?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
        }
        _ => {
            return Err(input.format_err(format!(
                ".npy format version {major}.{minor} is not supported (versions 1.0 to 3.0 are)"
            )));
        }
    };
    if len > MAX_HEADER {
        return Err(input.format_err(format!(
            "the .npy header claims {len} bytes; that is not a valid header"
        )));
    }
    let text = input.header(len as usize, "the .npy header")?;
    let text =
        String::from_utf8(text).map_err(|_| input.format_err("the .npy header is not text"))?;
    let bad = |msg: &str| {
        input.format_err(format!(
            "malformed .npy header ({msg}): {}",
            quote_header(text.trim())
        ))
    };
    let dict = match PyParser::new(&text).parse_value() {
        Ok(Py::Dict(d)) => d,
        Ok(_) => return Err(bad("not a dict")),
        Err(e) => return Err(bad(&e)),
    };
    let get = |key: &str| {
        dict.iter()
            .find(|(k, _)| matches!(k, Py::Str(s) if s == key))
            .map(|(_, v)| v)
    };
    let descr = match get("descr") {
        Some(Py::Str(s)) => s.clone(),
        Some(_) => {
            return Err(input.format_err(
                "structured (record) dtypes are not supported: save a plain float32 or uint8 array",
            ));
        }
        None => return Err(bad("no 'descr'")),
    };
    let fortran = match get("fortran_order") {
        Some(Py::Bool(b)) => *b,
        _ => return Err(bad("no boolean 'fortran_order'")),
    };
    let shape = match get("shape") {
        Some(Py::Tuple(items)) => items
            .iter()
            .map(|v| match v {
                Py::Int(i) => Ok(*i),
                _ => Err(bad("shape entries must be integers")),
            })
            .collect::<Result<Vec<u64>, _>>()?,
        _ => return Err(bad("no tuple 'shape'")),
    };
    let dtype = parse_descr(&descr)
        .ok_or_else(|| input.format_err(format!("unrecognised dtype '{descr}'")))?;
    Ok(Header {
        dtype,
        descr,
        fortran,
        shape,
    })
}

fn parse_descr(s: &str) -> Option<Dtype> {
    let mut chars = s.chars().peekable();
    let big_endian = match chars.peek()? {
        '<' | '|' => {
            chars.next();
            false
        }
        '>' => {
            chars.next();
            true
        }
        '=' => {
            chars.next();
            cfg!(target_endian = "big")
        }
        _ => cfg!(target_endian = "big"),
    };
    let kind = chars.next()?;
    let size: usize = chars.collect::<String>().parse().ok()?;
    Some(Dtype {
        big_endian,
        kind,
        size,
    })
}

/// Reads the payload of `h` (already checked to have a supported dtype) as elements converted by
/// `conv`, returning them in C order.
fn read_payload<T: Clone + Default>(
    input: &mut Input,
    h: &Header,
    conv: impl Fn(&[u8]) -> T,
) -> Result<Vec<T>, DataError> {
    let claim = format!(
        "the header claims shape {} of {}",
        shape_str(&h.shape),
        h.descr
    );
    let count = h
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|c| c.checked_mul(h.dtype.size as u64))
        .ok_or_else(|| input.format_err(format!("{claim}: impossibly large")))?;
    let cap = input.check_payload(count, h.dtype.size as u64, &claim)?;
    let mut out: Vec<T> = Vec::with_capacity(cap);
    let size = h.dtype.size;
    input.stream(count, size, &claim, |chunk| {
        out.extend(chunk.chunks_exact(size).map(&conv))
    })?;
    if h.fortran && h.shape.len() > 1 {
        // Sizes were verified against the data, so they fit in usize.
        let dims: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
        let arr = ArrayD::from_shape_vec(IxDyn(&dims).f(), out)
            .map_err(|e| input.format_err(format!("internal shape mismatch: {e}")))?;
        out = arr.as_standard_layout().iter().cloned().collect();
    }
    Ok(out)
}

fn image_kind(input: &Input, h: &Header) -> Result<PixelKind, DataError> {
    Ok(match (h.dtype.kind, h.dtype.size) {
        ('f', 4) => PixelKind::F32,
        ('u', 1) => PixelKind::U8,
        _ => {
            return Err(input.format_err(format!(
                "dtype '{}' ({}) is not accepted for images: use float32 ('<f4') or uint8 ('|u1'), e.g. arr.astype(np.float32)",
                h.descr,
                dtype_name(h.dtype)
            )));
        }
    })
}

/// `(N, C, H, W)` of an image array, refusing other ranks and empty arrays.
fn image_dims(input: &Input, h: &Header) -> Result<(u64, u64, u64, u64), DataError> {
    let (n, c, hh, ww) = match h.shape[..] {
        [n, hh, ww] => (n, 1, hh, ww),
        [n, c, hh, ww] => (n, c, hh, ww),
        _ => {
            return Err(input.format_err(format!(
                "array of shape {} has rank {}; image arrays must have rank 3 (N, H, W) or 4 (N, C, H, W)",
                shape_str(&h.shape),
                h.shape.len()
            )));
        }
    };
    if n == 0 || c == 0 || hh == 0 || ww == 0 {
        return Err(input.format_err(format!(
            "array of shape {} holds no pixels",
            shape_str(&h.shape)
        )));
    }
    Ok((n, c, hh, ww))
}

fn parse_images(input: &mut Input) -> Result<(Dataset, PixelKind), DataError> {
    let h = parse_header(input)?;
    let kind = image_kind(input, &h)?;
    let (n, c, hh, ww) = image_dims(input, &h)?;
    let px: Vec<f32> = match kind {
        PixelKind::F32 => {
            let be = h.dtype.big_endian;
            read_payload(input, &h, |b| {
                let a = [b[0], b[1], b[2], b[3]];
                if be {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                }
            })?
        }
        PixelKind::U8 => read_payload(input, &h, |b| b[0] as f32)?,
    };
    let shape = (n as usize, c as usize, hh as usize, ww as usize);
    let images = Array4::from_shape_vec(shape, px)
        .map_err(|e| input.format_err(format!("internal shape mismatch: {e}")))?;
    let data = Dataset::new(images, None);
    if kind == PixelKind::F32 {
        data.check_finite(&input.name)?;
    }
    Ok((data, kind))
}

fn parse_labels(input: &mut Input) -> Result<Vec<u8>, DataError> {
    let h = parse_header(input)?;
    let Dtype {
        big_endian: be,
        kind,
        size,
    } = h.dtype;
    if !matches!(kind, 'u' | 'i') || !matches!(size, 1 | 2 | 4 | 8) {
        return Err(input.format_err(format!(
            "dtype '{}' ({}) is not accepted for labels: use an integer array (uint8, int32 or int64)",
            h.descr,
            dtype_name(h.dtype)
        )));
    }
    if h.shape.len() != 1 {
        return Err(input.format_err(format!(
            "label array of shape {} has rank {}; labels must be a 1-D array (N,)",
            shape_str(&h.shape),
            h.shape.len()
        )));
    }
    let signed = kind == 'i';
    let values: Vec<i128> = read_payload(input, &h, |b| {
        let mut a = [0u8; 8];
        if be {
            a[8 - size..].copy_from_slice(b);
            a.reverse();
        } else {
            a[..size].copy_from_slice(b);
        }
        let u = u64::from_le_bytes(a);
        if signed {
            // Sign-extend from `size` bytes.
            let shift = 64 - 8 * size as u32;
            (((u << shift) as i64) >> shift) as i128
        } else {
            u as i128
        }
    })?;
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            u8::try_from(v)
                .map_err(|_| input.format_err(format!("label {v} at index {i} is outside 0..=255")))
        })
        .collect()
}

/// The subset of Python literals that `.npy` headers use (lists and None are parsed only to be
/// skipped or refused).
#[derive(Debug)]
#[allow(dead_code)]
enum Py {
    Str(String),
    Int(u64),
    Bool(bool),
    None,
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
}

struct PyParser<'s> {
    s: &'s [u8],
    i: usize,
    depth: usize,
}

impl<'s> PyParser<'s> {
    fn new(s: &'s str) -> Self {
        PyParser {
            s: s.as_bytes(),
            i: 0,
            depth: 0,
        }
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// Items up to `close`, allowing a trailing comma.
    fn seq(&mut self, close: u8) -> Result<Vec<Py>, String> {
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(items);
            }
            items.push(self.parse_value()?);
            if !self.eat(b',') {
                return if self.eat(close) {
                    Ok(items)
                } else {
                    Err(format!("expected ',' or '{}'", close as char))
                };
            }
        }
    }

    fn parse_value(&mut self) -> Result<Py, String> {
        self.depth += 1;
        if self.depth > 32 {
            return Err("nested too deeply".into());
        }
        let v = self.value_inner();
        self.depth -= 1;
        v
    }

    fn value_inner(&mut self) -> Result<Py, String> {
        match self.peek().ok_or("unexpected end")? {
            q @ (b'\'' | b'"') => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return Err("unterminated string".into());
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                Ok(Py::Str(text))
            }
            b'(' => {
                self.i += 1;
                Ok(Py::Tuple(self.seq(b')')?))
            }
            b'[' => {
                self.i += 1;
                Ok(Py::List(self.seq(b']')?))
            }
            b'{' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(b'}') {
                        return Ok(Py::Dict(items));
                    }
                    let k = self.parse_value()?;
                    if !self.eat(b':') {
                        return Err("expected ':'".into());
                    }
                    let v = self.parse_value()?;
                    items.push((k, v));
                    if !self.eat(b',') {
                        return if self.eat(b'}') {
                            Ok(Py::Dict(items))
                        } else {
                            Err("expected ',' or '}'".into())
                        };
                    }
                }
            }
            c if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'L')
                {
                    self.i += 1;
                }
                let digits = String::from_utf8_lossy(&self.s[start..self.i])
                    .trim_end_matches('L')
                    .to_string();
                digits
                    .parse()
                    .map(Py::Int)
                    .map_err(|_| format!("integer {digits} out of range"))
            }
            c if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_alphanumeric() {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(Py::Bool(true)),
                    b"False" => Ok(Py::Bool(false)),
                    b"None" => Ok(Py::None),
                    w => Err(format!("unexpected word '{}'", String::from_utf8_lossy(w))),
                }
            }
            c => Err(format!("unexpected character '{}'", c as char)),
        }
    }
}

/// The header of a C-order `.npy` (format 1.0), padded so the data starts on a 64-byte boundary
/// as numpy does.
fn npy_header(descr: &str, shape: &[usize]) -> Result<Vec<u8>, DataError> {
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_str(&dims)
    );
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let len = u16::try_from(header.len())
        .map_err(|_| DataError::Invalid("npy header too long".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    Ok(out)
}

/// Writes a C-order little-endian `.npy` (format 1.0) from raw element bytes; used by tests and
/// by tools that export data for the Python side.
pub fn write_npy_bytes(
    path: &Path,
    descr: &str,
    shape: &[usize],
    data: &[u8],
) -> Result<(), DataError> {
    let mut out = npy_header(descr, shape)?;
    out.extend_from_slice(data);
    std::fs::write(path, out).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `f32` images `(N, C, H, W)` as a float32 `.npy` file.
pub fn write_images_f32(path: &Path, images: &Array4<f32>) -> Result<(), DataError> {
    let bytes: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy_bytes(path, "<f4", images.shape(), &bytes)
}

/// Streams every image of `src` into a float32 `.npy` of shape `(N, C, H, W)`, `batch` images
/// at a time, calling `progress` with the number written so far.
///
/// This is how an expensive per-image preprocessing (zca-image on STL-10's 105,000 images costs
/// minutes of CPU per pass) is paid once: write `Preprocessed<...>` here, then stream the result
/// with [`NpyFile`] on every epoch.
pub fn write_source_f32(
    path: &Path,
    src: &dyn ImageSource,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<(), DataError> {
    use std::io::Write;
    let io_err = |source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let (c, h, w) = src.shape();
    let (n, per, batch) = (src.len(), c * h * w, batch.max(1));
    let file = std::fs::File::create(path).map_err(io_err)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    out.write_all(&npy_header("<f4", &[n, c, h, w])?)
        .map_err(io_err)?;
    let mut buf = vec![0f32; batch.min(n.max(1)) * per];
    let mut bytes = Vec::with_capacity(buf.len() * 4);
    let mut done = 0;
    while done < n {
        let k = batch.min(n - done);
        src.read_into(done, k, &mut buf[..k * per])?;
        bytes.clear();
        bytes.extend(buf[..k * per].iter().flat_map(|v| v.to_le_bytes()));
        out.write_all(&bytes).map_err(io_err)?;
        done += k;
        progress(done);
    }
    out.flush().map_err(io_err)
}

/// An uncompressed, C-order float32 or uint8 `.npy` of images read on demand, so arrays larger
/// than memory (or a preprocessed cache written by [`write_source_f32`]) can be used. Values
/// come as stored (uint8 as 0..=255; wrap in [`super::Preprocessed`] to scale); a NaN or
/// infinity is reported when the image holding it is read.
#[derive(Debug)]
pub struct NpyFile {
    path: PathBuf,
    file: std::fs::File,
    n: usize,
    shape: (usize, usize, usize),
    kind: PixelKind,
    big_endian: bool,
    offset: u64,
}

impl NpyFile {
    /// Opens and checks the header and the file size; refuses gzip and Fortran order, which
    /// cannot be read image by image (use [`read_images`] for those).
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let mut input = Input::open(path)?;
        if input.gz {
            return Err(input.format_err(
                "a gzipped .npy cannot be streamed; decompress it or load it into memory",
            ));
        }
        let h = parse_header(&mut input)?;
        let kind = image_kind(&input, &h)?;
        let (n, c, hh, ww) = image_dims(&input, &h)?;
        if h.fortran && h.shape.iter().filter(|&&d| d > 1).count() > 1 {
            return Err(input.format_err(
                "a Fortran-order .npy cannot be streamed image by image; load it into memory or save it in C order",
            ));
        }
        let claim = format!(
            "the header claims shape {} of {}",
            shape_str(&h.shape),
            h.descr
        );
        let nbytes = [n, c, hh, ww, h.dtype.size as u64]
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| input.format_err(format!("{claim}: impossibly large")))?;
        input.check_payload(nbytes, 1, &claim)?;
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: input.name.clone(),
            source,
        })?;
        // Sizes were verified against the file, so they fit in usize.
        Ok(NpyFile {
            path: path.to_path_buf(),
            file,
            n: n as usize,
            shape: (c as usize, hh as usize, ww as usize),
            kind,
            big_endian: h.dtype.big_endian,
            offset: input.pos,
        })
    }

    /// What the file stores, to choose the default preprocessing.
    pub fn kind(&self) -> PixelKind {
        self.kind
    }
}

impl ImageSource for NpyFile {
    fn len(&self) -> usize {
        self.n
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.shape
    }
    fn read_into(&self, start: usize, count: usize, out: &mut [f32]) -> Result<(), DataError> {
        let (c, h, w) = self.shape;
        let per = c * h * w;
        check_request(self.n, per, start, count, out.len())?;
        let size = match self.kind {
            PixelKind::F32 => 4,
            PixelKind::U8 => 1,
        };
        // Read about 8 MB at a time.
        let step = ((8 << 20) / (per * size).max(1)).max(1);
        let mut buf = vec![0u8; step.min(count.max(1)) * per * size];
        let mut done = 0;
        while done < count {
            let k = step.min(count - done);
            let bytes = &mut buf[..k * per * size];
            let at = self.offset + ((start + done) * per * size) as u64;
            read_at(&self.file, bytes, at).map_err(|source| DataError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
            let dst = &mut out[done * per..(done + k) * per];
            match self.kind {
                PixelKind::U8 => dst
                    .iter_mut()
                    .zip(bytes.iter())
                    .for_each(|(o, &b)| *o = b as f32),
                PixelKind::F32 => {
                    for (o, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        let a = [b[0], b[1], b[2], b[3]];
                        *o = if self.big_endian {
                            f32::from_be_bytes(a)
                        } else {
                            f32::from_le_bytes(a)
                        };
                    }
                    if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
                        return Err(DataError::Format {
                            path: self.path.display().to_string(),
                            msg: format!(
                                "image {} holds a non-finite value (NaN or infinity); clean the data first",
                                start + done + i / per
                            ),
                        });
                    }
                }
            }
            done += k;
        }
        Ok(())
    }
}

/// A header quoted in an error: control characters escaped (the message stays one line) and cut
/// after 200 characters (a damaged header may be kilobytes of noise).
fn quote_header(text: &str) -> String {
    crate::text::printable(text, 200)
}
