//! Byte input shared by the readers: opens a file (or embedded bytes), unwraps gzip when the
//! content starts with gzip's magic, and reads the payload in bounded chunks.
//!
//! The point of this layer is that no reader ever trusts a size written in a header before
//! comparing it with what is really there: for a plain file the file size is known up front, so
//! a header claiming 10^12 images is refused before anything is allocated; for gzip the size is
//! only known by decompressing, so buffers grow with the data actually read, never with the claim.

use std::fs::File;
use std::io::{self, BufReader, Cursor, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::DataError;

/// Largest buffer reserved up front when the true size cannot be checked before reading (gzip).
const GZ_RESERVE_CAP: u64 = 16 << 20;
/// Chunk size for streaming the payload (a multiple of every element size used).
const CHUNK: usize = 1 << 20;

/// Opens a regular file: a missing or unreadable one is `DataError::Io`, a directory a format
/// error saying what was `expected`.
pub(crate) fn open_file(
    path: &Path,
    expected: &str,
) -> Result<(File, std::fs::Metadata), DataError> {
    let io_err = |source: io::Error| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(DataError::Format {
            path: path.display().to_string(),
            msg: format!("is a directory, expected {expected}"),
        });
    }
    Ok((file, meta))
}

pub(crate) struct Input<'a> {
    /// The name used in error messages (the path as given, or the asset name).
    pub name: String,
    reader: Box<dyn Read + 'a>,
    /// Bytes read back by `peek` and not yet consumed.
    pending: Vec<u8>,
    /// Total length of the (uncompressed) content when it is known without reading it all.
    total: Option<u64>,
    /// Bytes consumed so far (decompressed).
    pub pos: u64,
    pub gz: bool,
}

