//! Where log records and the local snapshot are kept. The trait is small so
//! that the same tests run against sled and against memory, and so that a
//! failing store can be injected.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::StorageError;

/// One encoded record at its log position.
pub type Entry = (u64, Vec<u8>);

pub trait LogStore: Send + Sync + 'static {
    /// Writes records; they are durable only after [`LogStore::flush`].
    fn append(&self, entries: &[Entry]) -> Result<(), StorageError>;
    /// Makes everything written so far durable (fsync).
    fn flush(&self) -> Result<(), StorageError>;
    /// Records after `wal_seq`, in order.
    fn read_after(&self, wal_seq: u64) -> Result<Vec<Entry>, StorageError> {
        self.read_range(wal_seq, usize::MAX)
    }
    /// At most `limit` records after `wal_seq`, in order: for reading a long
    /// log in bounded pieces.
    fn read_range(&self, wal_seq: u64, limit: usize) -> Result<Vec<Entry>, StorageError>;
    /// Replaces the snapshot; it covers every record up to `wal_seq`.
    fn write_snapshot(&self, wal_seq: u64, bytes: &[u8]) -> Result<(), StorageError>;
    fn read_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError>;
    /// Drops records up to and including `wal_seq` (a snapshot covers them).
    fn truncate_through(&self, wal_seq: u64) -> Result<(), StorageError>;
    /// Records that every position up to `wal_seq` is durable: recovery
    /// refuses a log that ends before it (a damaged or lost record), where it
    /// would otherwise serve less than was acknowledged. Called by the WAL
    /// writer after each group commit; the mark itself may reach the disk a
    /// little later, so after a power cut it is a lower bound, never more
    /// than what was durable.
    fn mark_durable(&self, wal_seq: u64) -> Result<(), StorageError>;
    /// The last mark, as found at open or set since; None when none was ever
    /// written (a new data directory, or one from before the mark existed).
    fn durable_mark(&self) -> Result<Option<u64>, StorageError>;
    /// A small named value kept beside the log (the history record), or None.
    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Replaces a named value; durable only after [`LogStore::flush`].
    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError>;
}

/// The embedded default: sled, under the data directory.
///
/// sled's own flush is not an fsync on Linux: it writes with `pwrite` and
/// waits with `sync_file_range`, which persists neither a grown file's size
/// nor the drive's write cache, and it never syncs a directory. So
/// [`SledLog::flush`] follows sled's flush with an `fdatasync` of the log file
/// and an fsync of every file sled created since the last flush (blobs: values
/// too large to sit in the log, such as the local snapshot; its own snapshot
/// files; the config), and of the directories that gained or lost entries.
pub struct SledLog {
    db: sled::Db,
    wal: sled::Tree,
    meta: sled::Tree,
    /// sled's log file, opened a second time: an `fdatasync` of any
    /// descriptor of a file makes its written data durable.
    log_file: std::fs::File,
    files: Mutex<DirectoryListing>,
    mark: Mutex<DurableMark>,
}

const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// How long [`SledLog::open`] waits for another holder of the lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledLog {
    /// Opens (or creates) the database and makes the directory itself
    /// durable, so that a newly created data directory cannot vanish whole.
    /// sled holds an exclusive file lock; a quotad that has just stopped may
    /// take a moment to let go of it (its last I/O finishes on sled's own
    /// threads), so a held lock is waited for up to [`LOCK_WAIT`].
    ///
    /// A panic inside sled while opening (seen with a damaged log) is
    /// returned as [`StorageError::Damaged`], not a backtrace.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let created = missing_ancestors(path);
        let db = open_sled(path)?;
        let wal = db.open_tree("wal")?;
        let meta = db.open_tree("meta")?;
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| io_error(&format!("open {}", path.join("db").display()), e))?;
        let files = DirectoryListing::new(path);
        let mark = DurableMark::open(&path.join(DURABLE_MARK_FILE))?;
        let log = Self {
            db,
            wal,
            meta,
            log_file,
            files: Mutex::new(files),
            mark: Mutex::new(mark),
        };
        log.flush()?;
        // Directories created for the data directory: each is an entry of its parent.
        for dir in created {
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(log)
    }
}

