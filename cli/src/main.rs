//! The `meridianctl` binary: parses the command line, runs it, and maps the outcome to an exit
//! code (0 success, 1 any error, 2 usage errors as clap reports them).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use meridianctl::args::Cli;
use meridianctl::commands::{self, CommandError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            // A reader that went away (`| head`) is not worth a message.
            let broken_pipe = matches!(&err, CommandError::Write { source }
                if source.kind() == std::io::ErrorKind::BrokenPipe);
            if let (Some(message), false) = (err.message(), broken_pipe) {
                // Nothing useful can be done if stderr itself is gone.
                let _ = writeln!(std::io::stderr(), "{message}");
            }
            ExitCode::FAILURE
        }
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command on a single-threaded runtime (one request at a time is all a CLI needs).
fn run(cli: &Cli) -> anyhow::Result<Result<(), CommandError>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    Ok(runtime.block_on(commands::run(cli, &mut stdout.lock(), &mut stderr.lock())))
}
