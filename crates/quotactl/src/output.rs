//! What a run prints, and the helpers every response's printing shares: [`ToJson`] for scripts,
//! [`Render`] for people, [`show`] to pick one, and the table, timestamp and cell formats. Each
//! response type's own `ToJson` and `Render` live beside the call that returns it, in `commands`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use crate::error::CliError;

/// What a run prints on stdout, and the failure to report after it when the answer is itself
/// bad news (a broken audit trail).
pub struct Output {
    pub stdout: Vec<u8>,
    pub failure: Option<CliError>,
}

impl Output {
    /// A rendered response, printed with a final line break.
    pub fn text(text: String) -> Self {
        let mut stdout = text.into_bytes();
        stdout.push(b'\n');
        Self {
            stdout,
            failure: None,
        }
    }

    /// Bytes printed as they are (a CSV export).
    pub fn bytes(stdout: Vec<u8>) -> Self {
        Self {
            stdout,
            failure: None,
        }
    }
}

/// A response as JSON, built by hand because prost types do not derive Serialize. Field names
/// follow the proto; u64 stays a JSON number; timestamps stay milliseconds since the epoch.
pub trait ToJson {
    fn to_json(&self) -> Value;
}

pub fn list_json<T: ToJson>(items: &[T]) -> Value {
    Value::Array(items.iter().map(ToJson::to_json).collect())
}

/// A response shown to a person: a line, or a few lines and a table.
pub trait Render: ToJson {
    fn render(&self) -> String;
}

pub fn show<R: Render>(response: R, json: bool) -> String {
    if json {
        response.to_json().to_string()
    } else {
        response.render()
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC ("2025-09-01T00:00:00Z", with milliseconds only
/// when there are some); "-" when unset.
pub fn timestamp_text(ms: i64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms (out of range)"),
        |time| time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

pub fn on_off(flag: bool) -> &'static str {
    if flag {
        "on"
    } else {
        "off"
    }
}

/// Left-aligned columns, each as wide as its widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let header_cells: Vec<String> = headers.iter().map(|header| header.to_string()).collect();
    std::iter::once(&header_cells)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// "-" for an empty cell, so that columns stay readable.
pub fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

pub fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}
