use super::*;
use crate::storage::{MemoryLog, SledLog};

fn id(byte: u8) -> HistoryId {
    HistoryId([byte; 16])
}

fn at(history: Option<History>, wal_seq: u64) -> HistoryPosition {
    HistoryPosition { history, wal_seq }
}

fn h(byte: u8, epoch: u64) -> Option<History> {
    Some(History {
        id: id(byte),
        epoch,
    })
}

const NEW: u8 = 0xee;

fn auto(local: HistoryPosition, postgres: HistoryPosition) -> Decision {
    decide(&local, &postgres, RecoverFrom::Auto, id(NEW))
}

fn forced(local: HistoryPosition, postgres: HistoryPosition) -> Decision {
    decide(&local, &postgres, RecoverFrom::Postgres, id(NEW))
}

fn serve(history: Option<History>, record_locally: bool, record_in_postgres: bool) -> Decision {
    Decision::Serve {
        history: history.unwrap(),
        record_locally,
        record_in_postgres,
    }
}

fn load(history: Option<History>) -> Decision {
    Decision::Load {
        history: history.unwrap(),
    }
}

fn refused(decision: Decision) -> Problem {
    match decision {
        Decision::Refuse(conflict) => conflict.problem,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_directory_at_postgres_history_and_epoch_is_served_at_or_beyond_its_position() {
    assert_eq!(
        auto(at(h(1, 2), 10), at(h(1, 2), 10)),
        serve(h(1, 2), false, false)
    );
    assert_eq!(
        auto(at(h(1, 2), 15), at(h(1, 2), 10)),
        serve(h(1, 2), false, false)
    );
    // Behind on its own epoch: Postgres has more of it.
    assert_eq!(auto(at(h(1, 2), 5), at(h(1, 2), 10)), load(h(1, 3)));
    // The flag never discards a directory that is served.
    assert_eq!(
        forced(at(h(1, 2), 15), at(h(1, 2), 10)),
        serve(h(1, 2), false, false)
    );
}

#[test]
fn finding_2_the_old_disk_of_an_older_epoch_is_refused_even_when_it_is_further_along() {
    // A was at epoch 1 up to 120; B recovered from Postgres at 100 (epoch 2)
    // and went on to 110. A's position is higher, and it must not win.
    let local = at(h(1, 1), 120);
    let postgres = at(h(1, 2), 110);
    let Decision::Refuse(conflict) = auto(local, postgres) else {
        panic!("the old disk was not refused");
    };
    assert_eq!(conflict.problem, Problem::OlderEpoch);
    let message = conflict.to_string();
    for part in [
        "history 01010101010101010101010101010101 epoch 1 at WAL position 120",
        "history 01010101010101010101010101010101 epoch 2 at WAL position 110",
        "--recover-from postgres",
    ] {
        assert!(message.contains(part), "{part:?} is not in {message}");
    }
    assert_eq!(forced(local, postgres), load(h(1, 3)));
    // Behind as well as older: refused all the same.
    assert_eq!(
        refused(auto(at(h(1, 1), 50), postgres)),
        Problem::OlderEpoch
    );
}

#[test]
fn other_histories_and_a_postgres_at_an_older_epoch_are_refused() {
    assert_eq!(
        refused(auto(at(h(2, 1), 10), at(h(1, 1), 10))),
        Problem::OtherHistory
    );
    assert_eq!(forced(at(h(2, 7), 10), at(h(1, 1), 10)), load(h(1, 2)));
    // Postgres restored from a backup: the new epoch goes past the directory's.
    assert_eq!(
        refused(auto(at(h(1, 4), 10), at(h(1, 2), 30))),
        Problem::NewerEpoch
    );
    assert_eq!(forced(at(h(1, 4), 10), at(h(1, 2), 30)), load(h(1, 5)));
}

#[test]
fn an_empty_directory_loads_whatever_postgres_holds() {
    assert_eq!(auto(at(None, 0), at(h(1, 3), 40)), load(h(1, 4)));
    assert_eq!(auto(at(None, 0), at(h(1, 3), 0)), load(h(1, 4)));
    // A record but nothing else (a first start without Postgres).
    assert_eq!(auto(at(h(2, 1), 0), at(h(1, 3), 40)), load(h(1, 4)));
    // Postgres from an older quotad: the loaded state becomes a new history.
    assert_eq!(auto(at(None, 0), at(None, 40)), load(h(NEW, 1)));
    assert_eq!(auto(at(h(2, 1), 0), at(None, 40)), load(h(NEW, 1)));
}

#[test]
fn a_fresh_directory_and_a_fresh_postgres_start_a_new_history() {
    assert_eq!(auto(at(None, 0), at(None, 0)), serve(h(NEW, 1), true, true));
    // A directory that started its history without Postgres names Postgres's.
    assert_eq!(
        auto(at(h(2, 1), 0), at(None, 0)),
        serve(h(2, 1), false, true)
    );
    assert_eq!(
        auto(at(h(2, 1), 30), at(None, 0)),
        serve(h(2, 1), false, true)
    );
}

#[test]
fn a_directory_from_before_history_identity_adopts_at_the_same_position_only() {
    // Postgres has a history: the same position adopts it, behind loads it.
    assert_eq!(
        auto(at(None, 40), at(h(1, 1), 40)),
        serve(h(1, 1), true, false)
    );
    assert_eq!(auto(at(None, 30), at(h(1, 1), 40)), load(h(1, 2)));
    assert_eq!(
        refused(auto(at(None, 50), at(h(1, 1), 40))),
        Problem::UnnamedAhead
    );
    assert_eq!(forced(at(None, 50), at(h(1, 1), 40)), load(h(1, 2)));
    // Neither side has a history: positions decide, as before, and both
    // sides are named by the new one.
    assert_eq!(
        auto(at(None, 50), at(None, 40)),
        serve(h(NEW, 1), true, true)
    );
    assert_eq!(
        auto(at(None, 40), at(None, 40)),
        serve(h(NEW, 1), true, true)
    );
    assert_eq!(auto(at(None, 30), at(None, 40)), load(h(NEW, 1)));
    // A directory with its own records behind a Postgres of unknown history.
    assert_eq!(
        refused(auto(at(h(2, 1), 30), at(None, 40))),
        Problem::BehindUnnamed
    );
    assert_eq!(forced(at(h(2, 1), 30), at(None, 40)), load(h(NEW, 1)));
}

#[test]
fn history_ids_print_and_parse_as_32_hex_digits() {
    let random = HistoryId::random().unwrap();
    assert_ne!(random, HistoryId::random().unwrap());
    let text = random.to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(HistoryId::parse(&text), Some(random));
    assert_eq!(HistoryId::parse(""), None);
    assert_eq!(HistoryId::parse("abc"), None);
    assert_eq!(HistoryId::parse(&"zz".repeat(16)), None);
    assert_eq!(HistoryId::parse(&"ab".repeat(17)), None);
}

fn record_round_trips(store: &dyn LogStore) {
    assert_eq!(read(store).unwrap(), None);
    write(store, &h(1, 1).unwrap()).unwrap();
    write(store, &h(1, 2).unwrap()).unwrap();
    assert_eq!(read(store).unwrap(), h(1, 2));
    // The record lives apart from the snapshot.
    store.write_snapshot(7, b"state").unwrap();
    assert_eq!(read(store).unwrap(), h(1, 2));
    assert_eq!(store.read_snapshot().unwrap(), Some((7, b"state".to_vec())));
    assert!(write(store, &h(1, 0).unwrap()).is_err(), "epoch 0");
    store.write_meta(HISTORY_KEY, b"\x01damaged").unwrap();
    assert!(
        read(store).is_err(),
        "a damaged record is an error, not None"
    );
}

#[test]
fn the_history_record_round_trips_in_sled_and_in_memory() {
    record_round_trips(&MemoryLog::default());
    let dir = tempfile::tempdir().unwrap();
    record_round_trips(&SledLog::open(dir.path()).unwrap());
}

#[test]
fn the_history_record_survives_reopening_sled_and_a_memory_crash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledLog::open(dir.path()).unwrap();
        write(&store, &h(3, 4).unwrap()).unwrap();
    }
    let store = SledLog::open(dir.path()).unwrap();
    assert_eq!(read(&store).unwrap(), h(3, 4));
    let memory = MemoryLog::default();
    write(&memory, &h(3, 4).unwrap()).unwrap();
    assert_eq!(read(&memory.crash()).unwrap(), h(3, 4));
}
