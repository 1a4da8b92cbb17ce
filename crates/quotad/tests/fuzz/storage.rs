//! The WAL record decoder and the snapshot decoder (`storage::codec`), and
//! recovery over what they refuse. The seeds are the records a real engine
//! wrote for the harness's set-up (schools, slices, usage, a hold, a sync,
//! a request, settings) and the state they add up to. Each case damages
//! one, sometimes fixing the checksum up afterwards so that the postcard
//! decoder behind it gets the damaged bytes too. Whatever the bytes:
//!
//! - decoding never panics; a flipped or replaced byte under an intact
//!   checksum is always refused;
//! - recovery never panics; when it refuses a damaged record, accepting the
//!   loss serves exactly the records before it: the refused record changed
//!   nothing;
//! - a damaged snapshot is refused, or (checksum fixed up) loaded and the
//!   log replayed on it, and neither panics.

use std::sync::OnceLock;

use proptest::prelude::*;
use quotad::storage::{codec, recover, recover_with, LogStore, MemoryLog, OnDamage};
use quotad_core::{Record, State};

use crate::damage::{apply, damage, Damage};
use crate::harness::{records, Harness};
use crate::{cases, runner};

/// Cases of the decoder test in the normal test run (under a second), and of
/// each recovery test (one to two seconds each).
const CASES_DECODE: u32 = 5_000;
const CASES_RECOVERY: u32 = 2_000;

/// The byte format's header: a version byte, then the payload's CRC32.
const HEADER_BYTES: usize = 5;

/// The records of the harness's set-up, encoded as the WAL holds them, and
/// the state after each prefix of them (`states[k]`: after k records).
struct Seeds {
    records: Vec<(u64, Vec<u8>)>,
    states: Vec<State>,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let harness = Harness::start();
        // Every set-up call was answered once its records were durable, so
        // the log store holds them all.
        let records = records(harness.store());
        assert!(records.len() >= 10, "{} records", records.len());
        let mut states = vec![State::default()];
        for (seq, bytes) in &records {
            let record: Record = codec::decode(bytes)
                .unwrap_or_else(|e| panic!("the seed record {seq} does not decode: {e}"));
            let mut state = states[states.len() - 1].clone();
            state.apply(*seq, &record).expect("a seed applies");
            states.push(state);
        }
        Seeds { records, states }
    })
}

/// The state after the first `count` seed records.
fn state_after(count: usize) -> &'static State {
    &seeds().states[count]
}

/// Writes the header's checksum for the payload as it now is.
fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() >= HEADER_BYTES {
        let crc = crc32fast::hash(&bytes[HEADER_BYTES..]);
        bytes[1..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }
}

/// `bytes` damaged a few times, the checksum fixed up afterwards or not,
/// and whether the result must be refused: one changed byte under the old
/// checksum (CRC32 finds every error of up to 32 bits in a row).
fn damaged(bytes: Vec<u8>) -> impl Strategy<Value = (Vec<u8>, bool)> {
    (proptest::collection::vec(damage(), 1..4), any::<bool>()).prop_map(move |(damages, fix)| {
        let mut out = bytes.clone();
        for d in &damages {
            apply(d, &mut out);
        }
        let one_byte =
            damages.len() == 1 && matches!(damages[0], Damage::FlipBit(..) | Damage::SetByte(..));
        if fix {
            fix_checksum(&mut out);
        }
        let must_refuse = one_byte && !fix && out != bytes;
        (out, must_refuse)
    })
}

/// A seed record (by index) and that record damaged.
fn damaged_record() -> impl Strategy<Value = (usize, Vec<u8>, bool)> {
    let count = seeds().records.len();
    (0..count).prop_flat_map(|i| {
        damaged(seeds().records[i].1.clone())
            .prop_map(move |(bytes, must_refuse)| (i, bytes, must_refuse))
    })
}

