//! `history list|verify`: a school's audit trail, every page of it, and its hash chain.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use quotad_proto::v1::{
    HistoryEntry, ListHistoryRequest, VerifyHistoryRequest, VerifyHistoryResponse,
};
use serde_json::{json, Value};
use tonic::Status;

use super::{next_page_token, too_many_pages, PAGES_MAX, PAGE_SIZE};
use crate::cli::{HistoryCommand, HistoryListArgs, HistoryVerifyArgs};
use crate::connect::{AdminClient, Server};
use crate::error::CliError;
use crate::output::{cell, list_json, show, table, timestamp_text, Output, Render, ToJson};

/// Runs one `history` subcommand; a broken audit trail is shown, then reported as a failure.
pub async fn run_history(
    server: &Server,
    command: HistoryCommand,
    json: bool,
) -> Result<Output, CliError> {
    match command {
        HistoryCommand::List(args) => {
            let listing = list_history(server.admin().await?, args).await?;
            Ok(Output::text(show(listing, json)))
        }
        HistoryCommand::Verify(args) => {
            let school_id = args.school_id.clone();
            let verdict = verify_history(server.admin().await?, args).await?;
            if verdict.intact {
                return Ok(Output::text(show(verdict, json)));
            }
            // A broken chain is reported as an error (exit code 4); scripts asking for JSON
            // still get the answer on stdout, people get the one line on stderr.
            let mut output = if json {
                Output::text(verdict.to_json().to_string())
            } else {
                Output::bytes(Vec::new())
            };
            output.failure = Some(CliError::HistoryBroken { school_id, verdict });
            Ok(output)
        }
    }
}

/// The entries of `history list`, and whether `--limit` left some unread.
struct HistoryListing {
    entries: Vec<HistoryEntry>,
    more: bool,
}

/// Every page of the listing (or the first `--limit` entries), as one answer.
async fn list_history(
    mut admin: AdminClient,
    args: HistoryListArgs,
) -> Result<HistoryListing, CliError> {
    let from_ms = args.from_ms.unwrap_or(0);
    let to_ms = args.to_ms.unwrap_or(0);
    if from_ms > 0 && to_ms > 0 && from_ms > to_ms {
        return Err(CliError::Usage(format!(
            "--from {} is after --to {}",
            timestamp_text(from_ms),
            timestamp_text(to_ms)
        )));
    }
    let entries_max = args.limit.map_or(usize::MAX, |limit| limit as usize);
    let mut entries = Vec::new();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let left = entries_max - entries.len();
        let request = ListHistoryRequest {
            school_id: args.school_id.clone(),
            teacher_id: args.teacher_id.clone().unwrap_or_default(),
            service_type: args.service_type.clone().unwrap_or_default(),
            from_ms,
            to_ms,
            page_size: u32::try_from(left).map_or(PAGE_SIZE, |left| left.min(PAGE_SIZE)),
            page_token: page_token.clone(),
        };
        let page = admin.list_history(request).await?.into_inner();
        let last_page = page.next_page_token.is_empty();
        entries.extend(page.entries);
        if entries.len() >= entries_max {
            let more = !last_page || entries.len() > entries_max;
            entries.truncate(entries_max);
            return Ok(HistoryListing { entries, more });
        }
        if last_page {
            return Ok(HistoryListing {
                entries,
                more: false,
            });
        }
        page_token = next_page_token(&page_token, page.next_page_token)?;
    }
    Err(too_many_pages())
}

async fn verify_history(
    mut admin: AdminClient,
    args: HistoryVerifyArgs,
) -> Result<VerifyHistoryResponse, Status> {
    let request = VerifyHistoryRequest {
        school_id: args.school_id,
    };
    Ok(admin.verify_history(request).await?.into_inner())
}

/// A proto map as a JSON object with its keys sorted (the map itself has no order).
fn string_map_json(map: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    Value::Object(
        sorted
            .into_iter()
            .map(|(key, value)| (key.clone(), Value::String(value.clone())))
            .collect(),
    )
}

impl ToJson for HistoryEntry {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "seq": self.seq,
            "at_ms": self.at_ms,
            "actor": self.actor,
            "action": self.action,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "reason": self.reason,
            "before": string_map_json(&self.before),
            "after": string_map_json(&self.after),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        })
    }
}

impl ToJson for HistoryListing {
    /// `more` is true when `--limit` stopped the listing before its end.
    fn to_json(&self) -> Value {
        json!({
            "entries": list_json(&self.entries),
            "more": self.more,
        })
    }
}

impl ToJson for VerifyHistoryResponse {
    fn to_json(&self) -> Value {
        json!({
            "intact": self.intact,
            "entries": self.entries,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
        })
    }
}

/// "allocated_units 10 -> 20, priority normal -> high": what an entry changed, keys sorted.
fn change_text(entry: &HistoryEntry) -> String {
    let keys: BTreeSet<&String> = entry.before.keys().chain(entry.after.keys()).collect();
    let changes: Vec<String> = keys
        .into_iter()
        .map(|key| {
            let before = entry.before.get(key).map_or("-", String::as_str);
            let after = entry.after.get(key).map_or("-", String::as_str);
            format!("{key} {before} -> {after}")
        })
        .collect();
    cell(&changes.join(", "))
}

impl Render for HistoryListing {
    fn render(&self) -> String {
        let headers = [
            "SEQ", "TIME", "ACTOR", "ACTION", "TEACHER", "SERVICE", "CHANGE", "REASON",
        ];
        let rows: Vec<Vec<String>> = self
            .entries
            .iter()
            .map(|entry| {
                vec![
                    entry.seq.to_string(),
                    timestamp_text(entry.at_ms),
                    cell(&entry.actor),
                    entry.action.clone(),
                    cell(&entry.teacher_id),
                    cell(&entry.service_type),
                    change_text(entry),
                    cell(&entry.reason),
                ]
            })
            .collect();
        let count = rows.len();
        let mut text = format!(
            "{}\n\n{count} entr{}",
            table(&headers, &rows),
            if count == 1 { "y" } else { "ies" }
        );
        if self.more {
            text += " (--limit reached; more entries follow)";
        }
        text
    }
}

impl Render for VerifyHistoryResponse {
    fn render(&self) -> String {
        if self.intact {
            format!(
                "intact: {} entries, every hash and link matches",
                self.entries
            )
        } else {
            format!(
                "BROKEN: first bad entry {} (of {}): {}",
                self.first_bad_seq, self.entries, self.problem
            )
        }
    }
}
