//! The audit trail: an append-only list of every administrative change of a
//! school, each entry chained to the one before by a SHA-256 hash, so that an
//! edited, removed or reordered entry is found by [`AuditTrail::verify`].
//!
//! Entries are derived from WAL records when they are applied, so replaying
//! the log rebuilds exactly the same chain, hashes included.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cycle::TimestampMs;
use super::error::InvalidInput;
use super::ids::{ServiceType, TeacherId};
use super::record::Change;

pub type Hash = [u8; 32];

/// What kind of change an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    SchoolCreated,
    SettingsSet,
    PoolSet,
    AllocationSet,
    AllocationRemoved,
    AllocationStatusSet,
    RequestFiled,
    RequestApproved,
    RequestRejected,
    RequestExpired,
    CycleRolledOver,
    DataLossAccepted,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SchoolCreated => "school_created",
            Self::SettingsSet => "settings_set",
            Self::PoolSet => "pool_set",
            Self::AllocationSet => "allocation_set",
            Self::AllocationRemoved => "allocation_removed",
            Self::AllocationStatusSet => "allocation_status_set",
            Self::RequestFiled => "request_filed",
            Self::RequestApproved => "request_approved",
            Self::RequestRejected => "request_rejected",
            Self::RequestExpired => "request_expired",
            Self::CycleRolledOver => "cycle_rolled_over",
            Self::DataLossAccepted => "data_loss_accepted",
        }
    }

    /// The action [`AuditAction::as_str`] names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.as_str() == name)
    }

    pub const ALL: [Self; 12] = [
        Self::SchoolCreated,
        Self::SettingsSet,
        Self::PoolSet,
        Self::AllocationSet,
        Self::AllocationRemoved,
        Self::AllocationStatusSet,
        Self::RequestFiled,
        Self::RequestApproved,
        Self::RequestRejected,
        Self::RequestExpired,
        Self::CycleRolledOver,
        Self::DataLossAccepted,
    ];
}

/// The values a change touched, by name, as text: `{"allocated_units": "10"}`.
pub type Values = BTreeMap<String, String>;

/// An entry before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub at_ms: TimestampMs,
    pub actor: Arc<str>,
    pub action: AuditAction,
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
    pub reason: Arc<str>,
    pub before: Values,
    pub after: Values,
}

impl Draft {
    pub fn new(action: AuditAction, change: &Change) -> Self {
        Self {
            at_ms: change.at_ms,
            actor: change.by.clone(),
            action,
            teacher_id: None,
            service: None,
            reason: change.reason.clone(),
            before: Values::new(),
            after: Values::new(),
        }
    }

    pub fn slice(mut self, teacher_id: &TeacherId, service: &ServiceType) -> Self {
        self.teacher_id = Some(teacher_id.clone());
        self.service = Some(service.clone());
        self
    }

    pub fn teacher(mut self, teacher_id: &TeacherId) -> Self {
        self.teacher_id = Some(teacher_id.clone());
        self
    }

    pub fn service(mut self, service: &ServiceType) -> Self {
        self.service = Some(service.clone());
        self
    }

    pub fn before(mut self, name: &str, value: impl ToString) -> Self {
        self.before.insert(name.to_string(), value.to_string());
        self
    }

