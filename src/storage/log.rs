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
    /// A small named value kept beside the log (the history record), or None.
    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Replaces a named value; durable only after [`LogStore::flush`].
    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError>;
}

/// The embedded default: sled, under the data directory.
pub struct SledLog {
    db: sled::Db,
    wal: sled::Tree,
    meta: sled::Tree,
}

const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// How long [`SledLog::open`] waits for another holder of the lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledLog {
    /// Opens (or creates) the database. sled holds an exclusive file lock;
    /// a quotad that has just stopped may take a moment to let go of it (its
    /// last I/O finishes on sled's own threads), so a held lock is waited for
    /// up to [`LOCK_WAIT`] before the open fails.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let started = std::time::Instant::now();
        let db = loop {
            // sled flushes on its own every 500 ms by default; quotad flushes
            // itself (group commit), so that a flush means "these are durable".
            match sled::Config::new().path(path).flush_every_ms(None).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                opened => break opened?,
            }
        };
        let wal = db.open_tree("wal")?;
        let meta = db.open_tree("meta")?;
        Ok(Self { db, wal, meta })
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

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
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

    fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn write_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.check()?;
        self.lock().meta.insert(key.to_string(), bytes.to_vec());
        Ok(())
    }
}
