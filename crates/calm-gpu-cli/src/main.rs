//! The `calm-gpu` command: parses arguments, runs the command, prints any error as one line and
//! exits non-zero.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // A closed pipe (`calm-gpu info ... | head`) ends the process as it does other Unix tools,
    // instead of making println! panic.
    #[cfg(unix)]
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // stdout that cannot be written (a full disk, `> /dev/full`) makes println! panic: say so
    // in one line and exit 1 instead of printing a panic message and a backtrace hint.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            eprintln!("error: cannot write to standard output: {why}");
            std::process::exit(1);
        }
        default_hook(info)
    }));
    #[cfg(target_os = "linux")]
    quiet_wayland_probe();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Under mpirun (the `mpi` feature): this process becomes one rank of the job.
    if let Err(e) = cli::parallel::init() {
        eprintln!("error: MPI: {}", one_line(&e));
        return std::process::ExitCode::from(1);
    }
    match cli::run(cli) {
        Ok(()) => {
            cli::parallel::finalize();
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            let chain: Vec<String> = e.chain().map(cli_words).collect();
            // thiserror messages already include their source; print each distinct part once.
            let mut line = chain[0].clone();
            for part in &chain[1..] {
                if !line.contains(part.as_str()) {
                    line.push_str(": ");
                    line.push_str(part);
                }
            }
            eprintln!("error: {}{}", cli::parallel::rank_prefix(), one_line(&line));
            // One rank that fails ends the job (the others would wait for it forever).
            cli::parallel::exit(exit_status(&e))
        }
    }
}

/// An error in the CLI's words: the library names its parameters and settings (`kernels`,
/// `force`, a memory budget); a user of the command line set them with flags and variables.
fn cli_words(e: &(dyn std::error::Error + 'static)) -> String {
    use calm_gpu::CalmError;
    use calm_gpu::geometry::GeometryError;
    let geometry = |g: &GeometryError| match g {
        GeometryError::NoKernels => Some("--kernels must be at least 1 (got 0)".to_string()),
        GeometryError::ZeroWidth => Some("--width must be at least 1 (got 0)".to_string()),
        _ => None,
    };
    let words = match e.downcast_ref::<CalmError>() {
        Some(CalmError::Exists { path }) => {
            Some(format!("{path} already exists; pass --force to replace it"))
        }
        Some(CalmError::Geometry(g)) => geometry(g),
        Some(CalmError::GpuMemory(m)) => Some(format!(
            "{m} (the CLI's --batch, and CALM_GPU_MEMORY=<MiB> for the budget)"
        )),
        Some(_) => None,
        None => e.downcast_ref::<GeometryError>().and_then(geometry),
    };
    words.unwrap_or_else(|| e.to_string())
}

/// 130 for a run stopped by Ctrl-C (or SIGTERM), as `train` exits after its checkpoint and as
/// shells report a process ended by SIGINT, so that scripts can tell a stop from a failure (1).
fn exit_status(e: &anyhow::Error) -> u8 {
    let stopped = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<calm_gpu::CalmError>(),
            Some(calm_gpu::CalmError::Interrupted)
        )
    });
    if stopped { 130 } else { 1 }
}

/// Help and version go to stdout as clap writes them; an argument error is one line, like every
/// other error, with a pointer to the help (clap's usage block and its tips follow it otherwise;
/// its tip for "-1", `-- -1`, would not work for calm-gpu's options).
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let text = e.render().to_string();
    // clap's first paragraph is the error with what belongs to it (the arguments missing, the
    // values allowed), one item a line; later ones are tips and the usage. Of the tips, a
    // near-miss's name is kept.
    let mut lines = text.lines().map(str::trim);
    let mut line = lines.next().unwrap_or("error: bad arguments").to_string();
    for extra in lines.by_ref().take_while(|l| !l.is_empty()) {
        line.push(' ');
        line.push_str(extra);
    }
    for extra in lines {
        if let Some(tip) = extra.strip_prefix("tip: a similar") {
            line.push_str("; a similar");
            line.push_str(tip);
        }
    }
    eprintln!("{} (see --help)", one_line(&line));
    std::process::ExitCode::from(2)
}

/// Longest error line printed; the rest is counted, not shown (a damaged file's header can be
/// megabytes long and end up quoted in its error).
const MAX_ERROR_CHARS: usize = 1000;

/// An error message as one printable line ([`calm_gpu::error::printable`]).
fn one_line(msg: &str) -> String {
    calm_gpu::error::printable(msg, MAX_ERROR_CHARS)
}

/// On a headless Linux machine without `XDG_RUNTIME_DIR` (containers, batch jobs), enumerating
/// Vulkan adapters makes Mesa's Wayland support print "error: XDG_RUNTIME_DIR is invalid or not
/// set in the environment." twice, which reads as calm-gpu failing. calm-gpu never opens a
/// window, so where the variable is unset and no Wayland display is named, it points at a
/// private directory of its own (0700, this user's, under the temporary directory): the probe
/// then finds no compositor and says nothing.
#[cfg(target_os = "linux")]
fn quiet_wayland_probe() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|d| d.is_absolute() && d.is_dir());
    if usable || std::env::var_os("WAYLAND_DISPLAY").is_some() {
        return;
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("calm-gpu-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    // Only a directory of this user's that no one else can enter (not one planted by another
    // user under a shared /tmp).
    let own = std::fs::symlink_metadata(&dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0);
    if own {
        // SAFETY: called from main before any thread exists (nothing else reads or writes the
        // environment concurrently).
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_exits_130_and_a_failure_1_with_or_without_context() {
        let stop = anyhow::Error::from(calm_gpu::CalmError::Interrupted);
        assert_eq!(exit_status(&stop), 130);
        assert_eq!(
            exit_status(&stop.context("interrupted; the tuning file is unchanged")),
            130
        );
        let fail = anyhow::Error::from(calm_gpu::CalmError::Invalid("bad".into()));
        assert_eq!(exit_status(&fail.context("while reading")), 1);
        assert_eq!(exit_status(&anyhow::anyhow!("interrupted")), 1);
    }

    #[test]
    fn errors_print_as_one_printable_line() {
        assert_eq!(one_line("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let long = one_line(&"x".repeat(MAX_ERROR_CHARS + 5));
        assert!(long.ends_with("... (5 more characters)"), "{long}");
    }
}