fn open_sled(path: &Path) -> Result<sled::Db, StorageError> {
    let started = std::time::Instant::now();
    loop {
        // sled flushes on its own every 500 ms by default; quotad flushes
        // itself (group commit), so that a flush means "these are durable".
        let config = sled::Config::new().path(path).flush_every_ms(None);
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|panic| {
                StorageError::Damaged(format!(
                    "sled panicked while opening: {}",
                    panic_message(&panic)
                ))
            })?;
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StorageError::Locked(e.to_string()))
            }
            Err(sled::Error::Corruption { at, .. }) => {
                return Err(StorageError::Damaged(format!(
                    "sled found a damaged page at {at:?}"
                )))
            }
            opened => return Ok(opened?),
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// `path` and those of its ancestors that do not exist yet (deepest first).
fn missing_ancestors(path: &Path) -> Vec<std::path::PathBuf> {
    path.ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
        .map(Path::to_path_buf)
        .collect()
}

fn io_error(what: &str, error: std::io::Error) -> StorageError {
    StorageError::Io(format!("{what}: {error}"))
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(&format!("fsync the directory {}", dir.display()), e))
}

/// The files of the data directory and of its `blobs/`, as last synced, with
/// their length and modification time. Every flush compares them with the
/// directories as they are now: a file that is new or has changed since it
/// was synced is fsynced (sled writes a blob on the thread that makes the
/// change, so a listing can catch one half written: it is synced again once
/// it is whole), and a directory that gained or lost an entry is fsynced too
/// (a rename or a removal is an entry of the directory, not of the file).
/// The log file and the durable mark are left out: each has its own sync.
struct DirectoryListing {
    root: std::path::PathBuf,
    known: Listing,
}

type Listing = std::collections::BTreeMap<std::path::PathBuf, (u64, std::time::SystemTime)>;

impl DirectoryListing {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            known: Default::default(),
        }
    }

    fn sync_changes(&mut self) -> Result<(), StorageError> {
        let blobs = self.root.join("blobs");
        for dir in [self.root.clone(), blobs] {
            let now = list(&dir)?;
            let in_dir = |p: &std::path::PathBuf| p.parent() == Some(dir.as_path());
            let before: Listing = self
                .known
                .iter()
                .filter(|(p, _)| in_dir(p))
                .map(|(p, v)| (p.clone(), *v))
                .collect();
            if now == before {
                continue;
            }
            for (file, version) in &now {
                if before.get(file) != Some(version) {
                    sync_file(file)?;
                }
            }
            if !now.keys().eq(before.keys()) && dir.exists() {
                sync_dir(&dir)?;
            }
            self.known.retain(|p, _| !in_dir(p));
            self.known.extend(now);
        }
        Ok(())
    }
}

/// The files (not directories) in `dir` with their length and modification
/// time, but for the log file and the mark; none when `dir` does not exist.
fn list(dir: &Path) -> Result<Listing, StorageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(io_error(&format!("list {}", dir.display()), e)),
    };
    let mut files = Listing::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(&format!("list {}", dir.display()), e))?;
        let name = entry.file_name();
        if name == "db" || name == DURABLE_MARK_FILE {
            continue;
        }
        // Gone between the listing and the look (sled removes superseded
        // blobs on its own threads): nothing to sync.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.insert(entry.path(), (meta.len(), modified));
        }
    }
    Ok(files)
}

/// fsync of a file that may have been removed meanwhile (sled drops
/// superseded blobs and snapshot files on its own threads).
fn sync_file(path: &Path) -> Result<(), StorageError> {
    match std::fs::File::open(path).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(&format!("fsync {}", path.display()), e)),
    }
}

