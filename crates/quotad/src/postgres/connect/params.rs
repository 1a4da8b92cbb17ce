//! Takes the TLS parameters tokio-postgres does not know (or knows only in
//! part) out of a libpq connection string, in either of libpq's two forms: a
//! URL (`postgres://user@host/db?sslmode=verify-full&sslrootcert=/ca.pem`) or
//! `key=value` pairs (`host=db.example sslmode=verify-full`). Everything else
//! is handed on untouched, for tokio-postgres to parse (and refuse) as before.
//!
//! The grammar mirrors tokio-postgres's own parser (`tokio_postgres::Config`'s
//! `FromStr`), so that what is left is read the same as the whole string
//! would have been.

use percent_encoding::percent_decode_str;

/// What the string said about TLS, as written (checked by the caller).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct TlsParams {
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
}

impl TlsParams {
    /// Records `key`'s value if it is one of ours; false if it is not.
    fn take(&mut self, key: &str, value: String) -> bool {
        match key {
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            _ => return false,
        }
        true
    }
}

/// The string without `sslmode` and `sslrootcert`, and their values. A later
/// occurrence of a key wins, as in libpq.
pub(super) fn split(conninfo: &str) -> Result<(String, TlsParams), String> {
    for prefix in ["postgres://", "postgresql://"] {
        if let Some(rest) = conninfo.strip_prefix(prefix) {
            let (rest, params) = split_url(rest)?;
            return Ok((format!("{prefix}{rest}"), params));
        }
    }
    split_key_value(conninfo)
}

/// A URL after its scheme. The query starts at the first `?` after the
/// credentials (which end at the first `@`, as tokio-postgres reads them: a
/// password may hold a `?`).
fn split_url(rest: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    let after_credentials = rest.find('@').map_or(0, |at| at + 1);
    let Some(query_at) = rest[after_credentials..]
        .find('?')
        .map(|at| after_credentials + at)
    else {
        return Ok((rest.to_string(), params));
    };
    let (head, query) = (&rest[..query_at], &rest[query_at + 1..]);
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let ours = match pair.split_once('=') {
            Some((key, value)) => params.take(&decode(key)?, decode(value)?),
            None => false,
        };
        if !ours {
            kept.push(pair);
        }
    }
    if kept.is_empty() {
        return Ok((head.to_string(), params));
    }
    Ok((format!("{head}?{}", kept.join("&")), params))
}

fn decode(text: &str) -> Result<String, String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|e| {
            format!("invalid connection string: a parameter is not UTF-8 once decoded: {e}")
        })
}

/// `key = value` pairs separated by white space; a value is either bare (up
/// to the next white space) or in single quotes, with `\` escaping the next
/// character in both. The pairs that are not ours are written back quoted.
fn split_key_value(conninfo: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "invalid connection string: `=` expected after `{key}`"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        let mut closed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c if c.is_whitespace() && !quoted => break,
                c => value.push(c),
            }
        }
        if quoted && !closed {
            return Err(format!(
                "invalid connection string: the value of `{key}` has no closing quote"
            ));
        }
        if !quoted && value.is_empty() {
            return Err(format!("invalid connection string: `{key}` has no value"));
        }
        if !params.take(&key, value.clone()) {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{escaped}'"));
        }
    }
    Ok((kept.join(" "), params))
}
