//! The device's durable journal of usage the server has not acknowledged.
//!
//! One append-only file of lines `<crc32 hex> <json>\n`, the JSON being
//! `[<format version>, <line>]`. An `add` line holds one pending usage with
//! the school and teacher it belongs to; a `done` line names the entries the
//! server answered for, by key (kind and id: an event and a reservation may
//! share an id). Every write is fsync'd before the call returns, so an entry
//! reported as recorded survives a crash, and an entry leaves the journal only
//! after the server's answer about it. A write that fails part-way is cut back
//! off the file (else the next line would be glued to its bytes and both read
//! back as one damaged line); if even that fails, the journal refuses every
//! further write rather than acknowledge a usage it may lose.
//!
//! One process at a time: the directory's lock file is held (an exclusive
//! advisory lock) for as long as the journal is open. A crash between the server's answer and the `done` line
//! means the entry is sent again; the server answers `duplicate` (ids are its
//! idempotency keys), so nothing is counted twice.
//!
//! Opening reads the file back: a torn last line (a crash mid-write) is cut
//! off, a line whose checksum fails is skipped and counted. When `done` lines
//! outnumber pending entries the file is rewritten with the pending ones only
//! (to a temporary file, fsync'd, renamed over the journal, directory fsync'd).
//! A line of another format version makes opening fail: skipping it would
//! drop usage this code does not understand.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

const JOURNAL_FILE: &str = "journal.log";
const COMPACT_FILE: &str = "journal.compact";
const LOCK_FILE: &str = "journal.lock";
/// The version of the line format this code writes and reads.
const FORMAT_VERSION: u32 = 1;
/// A line longer than this is not one this code wrote: four ids and names of
/// at most 128 bytes each, JSON quoting included, fit well inside it.
const LINE_BYTES_MAX: usize = 8 * 1024;

/// What kind of call the pending usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingKind {
    /// A consume (or a commit of a hold made offline): synced as a usage event.
    Event,
    /// A commit of a hold the server may know: replayed with Commit first.
    Commit,
}

/// One usage the server has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUsage {
    pub kind: PendingKind,
    /// Whose usage it is: synced as this school and teacher, whatever the
    /// client is configured for when the sync runs.
    pub school_id: String,
    pub teacher_id: String,
    /// The event id (or, for a commit, the reservation id).
    pub id: String,
    pub service_type: String,
    pub units: u64,
    pub model: String,
    /// When the usage happened on the device.
    pub occurred_at_ms: i64,
}

