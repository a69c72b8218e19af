//! Stopping work from outside: a token the caller keeps a clone of and cancels (the CLI from its
//! Ctrl-C handler, a GUI from a button, a test from another thread). Engines look at it after
//! every batch and abandon the epoch, leaving `theta` as the last complete epoch made it, so a
//! checkpoint of that state resumes exactly. Each fit has its own token, so two fits in one
//! process stop separately.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A shared stop request. Clones share one flag; [`CancelToken::default`] is a fresh one.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh token, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work holding this token (or a clone) to stop after its current batch.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] has been called on this token or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(CalmError::Interrupted)` once cancelled, for `?` in loops.
    pub fn check(&self) -> crate::Result<()> {
        if self.is_cancelled() {
            Err(crate::CalmError::Interrupted)
        } else {
            Ok(())
        }
    }
}