    pub fn after(mut self, name: &str, value: impl ToString) -> Self {
        self.after.insert(name.to_string(), value.to_string());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3 ... within the school.
    pub seq: u64,
    pub at_ms: TimestampMs,
    pub actor: Arc<str>,
    pub action: AuditAction,
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
    pub reason: Arc<str>,
    pub before: Values,
    pub after: Values,
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl AuditEntry {
    /// The hash of everything in the entry but the hash itself.
    pub fn compute_hash(&self) -> Hash {
        let body = (
            self.seq,
            self.at_ms,
            &self.actor,
            self.action,
            &self.teacher_id,
            &self.service,
            &self.reason,
            &self.before,
            &self.after,
            &self.prev_hash,
        );
        // Serializing plain data into a Vec cannot fail; an empty body would
        // still be chained, so a failure could not hide an entry.
        let bytes = postcard::to_stdvec(&body).unwrap_or_default();
        Sha256::digest(&bytes).into()
    }
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The first entry that does not match.
    pub seq: u64,
    pub problem: String,
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryFilter {
    pub teacher_id: Option<TeacherId>,
    pub service: Option<ServiceType>,
    /// Inclusive; None is unbounded.
    pub from_ms: Option<TimestampMs>,
    /// Exclusive; None is unbounded.
    pub to_ms: Option<TimestampMs>,
}

impl HistoryFilter {
    /// A request's time range, where 0 leaves an end open: each end set is a
    /// time since 1970, and the range is not empty.
    pub fn range(
        from_ms: i64,
        to_ms: i64,
    ) -> Result<(Option<TimestampMs>, Option<TimestampMs>), InvalidInput> {
        let end = |field: &'static str, ms: i64| match ms {
            0 => Ok(None),
            ms if ms > 0 && chrono::DateTime::from_timestamp_millis(ms).is_some() => Ok(Some(ms)),
            ms => Err(InvalidInput::new(
                field,
                format!("{ms} is not a time since 1970 in milliseconds (0 leaves this end open)"),
            )),
        };
        let (from, to) = (end("from_ms", from_ms)?, end("to_ms", to_ms)?);
        if let (Some(from), Some(to)) = (from, to) {
            if to <= from {
                return Err(InvalidInput::new(
                    "to_ms",
                    format!("{to} is not after from_ms ({from}): the range holds nothing"),
                ));
            }
        }
        Ok((from, to))
    }

    fn matches(&self, entry: &AuditEntry) -> bool {
        self.teacher_id
            .as_ref()
            .is_none_or(|t| entry.teacher_id.as_ref() == Some(t))
            && self
                .service
                .as_ref()
                .is_none_or(|s| entry.service.as_ref() == Some(s))
            && self.from_ms.is_none_or(|from| entry.at_ms >= from)
            && self.to_ms.is_none_or(|to| entry.at_ms < to)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTrail {
    entries: Vec<AuditEntry>,
}

impl AuditTrail {
    pub fn append(&mut self, draft: Draft) -> &AuditEntry {
        let (seq, prev_hash) = self
            .entries
            .last()
            .map_or((1, [0; 32]), |last| (last.seq + 1, last.hash));
        let mut entry = AuditEntry {
            seq,
            at_ms: draft.at_ms,
            actor: draft.actor,
            action: draft.action,
            teacher_id: draft.teacher_id,
            service: draft.service,
            reason: draft.reason,
            before: draft.before,
            after: draft.after,
            prev_hash,
            hash: [0; 32],
        };
        entry.hash = entry.compute_hash();
        self.entries.push(entry);
        &self.entries[self.entries.len() - 1]
    }

    /// A trail read back from storage; it must verify.
    pub fn from_entries(entries: Vec<AuditEntry>) -> Result<Self, Broken> {
        let trail = Self { entries };
        trail.verify()?;
        Ok(trail)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[AuditEntry] {
        &self.entries
    }

    /// For tests of tamper detection: the entries as stored, to edit.
    pub fn entries_mut(&mut self) -> &mut Vec<AuditEntry> {
        &mut self.entries
    }

    /// Recomputes every hash and link: an edited, removed, inserted or
    /// reordered entry breaks the chain at that entry.
    pub fn verify(&self) -> Result<(), Broken> {
        let mut prev_hash = [0; 32];
        for (i, entry) in self.entries.iter().enumerate() {
            let expected_seq = i as u64 + 1;
            if entry.seq != expected_seq {
                return Err(Broken {
                    seq: expected_seq,
                    problem: format!(
                        "entry {expected_seq} is numbered {}: an entry was removed or inserted",
                        entry.seq
                    ),
                });
            }
            if entry.prev_hash != prev_hash {
                return Err(Broken {
                    seq: entry.seq,
                    problem: format!("entry {} does not link to the entry before it", entry.seq),
                });
            }
            if entry.compute_hash() != entry.hash {
                return Err(Broken {
                    seq: entry.seq,
                    problem: format!(
                        "entry {} does not match its hash: it was changed after it was written",
                        entry.seq
                    ),
                });
            }
            prev_hash = entry.hash;
        }
        Ok(())
    }

    /// Entries that match, oldest first, starting after `after_seq`; at most
    /// `limit`. Returns the seq to continue after when there are more.
    pub fn page(
        &self,
        filter: &HistoryFilter,
        after_seq: u64,
        limit: usize,
    ) -> (Vec<AuditEntry>, Option<u64>) {
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(self.entries.len());
        let mut matching = self.entries[start..]
            .iter()
            .filter(|e| filter.matches(e))
            .cloned();
        let page: Vec<AuditEntry> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        let next = match (more, page.last()) {
            (true, Some(last)) => Some(last.seq),
            _ => None,
        };
        (page, next)
    }
}