impl PendingUsage {
    /// The entry's key in the journal: its school, teacher, kind and id. The
    /// server counts an id once per teacher, so two teachers' entries with
    /// the same id are two entries here too. (Ids and names hold no `\n`.)
    pub fn key(&self) -> String {
        let kind = match self.kind {
            PendingKind::Event => "event",
            PendingKind::Commit => "commit",
        };
        format!(
            "{}\n{}\n{kind}\n{}",
            self.school_id, self.teacher_id, self.id
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Add(PendingUsage),
    Done(Vec<String>),
}

/// The journal file and its pending entries, in the order they were recorded.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// Held locked (exclusive) while the journal is open; unlocked on drop.
    _lock: File,
    /// The length of the file's complete lines: what a failed write is cut back to.
    good_bytes: u64,
    /// Why the journal refuses writes, after a failed write could not be cut off.
    broken: Option<String>,
    #[cfg(test)]
    faults: Faults,
    pending: VecDeque<PendingUsage>,
    keys: HashSet<String>,
    done_lines: usize,
    entries_max: usize,
    /// Lines skipped on open because their checksum or JSON was bad.
    pub corrupt_lines: usize,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, holding at most `entries_max`
    /// pending entries.
    pub fn open(dir: &Path, entries_max: usize) -> Result<Self, ClientError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create the journal directory", e))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(JOURNAL_FILE);
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            file: open_append(&path)?,
            _lock: lock,
            good_bytes: 0,
            broken: None,
            #[cfg(test)]
            faults: Faults::default(),
            pending: VecDeque::new(),
            keys: HashSet::new(),
            done_lines: 0,
            entries_max,
            corrupt_lines: 0,
        };
        let good_bytes = journal.read_back(&path)?;
        let file_bytes = std::fs::metadata(&path)
            .map_err(|e| io_error("read the journal's size", e))?
            .len();
        if good_bytes < file_bytes {
            tracing::warn!(
                cut_bytes = file_bytes - good_bytes,
                "the journal ended in a torn line (a crash mid-write); it is cut off"
            );
            journal
                .file
                .set_len(good_bytes)
                .and_then(|()| journal.file.sync_all())
                .map_err(|e| io_error("cut the journal's torn tail", e))?;
        }
        journal.good_bytes = good_bytes;
        Ok(journal)
    }

    /// Replays the file; returns the length of its complete lines.
    fn read_back(&mut self, path: &Path) -> Result<u64, ClientError> {
        let mut reader =
            BufReader::new(File::open(path).map_err(|e| io_error("read the journal", e))?);
        let mut good_bytes = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_error("read the journal", e))?;
            if read == 0 || line.last() != Some(&b'\n') {
                return Ok(good_bytes);
            }
            good_bytes += read as u64;
            match decode(&line)? {
                Some(Line::Add(usage)) => self.remember(usage),
                Some(Line::Done(keys)) => {
                    self.forget(&keys);
                    self.done_lines += 1;
                }
                None => {
                    self.corrupt_lines += 1;
                    tracing::error!(
                        offset = good_bytes - read as u64,
                        "a journal line is damaged and skipped"
                    );
                }
            }
        }
    }

    fn remember(&mut self, usage: PendingUsage) {
        if self.keys.insert(usage.key()) {
            self.pending.push_back(usage);
        }
    }

    fn forget(&mut self, keys: &[String]) {
        let gone: HashSet<&str> = keys.iter().map(String::as_str).collect();
        self.pending.retain(|u| !gone.contains(u.key().as_str()));
        for key in keys {
            self.keys.remove(key);
        }
    }

    /// Records a usage durably (written and fsync'd) before it returns. The
    /// same id twice is kept once: the server would count it once anyway.
    pub fn record(&mut self, usage: PendingUsage) -> Result<(), ClientError> {
        if self.keys.contains(&usage.key()) {
            return Ok(());
        }
        if self.pending.len() >= self.entries_max {
            return Err(ClientError::JournalFull {
                entries_max: self.entries_max,
            });
        }
        self.append(&Line::Add(usage.clone()))?;
        self.remember(usage);
        Ok(())
    }

    /// Removes entries the server answered for (by [`PendingUsage::key`]),
    /// durably, then compacts the file when it holds more answered than
    /// pending entries.
    pub fn remove(&mut self, keys: Vec<String>) -> Result<(), ClientError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.append(&Line::Done(keys.clone()))?;
        self.forget(&keys);
        self.done_lines += 1;
        if self.done_lines > self.pending.len() {
            self.compact()?;
        }
        Ok(())
    }

    /// The pending entries, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &PendingUsage> {
        self.pending.iter()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends one line durably. On failure the file is cut back to its last
    /// complete line; when that fails too, the journal is marked broken.
    fn append(&mut self, line: &Line) -> Result<(), ClientError> {
        if let Some(why) = &self.broken {
            return Err(ClientError::Journal(format!(
                "the journal refuses writes since a failed write could not be undone: {why}"
            )));
        }
        let bytes = encode(line)?;
        match self.write_line(&bytes) {
            Ok(()) => {
                self.good_bytes += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                if let Err(cut) = self.cut_back() {
                    tracing::error!(%error, %cut, "a failed journal write could not be cut off; the journal refuses further writes");
                    self.broken = Some(format!("{error}; cutting it off: {cut}"));
                }
                Err(io_error("write the journal", error))
            }
        }
    }

    fn write_line(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(written_bytes) = self.faults.write_fails_after_bytes.take() {
            self.file
                .write_all(&bytes[..written_bytes.min(bytes.len())])?;
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        self.file.write_all(bytes)?;
        self.file.sync_data()
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.faults.cut_back_fails {
            return Err(std::io::Error::other("injected: the cut failed too"));
        }
        self.file.set_len(self.good_bytes)?;
        self.file.sync_data()
    }

    /// Writes the pending entries to a new file and renames it over the
    /// journal: a crash leaves either the old file or the new one, both whole.
    fn compact(&mut self) -> Result<(), ClientError> {
        let path = self.dir.join(JOURNAL_FILE);
        let compact = self.dir.join(COMPACT_FILE);
        let mut bytes = Vec::new();
        for usage in &self.pending {
            bytes.extend(encode(&Line::Add(usage.clone()))?);
        }
        File::create(&compact)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&compact, &path))
            .map_err(|e| io_error("compact the journal", e))?;
        // From the rename on, the old handle points at the replaced file: a
        // failure now must not leave the journal writing through it.
        let synced = File::open(&self.dir).and_then(|d| d.sync_all());
        if let Err(e) = synced {
            self.broken = Some(format!(
                "syncing the journal's directory after compaction: {e}"
            ));
            return Err(io_error("compact the journal", e));
        }
        // The old handle now points at the replaced file: writing through it
        // would be lost, so without a new one the journal takes no writes.
        self.file = open_append(&path).inspect_err(|e| {
            self.broken = Some(format!("reopening the compacted journal: {e}"));
        })?;
        self.good_bytes = bytes.len() as u64;
        self.done_lines = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, ClientError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error("open the journal", e))
}

