//! The `meridianctl` binary: parses the command line, runs it, and maps the outcome to an exit
//! code (0 success, 1 any error, 2 usage errors as clap reports them).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use meridianctl::args::{Cli, Command};
use meridianctl::commands::{self, CommandError};
use tracing::Instrument as _;

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

/// Runs the command as one span, `meridianctl <command>`, exported when the `OTEL_*` variables
/// ask for it (the calls it makes carry its trace context, so an apply's trace runs from here to
/// every agent's ack). One worker thread: it drives the span exporter while `main` waits for the
/// last spans to be sent.
fn run(cli: &Cli) -> anyhow::Result<Result<(), CommandError>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Logs only when RUST_LOG asks: the CLI's output is its answer.
    runtime.block_on(async { meridian_common::telemetry::init_with_service("off", "meridianctl") });
    let span = tracing::info_span!(
        target: "meridian",
        "meridianctl",
        otel.name = format!("meridianctl {}", command_name(&cli.command)),
        otel.kind = "client",
    );
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let outcome = runtime
        .block_on(commands::run(cli, &mut stdout.lock(), &mut stderr.lock()).instrument(span));
    meridian_common::telemetry::shutdown();
    Ok(outcome)
}

/// The command's name in span names, e.g. `apply`, `get`, `explain`.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Apply(_) => "apply",
        Command::Get(_) => "get",
        Command::Describe { .. } => "describe",
        Command::Delete { .. } => "delete",
        Command::Logs(_) => "logs",
        Command::Status(_) => "status",
        Command::Explain(_) => "explain",
    }
}
