//! Why a command failed, as one `<code>: <message>` line, and the exit code each kind of failure
//! maps to: the scheme that `--help` prints ([`EXIT_CODES_HELP`]), kept here beside the mapping
//! so that the two cannot drift apart.

use std::fmt;
use std::io;
use std::path::PathBuf;

use quotad_proto::v1::VerifyHistoryResponse;
use tonic::{Code, Status};

use crate::csv::LineError;

/// Printed at the end of `quotactl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (a denied consume is a success: the server answered)
  1  any other failure (e.g. the server's Internal, DeadlineExceeded or Unimplemented)
  2  refused as wrong: a bad command line, token or CSV file (nothing is sent), or the
     server's InvalidArgument, NotFound, FailedPrecondition, PermissionDenied or
     Unauthenticated
  3  the server could not be reached (no connection, or Unavailable)
  4  history verify: the school's audit trail is broken";

/// Why a command failed; each kind maps to one exit code ([`EXIT_CODES_HELP`]).
#[derive(Debug)]
pub enum CliError {
    /// `--addr` is not a URI.
    Address { addr: String, message: String },
    /// `--token` cannot be sent as a bearer token.
    Token(String),
    /// The command line asks for something impossible, found before any call.
    Usage(String),
    /// A file named on the command line cannot be read.
    ReadFile { path: PathBuf, error: io::Error },
    /// Lines of an allocation CSV file are wrong; nothing was sent.
    Csv {
        path: PathBuf,
        errors: Vec<LineError>,
    },
    /// No connection to the server.
    Connect { addr: String, message: String },
    /// The server answered with a non-OK status.
    Status(Status),
    /// The server broke the paging contract.
    Paging(String),
    /// The school's audit trail does not verify: the answer is itself the bad news.
    HistoryBroken {
        school_id: String,
        verdict: VerifyHistoryResponse,
    },
    /// The response could not be written (e.g. stdout closed).
    Output(io::Error),
    /// The export could not be written to its file.
    WriteFile { path: PathBuf, error: io::Error },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Address { .. }
            | CliError::Token(_)
            | CliError::Usage(_)
            | CliError::ReadFile { .. }
            | CliError::Csv { .. } => 2,
            CliError::Connect { .. } => 3,
            CliError::Status(status) => match status.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::PermissionDenied
                | Code::Unauthenticated => 2,
                Code::Unavailable => 3,
                _ => 1,
            },
            CliError::HistoryBroken { .. } => 4,
            CliError::Paging(_) | CliError::Output(_) | CliError::WriteFile { .. } => 1,
        }
    }

    /// Lines to print before the error itself: one per bad line of a CSV file.
    pub fn details(&self) -> Vec<String> {
        match self {
            CliError::Csv { path, errors } => errors
                .iter()
                .map(|error| format!("{} {error}", path.display()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for CliError {
    /// `<code>: <message>`, the same shape for local failures as for server statuses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Address { addr, message } => {
                write!(f, "InvalidArgument: invalid --addr {addr:?}: {message}")
            }
            // The token itself is never printed: it is a secret.
            CliError::Token(message) => write!(f, "InvalidArgument: invalid --token: {message}"),
            CliError::Usage(message) => write!(f, "InvalidArgument: {message}"),
            CliError::ReadFile { path, error } => {
                write!(
                    f,
                    "InvalidArgument: cannot read {}: {error}",
                    path.display()
                )
            }
            CliError::Csv { path, errors } => write!(
                f,
                "InvalidArgument: {}: {} bad line{}; nothing was sent to the server",
                path.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            ),
            CliError::Connect { addr, message } => {
                write!(f, "Unavailable: cannot connect to {addr}: {message}")
            }
            CliError::Status(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            CliError::Paging(message) => write!(f, "Internal: {message}"),
            CliError::HistoryBroken { school_id, verdict } => write!(
                f,
                "DataLoss: the audit trail of {school_id} is broken: first bad entry {} \
                 (of {}): {}",
                verdict.first_bad_seq, verdict.entries, verdict.problem
            ),
            CliError::Output(error) => write!(f, "Internal: cannot write output: {error}"),
            CliError::WriteFile { path, error } => {
                write!(f, "Internal: cannot write {}: {error}", path.display())
            }
        }
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Status(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_scheme() {
        assert_eq!(CliError::Status(Status::not_found("x")).exit_code(), 2);
        assert_eq!(
            CliError::Status(Status::unauthenticated("x")).exit_code(),
            2
        );
        assert_eq!(CliError::Status(Status::unavailable("x")).exit_code(), 3);
        assert_eq!(CliError::Status(Status::unimplemented("x")).exit_code(), 1);
        let broken = CliError::HistoryBroken {
            school_id: "s1".to_string(),
            verdict: VerifyHistoryResponse {
                intact: false,
                entries: 9,
                first_bad_seq: 4,
                problem: "hash mismatch".to_string(),
            },
        };
        assert_eq!(broken.exit_code(), 4);
        assert_eq!(
            broken.to_string(),
            "DataLoss: the audit trail of s1 is broken: first bad entry 4 (of 9): hash mismatch"
        );
    }
}
