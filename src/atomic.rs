//! Replacing an output file so that no reader ever sees half of it: the bytes go to a temporary
//! file beside it, are synced, and are renamed over it. Shared by every output calm-gpu writes
//! whole (models, `.npy` features, JSON, PNG pictures).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An output path that ends in a separator (`out/`) names a directory: the file would have no
/// name of its own (`Path` drops the trailing separator, so the rename would fail only after the
/// work, with "Not a directory").
pub fn names_a_directory(path: &Path) -> bool {
    let s = path.as_os_str().to_string_lossy();
    s.ends_with('/') || s.ends_with(std::path::MAIN_SEPARATOR)
}

/// Writes `bytes` to `path`. A regular file (or none) is replaced atomically, creating missing
/// parent directories; a pipe or a device (`/dev/stdout`, `>(jq .)`, a FIFO) is written to in
/// place, since a rename would put a regular file where it was. On failure the error names the
/// path it concerns, and no temporary file is left behind.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), (PathBuf, std::io::Error)> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let refuse = |why: &str| {
        Err((
            path.to_path_buf(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
        ))
    };
    if names_a_directory(path) {
        return refuse("ends in a path separator, so it names a directory; give a file name");
    }
    if path.is_dir() {
        return refuse("is a directory; give a file name");
    }
    if fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return fs::write(path, bytes).map_err(at(path));
    }
    let Some(name) = path.file_name() else {
        return refuse("names no file");
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(at(dir))?;

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Removes the temporary file unless the rename went through.
    struct TempGuard(Option<PathBuf>);
    impl Drop for TempGuard {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = fs::remove_file(p);
            }
        }
    }
    let (tmp, mut file) = loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err((tmp, e)),
        }
    };
    let mut guard = TempGuard(Some(tmp.clone()));
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(at(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(at(path))?;
    guard.0 = None;
    // Make the rename itself durable; best effort (not every platform can open a directory).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_files_writes_pipes_in_place_and_refuses_directories() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/b/out.bin");
        replace(&f, b"one").unwrap();
        replace(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        // Only the file: no temporary left beside it.
        let names: Vec<_> = fs::read_dir(f.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let slash = PathBuf::from(format!("{}/", dir.path().join("new").display()));
        let (p, e) = replace(&slash, b"x").unwrap_err();
        assert_eq!(p, slash);
        assert!(e.to_string().contains("names a directory"), "{e}");
        assert!(!dir.path().join("new").exists());
        let (_, e) = replace(dir.path(), b"x").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        #[cfg(unix)]
        {
            // A FIFO stays a FIFO: its reader gets the bytes.
            let fifo = dir.path().join("pipe.png");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path and mode.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            // Held open for reading and writing, so that opening it never blocks and a failure
            // reads as an empty pipe instead of a hang.
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut pipe = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap();
            replace(&fifo, b"through the pipe").unwrap();
            let mut got = [0u8; 64];
            let n = pipe.read(&mut got).unwrap_or(0);
            assert_eq!(&got[..n], b"through the pipe");
            assert!(!fs::metadata(&fifo).unwrap().is_file());
        }
    }
}