impl LogStore for SledLog {
    fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (seq, bytes) in entries {
            batch.insert(&seq.to_be_bytes(), bytes.as_slice());
        }
        self.wal.apply_batch(batch)?;
        Ok(())
    }

    /// The durability point: sled's flush writes every pending record, then
    /// `fdatasync` makes them (and the file's size) durable, then new files
    /// and changed directories are synced.
    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        self.log_file
            .sync_data()
            .map_err(|e| io_error("fdatasync the log file", e))?;
        lock(&self.files).sync_changes()
    }

    fn read_range(&self, wal_seq: u64, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let Some(from) = wal_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.wal
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                let seq = <[u8; 8]>::try_from(key.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        StorageError::Codec(format!("a WAL key of {} bytes", key.len()))
                    })?;
                Ok((seq, value.to_vec()))
            })
            .collect()
    }

    fn write_snapshot(&self, wal_seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let mut value = Vec::with_capacity(8 + bytes.len());
        value.extend_from_slice(&wal_seq.to_be_bytes());
        value.extend_from_slice(bytes);
        self.meta.insert(SNAPSHOT_KEY, value)?;
        Ok(())
    }

    fn read_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some(value) = self.meta.get(SNAPSHOT_KEY)? else {
            return Ok(None);
        };
        if value.len() < 8 {
            return Err(StorageError::Codec(
                "the snapshot is shorter than its header".into(),
            ));
        }
        let (seq, bytes) = value.split_at(8);
        let seq = <[u8; 8]>::try_from(seq)
            .map(u64::from_be_bytes)
            .unwrap_or_default();
        Ok(Some((seq, bytes.to_vec())))
    }

    fn truncate_through(&self, wal_seq: u64) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.wal.range(..=wal_seq.to_be_bytes()).keys() {
            batch.remove(key?);
        }
        self.wal.apply_batch(batch)?;
        Ok(())
    }

    fn mark_durable(&self, wal_seq: u64) -> Result<(), StorageError> {
        lock(&self.mark).set(wal_seq)
    }

    fn durable_mark(&self) -> Result<Option<u64>, StorageError> {
        lock(&self.mark).get()
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        // Named values live under their own prefix in the meta tree, so that
        // no name can replace the snapshot (or any key kept there later).
        let key = [b"named/", key.as_bytes()].concat();
        Ok(self.meta.get(key)?.map(|value| value.to_vec()))
    }

    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let key = [b"named/", key.as_bytes()].concat();
        self.meta.insert(key, bytes)?;
        Ok(())
    }
}

/// Keeps everything in memory: for tests, and to show what the trait promises.
/// `fail_writes` makes every later append and flush fail, like a full disk.
#[derive(Default, Clone)]
pub struct MemoryLog {
    inner: Arc<Mutex<MemoryInner>>,
    fail_writes: Arc<AtomicBool>,
}

#[derive(Default)]
struct MemoryInner {
    written: BTreeMap<u64, Vec<u8>>,
    durable: BTreeMap<u64, Vec<u8>>,
    /// Appended since the last flush (a flush moves them into `durable`).
    unflushed: Vec<Entry>,
    snapshot: Option<(u64, Vec<u8>)>,
    mark: Option<u64>,
    /// Named values ([`LogStore::write_meta`]): durable at once here, so a
    /// crash copy keeps them.
    meta: BTreeMap<String, Vec<u8>>,
}

impl MemoryLog {
    pub fn fail_writes(&self) {
        self.fail_writes.store(true, Ordering::SeqCst);
    }

    /// What would survive a crash now: the durable records and the snapshot.
    pub fn crash(&self) -> MemoryLog {
        let inner = self.lock();
        let copy = MemoryInner {
            written: inner.durable.clone(),
            durable: inner.durable.clone(),
            unflushed: Vec::new(),
            snapshot: inner.snapshot.clone(),
            mark: inner.mark,
            meta: inner.meta.clone(),
        };
        MemoryLog {
            inner: Arc::new(Mutex::new(copy)),
            fail_writes: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding this lock can only come from a test; the data is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check(&self) -> Result<(), StorageError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StorageError::Io("injected write failure".into()));
        }
        Ok(())
    }
}