/// Takes the directory's lock, or says another client holds it.
fn lock_dir(dir: &Path) -> Result<File, ClientError> {
    let path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error("open the journal's lock file", e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(ClientError::JournalInUse {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error("lock the journal", e)),
    }
}

fn encode(line: &Line) -> Result<Vec<u8>, ClientError> {
    let json = serde_json::to_vec(&(FORMAT_VERSION, line))
        .map_err(|e| ClientError::Journal(format!("encode: {e}")))?;
    let mut bytes = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    bytes.extend(json);
    bytes.push(b'\n');
    if bytes.len() > LINE_BYTES_MAX {
        return Err(ClientError::Journal(format!(
            "an entry of {} bytes is longer than the {LINE_BYTES_MAX} a journal line may hold",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// A line's entry, None when its checksum or JSON is bad, an error when it
/// is whole but of a format version this code does not know.
fn decode(line: &[u8]) -> Result<Option<Line>, ClientError> {
    let Some(json) = checked_json(line) else {
        return Ok(None);
    };
    let Ok((version, line)) = serde_json::from_slice::<(u32, serde_json::Value)>(json) else {
        return Ok(None);
    };
    if version != FORMAT_VERSION {
        return Err(ClientError::Journal(format!(
            "a journal line is in format version {version}; this client reads version \
             {FORMAT_VERSION} only (was the journal written by a newer client?)"
        )));
    }
    Ok(serde_json::from_value(line).ok())
}

/// The JSON of a line whose checksum holds.
fn checked_json(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n")?;
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    (crc == crc32fast::hash(json)).then_some(json)
}

fn io_error(what: &str, error: std::io::Error) -> ClientError {
    ClientError::Journal(format!("{what}: {error}"))
}

/// Failures a test injects at the journal's write points.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// The next write stops after this many bytes and fails.
    write_fails_after_bytes: Option<usize>,
    /// Cutting a failed write off fails too.
    cut_back_fails: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(id: &str) -> PendingUsage {
        PendingUsage {
            kind: PendingKind::Event,
            school_id: "s".into(),
            teacher_id: "t1".into(),
            id: id.into(),
            service_type: "claude_messages".into(),
            units: 2,
            model: "m".into(),
            occurred_at_ms: 1_794_000_000_000,
        }
    }

    fn ids(journal: &Journal) -> Vec<String> {
        journal.pending().map(|u| u.id.clone()).collect()
    }

    #[test]
    fn the_same_id_of_two_teachers_is_two_entries_and_removing_one_keeps_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        let other = PendingUsage {
            teacher_id: "t2".into(),
            ..usage("42")
        };
        journal.record(usage("42")).unwrap();
        journal.record(other.clone()).unwrap();
        assert_eq!(
            journal.pending().count(),
            2,
            "t2's usage is not taken for t1's"
        );
        journal.remove(vec![usage("42").key()]).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(journal.pending().cloned().collect::<Vec<_>>(), [other]);
    }

    #[test]
    fn recorded_entries_survive_a_reopen_and_removed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        for id in ["a", "b", "c"] {
            journal.record(usage(id)).unwrap();
        }
        journal.record(usage("b")).unwrap();
        journal.remove(vec![usage("b").key()]).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a", "c"]);
        assert_eq!(journal.pending().next(), Some(&usage("a")));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_later_writes_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        journal.record(usage("a")).unwrap();
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"1234abcd {\"add\":{\"kind\":\"ev").unwrap();
        drop(file);
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a"]);
        journal.record(usage("b")).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a", "b"]);
        assert_eq!(journal.corrupt_lines, 0);
    }

    #[test]
    fn a_damaged_line_is_skipped_and_counted_without_losing_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        for id in ["a", "b", "c"] {
            journal.record(usage(id)).unwrap();
        }
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let damaged = text.replacen("\"b\"", "\"x\"", 1);
        std::fs::write(&path, damaged).unwrap();
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a", "c"]);
        assert_eq!(journal.corrupt_lines, 1);
    }

    #[test]
    fn compaction_keeps_exactly_the_pending_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1000).unwrap();
        for n in 0..50 {
            journal.record(usage(&format!("e{n}"))).unwrap();
        }
        for n in 0..48 {
            journal.remove(vec![usage(&format!("e{n}")).key()]).unwrap();
        }
        let lines = std::fs::read_to_string(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 50, "compacted to {lines} lines");
        drop(journal);
        let journal = Journal::open(dir.path(), 1000).unwrap();
        assert_eq!(ids(&journal), ["e48", "e49"]);
        assert!(!dir.path().join(COMPACT_FILE).exists());
    }

    #[test]
    fn an_event_and_a_commit_may_share_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        let commit = PendingUsage {
            kind: PendingKind::Commit,
            ..usage("x")
        };
        journal.record(usage("x")).unwrap();
        journal.record(commit.clone()).unwrap();
        assert_eq!(journal.len(), 2);
        journal.remove(vec![usage("x").key()]).unwrap();
        assert_eq!(journal.pending().collect::<Vec<_>>(), [&commit]);
    }

    #[test]
    fn a_full_journal_refuses_instead_of_dropping() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 2).unwrap();
        journal.record(usage("a")).unwrap();
        journal.record(usage("b")).unwrap();
        let refused = journal.record(usage("c")).unwrap_err();
        assert!(matches!(
            refused,
            ClientError::JournalFull { entries_max: 2 }
        ));
        assert_eq!(ids(&journal), ["a", "b"]);
    }

    #[test]
    fn a_write_that_fails_part_way_is_cut_off_and_the_next_entry_survives() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        journal.record(usage("a")).unwrap();
        journal.faults.write_fails_after_bytes = Some(20);
        let failed = journal.record(usage("b")).unwrap_err();
        assert!(failed.to_string().contains("no space left"), "{failed}");
        assert_eq!(ids(&journal), ["a"], "a failed record is not pending");
        journal.record(usage("c")).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a", "c"], "the acknowledged c is kept");
        assert_eq!(journal.corrupt_lines, 0);
    }

    #[test]
    fn when_a_failed_write_cannot_be_cut_off_the_journal_refuses_further_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        journal.record(usage("a")).unwrap();
        journal.faults.write_fails_after_bytes = Some(20);
        journal.faults.cut_back_fails = true;
        journal.record(usage("b")).unwrap_err();
        let refused = journal.record(usage("c")).unwrap_err();
        assert!(refused.to_string().contains("refuses writes"), "{refused}");
        assert!(journal.remove(vec![usage("a").key()]).is_err());
        assert_eq!(ids(&journal), ["a"]);
        drop(journal);
        // Reopening cuts the partial line off as a torn tail: usable again.
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(ids(&journal), ["a"]);
        journal.record(usage("d")).unwrap();
        assert_eq!(ids(&journal), ["a", "d"]);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), 100).unwrap();
        let refused = Journal::open(dir.path(), 100).unwrap_err();
        assert!(
            matches!(&refused, ClientError::JournalInUse { dir: d } if d == dir.path()),
            "{refused}"
        );
        assert!(refused.to_string().contains("in use by another client"));
        drop(journal);
        Journal::open(dir.path(), 100).unwrap();
    }

    #[test]
    fn entries_keep_their_school_and_teacher_and_an_unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 100).unwrap();
        let other_teacher = PendingUsage {
            teacher_id: "t2".into(),
            school_id: "s2".into(),
            ..usage("a")
        };
        journal.record(other_teacher.clone()).unwrap();
        drop(journal);
        let journal = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(journal.pending().collect::<Vec<_>>(), [&other_teacher]);
        drop(journal);

        let json = serde_json::to_vec(&(2u32, Line::Add(usage("b")))).unwrap();
        let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
        line.extend(json);
        line.push(b'\n');
        let path = dir.path().join(JOURNAL_FILE);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&line)
            .unwrap();
        let refused = Journal::open(dir.path(), 100).unwrap_err();
        assert!(
            refused.to_string().contains("format version 2"),
            "{refused}"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record(u8),
        /// Remove the pending entries whose index is in the mask.
        Remove(u16),
        /// Close and open again, as after a clean restart.
        Reopen,
        /// A crash mid-write: a partial line at the end, then a reopen.
        TornWrite(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..40).prop_map(Op::Record),
            2 => any::<u16>().prop_map(Op::Remove),
            1 => Just(Op::Reopen),
            1 => (1usize..60).prop_map(Op::TornWrite),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the order of records, removals, restarts and torn writes,
        /// the journal holds exactly what was recorded and not yet removed,
        /// in recording order: nothing lost, nothing twice.
        #[test]
        fn the_journal_holds_exactly_the_unanswered_entries(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open(dir.path(), 1000).unwrap();
            let mut model: Vec<String> = Vec::new();
            for op in ops {
                match op {
                    Op::Record(n) => {
                        let id = format!("e{n}");
                        journal.record(usage(&id)).unwrap();
                        if !model.contains(&id) {
                            model.push(id);
                        }
                    }
                    Op::Remove(mask) => {
                        let gone: Vec<String> = model
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i < 16 && mask & (1 << i) != 0)
                            .map(|(_, id)| id.clone())
                            .collect();
                        journal.remove(gone.iter().map(|id| usage(id).key()).collect()).unwrap();
                        model.retain(|id| !gone.contains(id));
                    }
                    Op::Reopen => {
                        drop(journal);
                        journal = Journal::open(dir.path(), 1000).unwrap();
                    }
                    Op::TornWrite(bytes) => {
                        drop(journal);
                        let line = encode(&Line::Add(usage("torn"))).unwrap();
                        let mut file = OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
                        file.write_all(&line[..bytes.min(line.len() - 1)]).unwrap();
                        drop(file);
                        journal = Journal::open(dir.path(), 1000).unwrap();
                    }
                }
                proptest::prop_assert_eq!(ids(&journal), model.clone());
                proptest::prop_assert_eq!(journal.corrupt_lines, 0);
            }
        }
    }
}
