//! Checks on a command's output paths, made before any work: existing files, one file named twice, an output over an input.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::absolute;

/// Refuses to overwrite `path` without --force, before any work is done.
pub(super) fn check_output(path: &Path, force: bool) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory; give a file name", path.display());
    }
    if calm_gpu::atomic::names_a_directory(path) {
        bail!(
            "{} ends in a path separator, so it names a directory; give a file name",
            path.display()
        );
    }
    // A missing directory is created when the file is written; a file in its place cannot be.
    if let Some(blocker) = path
        .ancestors()
        .skip(1)
        .find(|d| !d.as_os_str().is_empty() && d.exists())
        .filter(|d| !d.is_dir())
    {
        bail!(
            "{}: {} is a file, not a directory",
            path.display(),
            blocker.display()
        );
    }
    // A pipe or a device (`/dev/stdout`) is written to, not replaced: no --force needed.
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    Ok(())
}

/// Creates the missing directories above `path`, for outputs written in place (not through
/// `model::write_atomic`, which does this itself).
pub(super) fn create_parent(path: &Path) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    Ok(())
}

/// Refuses a run that names one file as two of its outputs, or an output that is one of its
/// inputs: with --force the second write would destroy the first, or the data being read.
pub(super) fn check_distinct(inputs: &[&Path], outputs: &[&Path]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        let k = same_file_key(out);
        let key = |p: &&Path| same_file_key(p);
        if outputs[..i].iter().any(|o| key(o) == k) {
            bail!(
                "{} is named for two outputs of this run; give each its own file",
                out.display()
            );
        }
        if inputs.iter().any(|p| key(p) == k) {
            bail!(
                "{} is an input of this run; write the output to another file",
                out.display()
            );
        }
    }
    Ok(())
}

/// One path for a file under any spelling (`./a`, `d/../a`, a symlink): the canonical path of
/// its deepest existing ancestor (symlinks and `..` resolved by the file system), then the
/// components that do not exist yet with `.` and `..` applied, so that files not written yet
/// compare too.
fn same_file_key(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = absolute(p);
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    let canon = loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            break c;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                base = parent;
            }
            _ => break PathBuf::new(),
        }
    };
    rest.iter().rev().fold(canon, |mut acc, c| {
        match c {
            Component::ParentDir => {
                acc.pop();
            }
            Component::CurDir => {}
            c => acc.push(c),
        }
        acc
    })
}
