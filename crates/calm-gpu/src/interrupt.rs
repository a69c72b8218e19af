//! Hidden files of work in progress, to delete when the process is made to exit at once (a
//! second Ctrl-C in the CLI), when no destructor runs. Stopping work itself goes through a
//! [`crate::CancelToken`].

static REMOVE_ON_EXIT: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

/// Files to delete if the process is made to exit at once (a second Ctrl-C), when no destructor
/// runs: hidden files of work in progress that would otherwise be left behind.
pub fn remove_on_exit(path: &std::path::Path) {
    let mut list = REMOVE_ON_EXIT.lock().unwrap_or_else(|e| e.into_inner());
    list.push(path.to_path_buf());
}

/// `path` is finished with (renamed or deleted): no longer removed at exit.
pub fn keep_on_exit(path: &std::path::Path) {
    let mut list = REMOVE_ON_EXIT.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|p| p != path);
}

/// Deletes the files of [`remove_on_exit`]; called just before an immediate exit.
pub fn remove_pending_files() {
    // try_lock: the handler must not wait on a lock another thread might hold forever.
    if let Ok(list) = REMOVE_ON_EXIT.try_lock() {
        for p in list.iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}