#[test]
fn a_damaged_or_arbitrary_wal_record_is_refused_or_decoded_and_never_panics() {
    let mut runner = runner(cases(CASES_DECODE));
    runner.run(&damaged_record(), |(_, bytes, must_refuse)| {
        let decoded = codec::decode::<Record>(&bytes);
        if must_refuse {
            prop_assert!(
                decoded.is_err(),
                "damage under the checksum was decoded: {decoded:?}"
            );
        }
        Ok(())
    });
    // Arbitrary bytes, with and without a valid header in front.
    let arbitrary = (
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    );
    runner.run(&arbitrary, |(mut bytes, framed)| {
        if framed {
            bytes.splice(0..0, [1, 0, 0, 0, 0]);
            fix_checksum(&mut bytes);
        }
        let _ = codec::decode::<Record>(&bytes);
        let _ = codec::decode::<State>(&bytes);
        Ok(())
    });
}

/// A log of the seed records with record `damaged_at` (0-based) replaced.
fn log_with(damaged_at: usize, bytes: &[u8]) -> MemoryLog {
    let store = MemoryLog::default();
    let mut entries = seeds().records.clone();
    entries[damaged_at].1 = bytes.to_vec();
    let last = entries.last().map_or(0, |(seq, _)| *seq);
    store.append(&entries).expect("append");
    store.flush().expect("flush");
    store.mark_durable(last).expect("mark");
    store
}

#[test]
fn recovery_refuses_a_damaged_record_or_serves_exactly_what_came_before_it() {
    let mut runner = runner(cases(CASES_RECOVERY));
    runner.run(&damaged_record(), |(at, bytes, must_refuse)| {
        let store = log_with(at, &bytes);
        let decodes = codec::decode::<Record>(&bytes).is_ok();
        match recover(&store) {
            Ok(recovered) => {
                prop_assert!(decodes, "a record that does not decode was served");
                prop_assert!(!must_refuse);
                prop_assert_eq!(recovered.last_seq, seeds().records.len() as u64);
            }
            Err(_) if decodes => {
                // Decoded, but the rules refused to apply it: quotad
                // refuses to start, whichever damage policy it has (and
                // says so, without a panic).
                prop_assert!(recover_with(&store, OnDamage::AcceptLoss).is_err());
            }
            Err(_) => {
                let accepted = recover_with(&store, OnDamage::AcceptLoss)
                    .map_err(|e| TestCaseError::fail(format!("accepting the loss failed: {e}")))?;
                prop_assert!(accepted.lost.is_some(), "the loss was not reported");
                prop_assert_eq!(accepted.last_seq, at as u64);
                prop_assert_eq!(
                    &accepted.state,
                    state_after(at),
                    "the refused record changed the state"
                );
            }
        }
        Ok(())
    });
}

#[test]
fn a_damaged_snapshot_is_refused_or_loaded_and_replayed_and_never_panics() {
    let count = seeds().records.len();
    // A snapshot of the state after `at` records, then the rest in the log.
    let strategy = (1..count).prop_flat_map(move |at| {
        let snapshot = codec::encode(state_after(at)).expect("a state encodes");
        damaged(snapshot).prop_map(move |(bytes, must_refuse)| (at, bytes, must_refuse))
    });
    let mut runner = runner(cases(CASES_RECOVERY));
    runner.run(&strategy, |(at, bytes, must_refuse)| {
        let store = MemoryLog::default();
        store.write_snapshot(at as u64, &bytes).expect("snapshot");
        store.append(&seeds().records[at..]).expect("append");
        store.flush().expect("flush");
        let recovered = recover(&store);
        if must_refuse {
            prop_assert!(recovered.is_err(), "a damaged snapshot was loaded");
        }
        if let Ok(recovered) = recovered {
            prop_assert_eq!(recovered.snapshot_seq, at as u64);
        }
        Ok(())
    });
}

/// One byte flipped anywhere in a seed under its checksum: refused, every time.
#[test]
fn every_single_bit_flip_of_a_seed_record_is_refused() {
    for (seq, bytes) in &seeds().records {
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(
                    codec::decode::<Record>(&flipped).is_err(),
                    "record {seq}: a flip of bit {bit} of byte {i} was decoded"
                );
            }
        }
    }
}
