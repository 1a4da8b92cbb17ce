//! The largest BulkSetAllocations the API allows (10,000 slices, every id and
//! text at its longest) is one WAL record: it is accepted, applied all or
//! nothing, and replayed from the WAL after a SIGKILL.

use quotad::proto::*;
use quotad::storage::Durability;
use quotad_core::ids::{ID_BYTES_MAX, SERVICE_TYPE_BYTES_MAX};
use quotad_core::record::{BULK_SLICES_MAX, CHANGE_TEXT_BYTES_MAX};
use tonic::Code;

use crate::common::*;

/// Big enough for the request (about 2.1 MB with every id at its longest).
const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// What the test client accepts: a list of 10,000 slices is close to 4 MiB.
const CLIENT_DECODE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A distinct id of `len` bytes.
fn long(i: usize, len: usize) -> String {
    format!("{i:0>len$}")
}

fn school_id() -> String {
    long(7, ID_BYTES_MAX)
}

fn service() -> String {
    "s".repeat(SERVICE_TYPE_BYTES_MAX)
}

fn largest_bulk(units_of_last: u64) -> BulkSetAllocationsRequest {
    let allocations = (0..BULK_SLICES_MAX)
        .map(|i| AllocationSpec {
            teacher_id: long(i, ID_BYTES_MAX),
            service_type: service(),
            allocated_units: if i + 1 == BULK_SLICES_MAX {
                units_of_last
            } else {
                1
            },
            priority: "normal".into(),
            auto_renew: Some(true),
        })
        .collect();
    BulkSetAllocationsRequest {
        school_id: school_id(),
        allocations,
        changed_by: String::new(),
        reason: "r".repeat(CHANGE_TEXT_BYTES_MAX),
    }
}

async fn admin_of(server: &ProcessServer) -> AdminClient {
    server
        .admin()
        .await
        .max_decoding_message_size(CLIENT_DECODE_BYTES_MAX)
}

async fn slices(admin: &mut AdminClient) -> Vec<Allocation> {
    admin
        .list_allocations(ListAllocationsRequest {
            school_id: school_id(),
            teacher_id: String::new(),
            service_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .allocations
}

fn start(data: &std::path::Path, config: &std::path::Path) -> ProcessServer {
    let config = config.to_str().unwrap();
    ProcessServer::start_with_args(data, Durability::Sync, &["--config", config])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_bulk_change_is_applied_all_or_nothing_and_survives_a_crash() {
    let (dir, data) = temp_dir();
    let config = dir.path().join("quotad.toml");
    // No local snapshot during the test, so the restart must replay the record.
    let settings = format!("request_bytes_max = {REQUEST_BYTES_MAX}\nsnapshot_interval_s = 3600\n");
    std::fs::write(&config, settings).unwrap();
    let server = start(&data, &config);
    let mut admin = admin_of(&server).await;
    let units = BULK_SLICES_MAX as u64;
    admin
        .create_school(CreateSchoolRequest {
            school_id: school_id(),
            name: "Large".into(),
            tier: "k12".into(),
            billing_anchor_day: 1,
            borrowing_enabled: false,
            pools: vec![PoolUnits {
                service_type: service(),
                cycle_units: units,
            }],
            changed_by: String::new(),
            self_service_requests: false,
        })
        .await
        .unwrap();

    // One unit too many, in the last entry: nothing is set.
    let refused = admin
        .bulk_set_allocations(largest_bulk(2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(slices(&mut admin).await.is_empty(), "all or nothing");

    let set = admin
        .bulk_set_allocations(largest_bulk(1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.allocations.len(), BULK_SLICES_MAX);
    assert!(set.allocations.iter().all(|a| a.allocated_units == 1));

    // SIGKILL: no final snapshot, so the restart replays the record itself.
    server.kill();
    let server = start(&data, &config);
    let mut admin = admin_of(&server).await;
    let after = slices(&mut admin).await;
    assert_eq!(after.len(), BULK_SLICES_MAX);
    assert!(after
        .iter()
        .all(|a| a.allocated_units == 1 && a.service_type == service() && a.auto_renew));
    let pool = school(&mut admin, &school_id()).await.pools;
    assert_eq!(pool[0].allocated_units, units);
}
