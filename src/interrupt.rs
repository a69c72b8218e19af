//! A process-wide stop request (Ctrl-C). Engines look at it after every batch and abandon the
//! epoch, leaving `theta` as the last complete epoch made it, so a checkpoint of that state
//! resumes exactly.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks running work to stop after its current batch.
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

pub fn clear() {
    STOP.store(false, Ordering::SeqCst);
}