impl<'a> Input<'a> {
    /// Opens `path`; a missing or unreadable file is `DataError::Io` naming the path.
    pub fn open(path: &Path) -> Result<Input<'static>, DataError> {
        let name = path.display().to_string();
        let io_err = |source: io::Error| DataError::Io {
            path: name.clone(),
            source,
        };
        let (file, meta) = open_file(path, "a data file")?;
        let mut reader = BufReader::with_capacity(CHUNK, file);
        let gz = is_gzip(&mut reader).map_err(io_err)?;
        Ok(if gz {
            Input::new(name, Box::new(MultiGzDecoder::new(reader)), None, true)
        } else {
            Input::new(name, Box::new(reader), Some(meta.len()), false)
        })
    }

    /// Reads from bytes held in memory (the embedded assets), gzip or not.
    pub fn from_bytes(name: &str, bytes: &'a [u8]) -> Input<'a> {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            Input::new(
                name.into(),
                Box::new(MultiGzDecoder::new(bytes)),
                None,
                true,
            )
        } else {
            Input::new(
                name.into(),
                Box::new(Cursor::new(bytes)),
                Some(bytes.len() as u64),
                false,
            )
        }
    }

    fn new(name: String, reader: Box<dyn Read + 'a>, total: Option<u64>, gz: bool) -> Self {
        Input {
            name,
            reader,
            pending: Vec::new(),
            total,
            pos: 0,
            gz,
        }
    }

    pub fn format_err(&self, msg: impl Into<String>) -> DataError {
        DataError::Format {
            path: self.name.clone(),
            msg: msg.into(),
        }
    }

    fn read_err(&self, e: io::Error) -> DataError {
        if self.gz {
            // flate2 reports a cut or damaged stream as an I/O error; say what it means.
            self.format_err(format!("gzip stream is truncated or corrupt ({e})"))
        } else {
            DataError::Io {
                path: self.name.clone(),
                source: e,
            }
        }
    }

    /// "the file" or "the decompressed data", for messages about sizes.
    pub fn what(&self) -> &'static str {
        if self.gz {
            "the decompressed data"
        } else {
            "the file"
        }
    }

    /// Reads as many bytes as possible into `buf` (short only at end of data).
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut n = 0;
        if !self.pending.is_empty() {
            let k = self.pending.len().min(buf.len());
            buf[..k].copy_from_slice(&self.pending[..k]);
            self.pending.drain(..k);
            n = k;
        }
        while n < buf.len() {
            match self.reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        self.pos += n as u64;
        Ok(n)
    }

    /// Returns up to `n` leading bytes without consuming them (fewer only if the data is shorter).
    pub fn peek(&mut self, n: usize) -> Result<Vec<u8>, DataError> {
        if self.pending.len() < n {
            let have = self.pending.len();
            let mut more = vec![0u8; n - have];
            let pos = self.pos;
            let pending = std::mem::take(&mut self.pending);
            let k = self.fill(&mut more)?;
            self.pos = pos; // peeking consumes nothing
            self.pending = pending;
            self.pending.extend_from_slice(&more[..k]);
        }
        Ok(self.pending[..n.min(self.pending.len())].to_vec())
    }

    /// Reads exactly `n` header bytes; `what` names the header in the error if the data ends early.
    pub fn header(&mut self, n: usize, what: &str) -> Result<Vec<u8>, DataError> {
        let mut buf = vec![0u8; n];
        let start = self.pos;
        let k = self.fill(&mut buf)?;
        if k < n {
            return Err(self.format_err(format!(
                "truncated: {} ends inside {what} (which needs {} bytes, it holds {})",
                self.what(),
                start + n as u64,
                start + k as u64
            )));
        }
        Ok(buf)
    }

    /// Checks, before anything is allocated, that exactly `nbytes` follow the current position
    /// when the total size is known (plain files). `claim` describes what the header promised.
    /// Returns how many elements of `elem` bytes can safely be reserved.
    pub fn check_payload(&self, nbytes: u64, elem: u64, claim: &str) -> Result<usize, DataError> {
        let expected = self.pos.checked_add(nbytes).ok_or_else(|| {
            self.format_err(format!(
                "{claim}: that size is impossible (overflows 64 bits)"
            ))
        })?;
        match self.total {
            Some(total) if total < expected => Err(self.truncated(claim, expected, total)),
            Some(total) if total > expected => Err(self.trailing(claim, expected, total)),
            Some(_) => Ok(usize::try_from(nbytes / elem).unwrap_or(usize::MAX)),
            None => Ok(usize::try_from(nbytes.min(GZ_RESERVE_CAP) / elem).unwrap_or(0)),
        }
    }

    fn truncated(&self, claim: &str, expected: u64, found: u64) -> DataError {
        self.format_err(format!(
            "truncated: {claim}, so {expected} bytes are expected, but {} holds only {found}",
            self.what()
        ))
    }

    fn trailing(&self, claim: &str, expected: u64, found: u64) -> DataError {
        self.format_err(format!(
            "{} unexpected trailing bytes: {claim}, so {expected} bytes are expected, but {} holds {found}",
            found - expected,
            self.what()
        ))
    }

    /// Streams exactly `nbytes` to `sink` in chunks whose lengths are multiples of `elem`, then
    /// requires the data to end there. Call `check_payload` first.
    pub fn stream(
        &mut self,
        nbytes: u64,
        elem: usize,
        claim: &str,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), DataError> {
        let expected = self.pos + nbytes;
        let chunk = (CHUNK / elem.max(1)).max(1) * elem.max(1);
        let mut buf = vec![0u8; chunk.min(usize::try_from(nbytes).unwrap_or(chunk)).max(1)];
        let mut left = nbytes;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let k = self.fill(&mut buf[..want])?;
            if k < want {
                return Err(self.truncated(claim, expected, self.pos));
            }
            sink(&buf[..k]);
            left -= k as u64;
        }
        // Anything after the payload means the header and the data disagree.
        let mut probe = vec![0u8; 64 << 10];
        let mut extra = 0u64;
        loop {
            let k = self.fill(&mut probe)?;
            if k == 0 {
                break;
            }
            extra += k as u64;
        }
        if extra > 0 {
            return Err(self.trailing(claim, expected, expected + extra));
        }
        Ok(())
    }
}

fn is_gzip(reader: &mut BufReader<File>) -> io::Result<bool> {
    use std::io::BufRead;
    let buf = reader.fill_buf()?;
    Ok(buf.starts_with(&[0x1f, 0x8b]))
}

/// Positional read that leaves no shared cursor, so several threads may read one file at once.
#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
pub(crate) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while reading",
                ));
            }
            Ok(k) => {
                buf = &mut buf[k..];
                offset += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // No positional reads here: seek then read (concurrent readers of one file would race).
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}
