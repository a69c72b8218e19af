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

/// An advisory lock that one run holds on an output for as long as it works towards it, so that
/// a second run writing the same file (a job array given one `--out`, a `--resume` started
/// twice) is refused at its start instead of training beside the first and overwriting its
/// checkpoints. The lock is `flock` on a hidden file beside the output, `.NAME.lock`, removed
/// when the guard drops; the kernel releases the lock itself if the process dies, so a file left
/// behind by a kill is simply taken over by the next run.
pub struct OutputLock {
    path: PathBuf,
    _file: File,
    /// Directories made for the lock file, deepest first: removed again if still empty.
    made: Vec<PathBuf>,
}

/// Why [`OutputLock::acquire`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock.
    Held(PathBuf),
    /// Creating the lock file or its directory, or locking it, failed (the path named).
    Io(PathBuf, std::io::Error),
}

impl OutputLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock for `output`; `None` for outputs that are not regular files (a pipe, a
    /// device: nothing is replaced there, so there is nothing to race for). Creates missing
    /// parent directories, as writing the output would, and removes them again when the lock
    /// goes if nothing was written into them (a run that fails leaves no empty directory).
    pub fn acquire(output: &Path) -> Result<Option<Self>, LockError> {
        if fs::metadata(output).is_ok_and(|m| !m.is_file()) || names_a_directory(output) {
            return Ok(None);
        }
        let Some(name) = output.file_name() else {
            return Ok(None);
        };
        let dir = match output.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let made: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(dir).map_err(|e| LockError::Io(dir.to_path_buf(), e))?;
        let mut lock_name = std::ffi::OsString::from(".");
        lock_name.push(name);
        lock_name.push(".lock");
        let path = dir.join(lock_name);
        let io = |e| LockError::Io(path.clone(), e);
        // A holder removes the file while it still holds the lock: a run that opened the old
        // file and gets the lock after that holds a lock on nothing, so it checks that the path
        // still names the file it locked, and tries again if not.
        for _ in 0..100 {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(LockError::Held(path)),
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
            if same_file(&file, &path) {
                // A second Ctrl-C exits at once, without drops: the file goes then too.
                crate::interrupt::remove_on_exit(&path);
                return Ok(Some(Self {
                    path,
                    _file: file,
                    made,
                }));
            }
        }
        Err(io(std::io::Error::other(
            "the lock file keeps being replaced",
        )))
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked (the file handle closes after this), so no other run can
        // hold the lock on the name being removed; on Windows an open file may not be removed,
        // and the file stays (it is taken over by the next run).
        let _ = fs::remove_file(&self.path);
        crate::interrupt::keep_on_exit(&self.path);
        for d in &self.made {
            // Fails, as it should, once the run wrote something there.
            let _ = fs::remove_dir(d);
        }
    }
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

    #[test]
    fn one_lock_per_output_and_none_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/m.safetensors");
        let lock = dir.path().join("new/.m.safetensors.lock");
        let first = OutputLock::acquire(&out)
            .unwrap()
            .expect("a regular file is locked");
        assert_eq!(first.path(), lock);
        assert!(lock.exists());
        // A second holder, even in the same process (flock is per open file), is refused.
        match OutputLock::acquire(&out) {
            Err(LockError::Held(p)) => assert_eq!(p, lock),
            other => panic!("expected Held, got {:?}", other.map(|l| l.is_some())),
        }
        drop(first);
        assert!(!lock.exists());
        // The directory made for the lock went with it: nothing was written there.
        assert!(!dir.path().join("new").exists());
        // A file left by a killed holder is locked by nobody: taken over.
        fs::create_dir(dir.path().join("new")).unwrap();
        fs::write(&lock, b"").unwrap();
        let again = OutputLock::acquire(&out).unwrap().unwrap();
        fs::write(&out, b"model").unwrap();
        drop(again);
        assert!(!lock.exists());
        // A directory the run wrote into stays.
        assert_eq!(fs::read(&out).unwrap(), b"model");
        // No lock for what is not replaced: a device, or a path naming a directory.
        #[cfg(unix)]
        assert!(
            OutputLock::acquire(Path::new("/dev/null"))
                .unwrap()
                .is_none()
        );
        let slash = PathBuf::from(format!("{}/", dir.path().join("d").display()));
        assert!(OutputLock::acquire(&slash).unwrap().is_none());
    }
}
