//! quotactl: the command-line client of quotad.
//!
//! Layout, by responsibility, so that the admin API can grow without a file losing its shape:
//! - [`cli`]: the command line, one clap subcommand group per resource and one subcommand per
//!   hot-path call or report;
//! - [`commands`]: [`commands::run`] dispatches each subcommand to one small function that builds
//!   the request, makes the call and returns the response message, one file per command group;
//! - every response message knows how to show itself ([`output::ToJson`] for scripts,
//!   [`output::Render`] for people), beside the call that returns it; [`output`] holds the
//!   helpers they share;
//! - [`connect`]: the channel and the bearer token, dialled only when a command needs the server;
//! - [`csv`] reads and writes the allocation files of `alloc import` and `alloc export` without
//!   doing I/O, so that its checks are tested alone;
//! - [`error`]: why a command failed, and its exit code.
//!
//! Adding a call means: a variant and its argument struct in `cli`, one function in its command
//! group, and `ToJson`/`Render` for a new response type.
//!
//! Exit codes: [`error::EXIT_CODES_HELP`], which `--help` prints.
#![deny(clippy::unwrap_used)]

mod cli;
mod commands;
mod connect;
mod csv;
mod error;
mod output;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::error::CliError;

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// One line per error on stderr (and one more per bad line of a CSV file).
fn report_error(error: &CliError) {
    for detail in error.details() {
        eprintln!("quotactl: {detail}");
    }
    eprintln!("quotactl: {error}");
}

// One call per run (or a few, for listings): a single-threaded runtime is all it needs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version, printed on stdout.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            // clap's "error: ..." with its usage hint, under this tool's prefix like every error.
            let message = error.render().to_string();
            eprint!(
                "quotactl: {}",
                message.strip_prefix("error: ").unwrap_or(&message)
            );
            return ExitCode::from(2);
        }
    };
    let result = match commands::run(cli).await {
        Ok(output) => write_stdout(&output.stdout).and_then(|()| match output.failure {
            Some(failure) => Err(failure),
            None => Ok(()),
        }),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(&error);
            ExitCode::from(error.exit_code())
        }
    }
}