impl LogStore for MemoryLog {
    fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check()?;
        let mut inner = self.lock();
        inner.written.extend(entries.iter().cloned());
        inner.unflushed.extend(entries.iter().cloned());
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.check()?;
        let mut inner = self.lock();
        let unflushed = std::mem::take(&mut inner.unflushed);
        inner.durable.extend(unflushed);
        Ok(())
    }

    fn read_range(&self, wal_seq: u64, limit: usize) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock();
        Ok(inner
            .written
            .range(wal_seq.saturating_add(1)..)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn write_snapshot(&self, wal_seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.check()?;
        self.lock().snapshot = Some((wal_seq, bytes.to_vec()));
        Ok(())
    }

    fn read_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        Ok(self.lock().snapshot.clone())
    }

    fn truncate_through(&self, wal_seq: u64) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.written.retain(|k, _| *k > wal_seq);
        inner.durable.retain(|k, _| *k > wal_seq);
        inner.unflushed.retain(|(k, _)| *k > wal_seq);
        Ok(())
    }

    fn mark_durable(&self, wal_seq: u64) -> Result<(), StorageError> {
        self.check()?;
        self.lock().mark = Some(wal_seq);
        Ok(())
    }

    fn durable_mark(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.lock().mark)
    }

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.check()?;
        self.lock().meta.insert(key.to_string(), bytes.to_vec());
        Ok(())
    }
}

/// A lock whose holder panicked still guards whole values: every writer
/// replaces them in one step.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The file, in the data directory, that holds the durable mark.
pub const DURABLE_MARK_FILE: &str = "quotad-durable-mark";
/// The mark is written in two slots in turn, so that a torn write of one
/// leaves the other whole; each is a sector apart.
const MARK_SLOT_BYTES: u64 = 512;
const MARK_MAGIC: &[u8; 4] = b"QDMK";
const MARK_VERSION: u8 = 1;
/// magic, version, 3 bytes of padding, generation, position, crc32.
const MARK_BYTES: usize = 4 + 1 + 3 + 8 + 8 + 4;
/// The mark is synced at most this often: it is written after every group
/// commit, and an `fdatasync` per commit would double the cost of each. So
/// after a power cut the mark may be up to this much behind what was durable
/// (a damaged record acknowledged in that last moment goes unnoticed);
/// after a process crash the page cache holds it exactly.
const MARK_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the log must reach (see [`LogStore::mark_durable`]).
struct DurableMark {
    file: std::fs::File,
    path: std::path::PathBuf,
    generation: u64,
    /// Err: the file exists but neither slot is whole.
    wal_seq: Result<Option<u64>, String>,
    synced_at: std::time::Instant,
}

impl DurableMark {
    fn open(path: &Path) -> Result<Self, StorageError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_error(&format!("open {}", path.display()), e))?;
        let mut bytes = Vec::new();
        use std::io::Read;
        (&file)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(&format!("read {}", path.display()), e))?;
        let slots = [0, MARK_SLOT_BYTES as usize].map(|at| decode_mark(bytes.get(at..)?));
        let newest = slots
            .into_iter()
            .flatten()
            .max_by_key(|(generation, _)| *generation);
        let (generation, wal_seq) = match newest {
            Some((generation, wal_seq)) => (generation, Ok(Some(wal_seq))),
            None if bytes.iter().all(|b| *b == 0) => (0, Ok(None)),
            None => (
                0,
                Err(format!(
                    "{} is damaged: neither copy of the mark is whole",
                    path.display()
                )),
            ),
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            generation,
            wal_seq,
            synced_at: std::time::Instant::now(),
        })
    }

    fn get(&self) -> Result<Option<u64>, StorageError> {
        self.wal_seq.clone().map_err(StorageError::Damaged)
    }

    fn set(&mut self, wal_seq: u64) -> Result<(), StorageError> {
        use std::os::unix::fs::FileExt;
        self.generation += 1;
        let at = (self.generation % 2) * MARK_SLOT_BYTES;
        self.file
            .write_all_at(&encode_mark(self.generation, wal_seq), at)
            .map_err(|e| io_error(&format!("write {}", self.path.display()), e))?;
        // A lower mark (the log was cut back: a load from Postgres, an
        // accepted loss) is synced at once: left behind a power cut, the
        // higher one would read as lost records.
        let lowered = matches!(self.wal_seq, Ok(Some(mark)) if wal_seq < mark);
        self.wal_seq = Ok(Some(wal_seq));
        if lowered || self.synced_at.elapsed() >= MARK_SYNC_INTERVAL {
            self.file
                .sync_data()
                .map_err(|e| io_error(&format!("fdatasync {}", self.path.display()), e))?;
            self.synced_at = std::time::Instant::now();
        }
        Ok(())
    }
}

