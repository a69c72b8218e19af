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
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            // thiserror messages already include their source; print each distinct part once.
            let mut line = chain[0].clone();
            for part in &chain[1..] {
                if !line.contains(part.as_str()) {
                    line.push_str(": ");
                    line.push_str(part);
                }
            }
            eprintln!("error: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
