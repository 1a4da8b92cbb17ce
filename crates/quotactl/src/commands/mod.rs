//! The commands: [`run`] dispatches each subcommand to one small function that builds the
//! request, makes the call and returns the response message, which knows how to show itself
//! ([`ToJson`](crate::output::ToJson), [`Render`](crate::output::Render)). One file per command
//! group; the paging that listings share is here.

mod allocations;
mod analytics;
mod gate;
mod history;
mod requests;
mod schools;
mod sync;

use crate::cli::{Cli, Command, PoolCommand};
use crate::connect::Server;
use crate::error::CliError;
use crate::output::{show, Output};

/// Items asked for per page when listing schools or history: the most the server gives.
const PAGE_SIZE: u32 = 1000;

/// Most pages read by one listing (ten million items at [`PAGE_SIZE`]): a bound, so that a server
/// that never says "last page" cannot keep the client looping.
const PAGES_MAX: usize = 10_000;

/// Runs the command and renders its response, as JSON or for a person.
pub async fn run(cli: Cli) -> Result<Output, CliError> {
    let server = Server::new(&cli)?;
    let json = cli.json;
    let rendered = match cli.command {
        Command::School(command) => schools::run_school(&server, command, json).await?,
        Command::Pool(PoolCommand::Set(args)) => {
            show(schools::set_pool(server.admin().await?, args).await?, json)
        }
        Command::Alloc(command) => return allocations::run_alloc(&server, command, json).await,
        Command::Request(command) => requests::run_request(&server, command, json).await?,
        Command::History(command) => return history::run_history(&server, command, json).await,
        Command::Report(args) => show(
            analytics::usage_report(server.admin().await?, args).await?,
            json,
        ),
        Command::Consume(args) => show(gate::consume(server.gate().await?, args).await?, json),
        Command::Check(args) => show(gate::check(server.gate().await?, args).await?, json),
        Command::Reserve(args) => show(gate::reserve(server.gate().await?, args).await?, json),
        Command::Commit(args) => show(gate::commit(server.gate().await?, args).await?, json),
        Command::Release(args) => show(gate::release(server.gate().await?, args).await?, json),
        Command::Usage(args) => show(gate::usage(server.gate().await?, args).await?, json),
        Command::Rollups(args) => {
            show(analytics::rollups(server.admin().await?, args).await?, json)
        }
        Command::Suggest(args) => {
            show(analytics::suggest(server.admin().await?, args).await?, json)
        }
        Command::Alerts(args) => show(analytics::alerts(server.admin().await?, args).await?, json),
        Command::Sync(args) => show(sync::send(server.gate().await?, args).await?, json),
    };
    Ok(Output::text(rendered))
}

/// The token of the next page, refusing one that would list the same page again forever.
fn next_page_token(current: &str, next: String) -> Result<String, CliError> {
    if next == current {
        return Err(CliError::Paging(format!(
            "the server gave page token {next:?} twice; stopped instead of looping"
        )));
    }
    Ok(next)
}

fn too_many_pages() -> CliError {
    CliError::Paging(format!(
        "the listing did not end after {PAGES_MAX} pages; stopped"
    ))
}