fn encode_mark(generation: u64, wal_seq: u64) -> [u8; MARK_BYTES] {
    let mut bytes = [0u8; MARK_BYTES];
    bytes[..4].copy_from_slice(MARK_MAGIC);
    bytes[4] = MARK_VERSION;
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    bytes[16..24].copy_from_slice(&wal_seq.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// (generation, position) of a whole slot.
fn decode_mark(bytes: &[u8]) -> Option<(u64, u64)> {
    let bytes = bytes.get(..MARK_BYTES)?;
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(bytes[24..28].try_into().unwrap_or_default());
    let whole = &bytes[..4] == MARK_MAGIC
        && bytes[4] == MARK_VERSION
        && crc32fast::hash(&bytes[..24]) == crc;
    whole.then(|| (word(8), word(16)))
}

/// A write that reaches a [`WrappedLog`] before it is passed on.
#[derive(Debug, Clone, Copy)]
pub enum LogCall<'a> {
    Append(&'a [Entry]),
    Flush,
    TruncateThrough(u64),
}

/// Another log plus a hook ahead of every write: for tests that need a slow,
/// held, counted or panicking disk. Implement these two and the whole of
/// [`LogStore`] follows, passed on to [`WrappedLog::inner`].
pub trait WrappedLog: Send + Sync + 'static {
    fn inner(&self) -> &dyn LogStore;
    /// Runs before `call` reaches the inner log; an error stops it there.
    fn before(&self, call: LogCall<'_>) -> Result<(), StorageError>;
}

impl<T: WrappedLog> LogStore for T {
    fn append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        self.before(LogCall::Append(entries))?;
        self.inner().append(entries)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.before(LogCall::Flush)?;
        self.inner().flush()
    }
    fn read_range(&self, wal_seq: u64, limit: usize) -> Result<Vec<Entry>, StorageError> {
        self.inner().read_range(wal_seq, limit)
    }
    fn write_snapshot(&self, wal_seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner().write_snapshot(wal_seq, bytes)
    }
    fn read_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        self.inner().read_snapshot()
    }
    fn truncate_through(&self, wal_seq: u64) -> Result<(), StorageError> {
        self.before(LogCall::TruncateThrough(wal_seq))?;
        self.inner().truncate_through(wal_seq)
    }
    fn mark_durable(&self, wal_seq: u64) -> Result<(), StorageError> {
        self.inner().mark_durable(wal_seq)
    }
    fn durable_mark(&self) -> Result<Option<u64>, StorageError> {
        self.inner().durable_mark()
    }
    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner().read_meta(key)
    }
    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner().write_meta(key, bytes)
    }
}

/// Test logs shared by the storage and engine tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Condvar, Mutex};

    use super::{LogCall, LogStore, MemoryLog, WrappedLog};
    use crate::storage::StorageError;

    /// A memory log whose flushes wait while held, as a stalled disk's would.
    #[derive(Default)]
    pub(crate) struct HeldFlushes {
        pub(crate) inner: MemoryLog,
        held: Mutex<bool>,
        released: Condvar,
    }

    impl HeldFlushes {
        pub(crate) fn hold(&self) {
            *self.held.lock().unwrap() = true;
        }

        pub(crate) fn let_go(&self) {
            *self.held.lock().unwrap() = false;
            self.released.notify_all();
        }

        /// Records written to the log, flushed or not.
        pub(crate) fn written(&self) -> usize {
            self.inner.read_after(0).unwrap().len()
        }
    }

    impl WrappedLog for HeldFlushes {
        fn inner(&self) -> &dyn LogStore {
            &self.inner
        }
        fn before(&self, call: LogCall<'_>) -> Result<(), StorageError> {
            if let LogCall::Flush = call {
                let mut held = self.held.lock().unwrap();
                while *held {
                    held = self.released.wait(held).unwrap();
                }
            }
            Ok(())
        }
    }
}
