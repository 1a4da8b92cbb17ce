//! The gateways' protocols through the real gRPC API: Envoy's
//! ShouldRateLimit and Kuadrant's CheckRateLimit, Report, Reserve and
//! Commit, on the rate limit listener (no tokens) and on the main port
//! (tokens). The contract test (contract.rs) calls the same with clients
//! generated from Envoy's and Kuadrant's own proto files.

use std::net::SocketAddr;
use std::time::Duration;

use quotad::auth::Role;
use quotad::config::{Config, Secret};
use quotad::engine::Clock;
use quotad::proto::*;
use quotad::rls::{DomainConfig, UnknownSlice};
use quotad_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use quotad_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code};
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient as EnvoyClient;
use quotad_proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use quotad_proto::kuadrant::service::ratelimit::v1 as kuadrant;
use quotad_proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use quotad_proto::BearerToken;
use tonic::transport::Channel;

use crate::common::*;

fn domain(name: &str, edit: impl FnOnce(&mut DomainConfig)) -> DomainConfig {
    let mut table = DomainConfig {
        name: name.into(),
        schools: vec!["oak".into()],
        ..DomainConfig::default()
    };
    edit(&mut table);
    table
}

fn config(data: &std::path::Path) -> Config {
    Config {
        data_dir: data.to_path_buf(),
        auth_key: Some(Secret(KEY.into())),
        rls_domains: vec![
            domain("gw", |_| {}),
            domain("gw-allow", |d| d.unknown_slice = UnknownSlice::Allow),
            domain("gw-holds", |d| d.holds = true),
            domain("gw-headers", |d| d.response_headers = true),
            domain("gw-any", |d| d.schools = vec!["*".into()]),
        ],
        ..Config::default()
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn envoy(addr: SocketAddr) -> EnvoyClient<Channel> {
    EnvoyClient::new(channel(addr).await)
}

async fn kuadrant(addr: SocketAddr) -> KuadrantClient<Channel> {
    KuadrantClient::new(channel(addr).await)
}

fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(key, value)| Entry {
            key: key.to_string(),
            value: value.to_string(),
        })
        .collect()
}

/// A descriptor naming `teacher`'s slice of SERVICE in oak, with more entries.
fn slice(teacher: &str, more: &[(&str, &str)]) -> RateLimitDescriptor {
    let mut all = vec![
        ("school_id", "oak"),
        ("teacher_id", teacher),
        ("service_type", SERVICE),
    ];
    all.extend_from_slice(more);
    RateLimitDescriptor {
        entries: entries(&all),
        limit: None,
        hits_addend: None,
    }
}

fn with_hits(mut descriptor: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    descriptor.hits_addend = Some(hits);
    descriptor
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(client: &mut EnvoyClient<Channel>, request: RateLimitRequest) -> RateLimitResponse {
    client
        .should_rate_limit(request)
        .await
        .unwrap()
        .into_inner()
}

/// oak with a pool of 1,000 and ms-lee's slice of `units`.
async fn oak_with(server: &TestServer, units: u64) -> GateClient {
    let (mut admin, gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 1_000, false).await;
    allocate(&mut admin, "oak", "ms-lee", units, "normal")
        .await
        .unwrap();
    gate
}

fn codes(response: &RateLimitResponse) -> Vec<Code> {
    response.statuses.iter().map(|s| s.code()).collect()
}

#[tokio::test]
async fn hits_are_the_descriptors_then_the_requests_then_one_and_zero_is_a_check() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 100).await;
    let mut rls = envoy(server.rls_addr).await;

    let unset = ask(&mut rls, request("gw", vec![slice("ms-lee", &[])], 0)).await;
    assert_eq!(unset.overall_code(), Code::Ok);
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        1,
        "unset is 1"
    );
    let status = &unset.statuses[0];
    let limit = status.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit()),
        ("quotad:oak/claude_messages", 100, Unit::Month)
    );
    assert_eq!(status.limit_remaining, 99);
    assert!(status.duration_until_reset.unwrap().seconds > 0);

    ask(&mut rls, request("gw", vec![slice("ms-lee", &[])], 5)).await;
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        6,
        "the request's 5"
    );
    let own = with_hits(slice("ms-lee", &[]), 7);
    let answer = ask(&mut rls, request("gw", vec![own], 5)).await;
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        13,
        "the descriptor's 7"
    );
    assert_eq!(answer.statuses[0].limit_remaining, 87);
    let check = with_hits(slice("ms-lee", &[]), 0);
    let answer = ask(&mut rls, request("gw", vec![check.clone()], 5)).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert_eq!(answer.statuses[0].limit_remaining, 87);
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        13,
        "0 charges nothing"
    );

    // Spent to the last unit, a pure check says no more.
    let rest = with_hits(slice("ms-lee", &[]), 87);
    assert_eq!(
        ask(&mut rls, request("gw", vec![rest], 0))
            .await
            .overall_code(),
        Code::Ok
    );
    let answer = ask(&mut rls, request("gw", vec![check], 0)).await;
    assert_eq!(answer.overall_code(), Code::OverLimit);
    assert_eq!(answer.statuses[0].limit_remaining, 0);
    let over = ask(&mut rls, request("gw", vec![slice("ms-lee", &[])], 0)).await;
    assert_eq!(over.overall_code(), Code::OverLimit);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 100);
}

#[tokio::test]
async fn each_descriptor_is_decided_on_its_own_and_unmapped_ones_are_ignored() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut admin = server.admin().await;
    allocate(&mut admin, "oak", "mr-ash", 3, "normal")
        .await
        .unwrap();
    let mut rls = envoy(server.rls_addr).await;
    let path_only = RateLimitDescriptor {
        entries: entries(&[("path", "/v1/messages"), ("method", "POST")]),
        limit: None,
        hits_addend: None,
    };
    let both = vec![
        path_only,
        slice("ms-lee", &[("path", "/v1/messages")]),
        slice("mr-ash", &[]),
    ];
    let answer = ask(&mut rls, request("gw", both.clone(), 2)).await;
    assert_eq!(codes(&answer), [Code::Ok, Code::Ok, Code::Ok]);
    assert!(answer.statuses[0].current_limit.is_none());
    let again = ask(&mut rls, request("gw", both, 2)).await;
    assert_eq!(codes(&again), [Code::Ok, Code::Ok, Code::OverLimit]);
    assert_eq!(again.overall_code(), Code::OverLimit);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 4);
    assert_eq!(used_units(&mut gate, "oak", "mr-ash").await, 2);
}

#[tokio::test]
async fn descriptors_naming_no_known_slice_follow_the_domain_and_are_counted() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut rls = envoy(server.rls_addr).await;
    let unknown = [
        slice("nobody", &[]),
        RateLimitDescriptor {
            entries: entries(&[
                ("school_id", "oak"),
                ("teacher_id", "ms-lee"),
                ("service_type", "no_such_type"),
            ]),
            limit: None,
            hits_addend: None,
        },
        RateLimitDescriptor {
            entries: entries(&[("school_id", "oak")]),
            limit: None,
            hits_addend: None,
        },
        RateLimitDescriptor {
            entries: entries(&[("path", "/v1")]),
            limit: None,
            hits_addend: None,
        },
    ];
    for descriptor in unknown {
        let denied = ask(&mut rls, request("gw", vec![descriptor.clone()], 1)).await;
        assert_eq!(denied.overall_code(), Code::OverLimit, "{descriptor:?}");
        assert!(denied.statuses[0].current_limit.is_none());
        let allowed = ask(&mut rls, request("gw-allow", vec![descriptor.clone()], 1)).await;
        assert_eq!(allowed.overall_code(), Code::Ok, "{descriptor:?}");
    }
    // An unknown school is unknown too (for a domain that may charge any).
    let other_school = RateLimitDescriptor {
        entries: entries(&[
            ("school_id", "elm"),
            ("teacher_id", "ms-lee"),
            ("service_type", SERVICE),
        ]),
        limit: None,
        hits_addend: None,
    };
    let denied = ask(&mut rls, request("gw-any", vec![other_school], 1)).await;
    assert_eq!(denied.overall_code(), Code::OverLimit);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 0);
    let metrics = scrape(server.metrics_addr).await;
    let counted = |answer: &str| {
        metrics.lines().any(|l| {
            l.starts_with("quotad_rls_unknown_slice_total")
                && l.contains(&format!("answer=\"{answer}\""))
                && !l.ends_with(" 0")
        })
    };
    assert!(counted("deny") && counted("allow"), "{metrics}");
    assert!(metrics.contains("quotad_rls_requests_total{"), "{metrics}");
    assert!(
        metrics.contains("rpc=\"ShouldRateLimit\""),
        "latency by rpc: {metrics}"
    );
}

#[tokio::test]
async fn limits_and_remaining_units_saturate_to_u32() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 20_000_000_000, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10_000_000_000, "normal")
        .await
        .unwrap();
    let mut rls = envoy(server.rls_addr).await;
    let answer = ask(&mut rls, request("gw", vec![slice("ms-lee", &[])], 0)).await;
    let status = &answer.statuses[0];
    assert_eq!(
        status.current_limit.as_ref().unwrap().requests_per_unit,
        u32::MAX
    );
    assert_eq!(status.limit_remaining, u32::MAX);
}

/// The billing cycle ends at the start of the next month (anchor day 1):
/// the window resets then, and after the rollover counts to the next end.
#[tokio::test]
async fn duration_until_reset_is_the_time_to_the_cycles_end() {
    let (_dir, data) = temp_dir();
    let ms = |at: &str| {
        chrono::DateTime::parse_from_rfc3339(at)
            .unwrap()
            .timestamp_millis()
    };
    let clock = Clock::manual(ms("2026-12-31T23:59:00Z"));
    let server = TestServer::start_on_clock(config(&data), clock.clone()).await;
    let mut admin = server.admin().await;
    create_school(&mut admin, "oak", 1_000, false).await;
    admin
        .set_allocation(SetAllocationRequest {
            school_id: "oak".into(),
            teacher_id: "ms-lee".into(),
            service_type: SERVICE.into(),
            allocated_units: 10,
            priority: "normal".into(),
            auto_renew: Some(true),
            changed_by: "principal".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let mut rls = envoy(server.rls_addr).await;
    let check = || request("gw", vec![with_hits(slice("ms-lee", &[]), 0)], 0);
    let before = ask(&mut rls, check()).await;
    let reset = before.statuses[0].duration_until_reset.unwrap();
    assert_eq!((reset.seconds, reset.nanos), (60, 0));

    clock.advance(2 * 60_000);
    let after = ask(&mut rls, check()).await;
    let reset = after.statuses[0].duration_until_reset.unwrap();
    assert_eq!(
        reset.seconds,
        (ms("2027-02-01T00:00:00Z") - ms("2027-01-01T00:01:00Z")) / 1000
    );
    assert_eq!(after.statuses[0].limit_remaining, 10, "renewed");
}

#[tokio::test]
async fn a_retry_with_the_same_event_id_counts_once_and_gets_the_first_answer() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 5).await;
    let mut rls = envoy(server.rls_addr).await;
    let first = request("gw", vec![slice("ms-lee", &[("event_id", "req-1")])], 3);
    let answer = ask(&mut rls, first.clone()).await;
    let retried = ask(&mut rls, first).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert_eq!(retried.overall_code(), Code::Ok);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 3);
    let denied = request("gw", vec![slice("ms-lee", &[("event_id", "req-2")])], 3);
    assert_eq!(
        ask(&mut rls, denied.clone()).await.overall_code(),
        Code::OverLimit
    );
    assert_eq!(ask(&mut rls, denied).await.overall_code(), Code::OverLimit);
    // The event id may come from a descriptor of its own (Envoy's
    // request_headers action on x-request-id).
    let separate = vec![
        RateLimitDescriptor {
            entries: entries(&[("event_id", "req-3")]),
            limit: None,
            hits_addend: None,
        },
        slice("ms-lee", &[]),
    ];
    ask(&mut rls, request("gw", separate.clone(), 1)).await;
    ask(&mut rls, request("gw", separate, 1)).await;
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 4);
}

#[tokio::test]
async fn the_stream_done_call_charges_what_was_used_and_is_never_refused() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut rls = envoy(server.rls_addr).await;
    let event = ("event_id", "req-1");
    let check = with_hits(slice("ms-lee", &[event]), 0);
    assert_eq!(
        ask(&mut rls, request("gw", vec![check.clone()], 0))
            .await
            .overall_code(),
        Code::Ok
    );
    let done = with_hits(
        slice("ms-lee", &[event, ("quotad_phase", "stream_done")]),
        25,
    );
    let answer = ask(&mut rls, request("gw", vec![done.clone()], 0)).await;
    assert_eq!(answer.overall_code(), Code::Ok, "usage that happened");
    assert_eq!(answer.statuses[0].limit_remaining, 0);
    ask(&mut rls, request("gw", vec![done], 0)).await;
    let usage = usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (
            usage.services[0].used_units,
            usage.services[0].overage_units
        ),
        (25, 15),
        "charged once, overage recorded"
    );
    let next = request("gw", vec![with_hits(slice("ms-lee", &[]), 0)], 0);
    assert_eq!(ask(&mut rls, next).await.overall_code(), Code::OverLimit);
}

#[tokio::test]
async fn a_holds_domain_reserves_the_estimate_and_commits_the_actual_count() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut rls = envoy(server.rls_addr).await;
    let estimate = request(
        "gw-holds",
        vec![with_hits(slice("ms-lee", &[("event_id", "r1")]), 8)],
        0,
    );
    assert_eq!(ask(&mut rls, estimate).await.overall_code(), Code::Ok);
    let held = usage(&mut gate, "oak", "ms-lee").await;
    assert_eq!(
        (held.services[0].reserved_units, held.services[0].used_units),
        (8, 0)
    );
    // A concurrent request cannot spend what the hold keeps.
    let second = request(
        "gw-holds",
        vec![with_hits(slice("ms-lee", &[("event_id", "r2")]), 3)],
        0,
    );
    assert_eq!(ask(&mut rls, second).await.overall_code(), Code::OverLimit);
    let done = slice(
        "ms-lee",
        &[("event_id", "r1"), ("quotad_phase", "stream_done")],
    );
    let answer = ask(
        &mut rls,
        request("gw-holds", vec![with_hits(done.clone(), 12)], 0),
    )
    .await;
    assert_eq!(answer.overall_code(), Code::Ok);
    ask(&mut rls, request("gw-holds", vec![with_hits(done, 12)], 0)).await;
    let settled = usage(&mut gate, "oak", "ms-lee").await;
    let s = &settled.services[0];
    assert_eq!(
        (s.reserved_units, s.used_units, s.overage_units),
        (0, 12, 2)
    );
    // A stream-done call whose hold never existed is charged as usage.
    let orphan = slice(
        "ms-lee",
        &[("event_id", "r9"), ("quotad_phase", "stream_done")],
    );
    ask(&mut rls, request("gw-holds", vec![with_hits(orphan, 1)], 0)).await;
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 13);
}

#[tokio::test]
async fn kuadrant_reserve_then_commit_charges_the_actual_amount_once() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut k = kuadrant(server.rls_addr).await;
    let reserve = |amount| kuadrant::ReserveRequest {
        domain: "gw".into(),
        descriptors: vec![slice("ms-lee", &[])],
        amount,
        ttl: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    };
    let held = k.reserve(reserve(6)).await.unwrap().into_inner();
    assert_eq!(held.code(), Code::Ok);
    assert!(held.reservation_id.starts_with("rls-"), "{held:?}");
    let refused = k.reserve(reserve(6)).await.unwrap().into_inner();
    assert_eq!(
        (refused.code(), refused.reservation_id.as_str()),
        (Code::OverLimit, "")
    );
    let commit = |id: &str, actual| kuadrant::CommitRequest {
        domain: "gw".into(),
        descriptors: vec![slice("ms-lee", &[])],
        reservation_id: id.into(),
        actual_amount: actual,
    };
    let done = k
        .commit(commit(&held.reservation_id, 9))
        .await
        .unwrap()
        .into_inner();
    assert!(done.reservation_released);
    let again = k
        .commit(commit(&held.reservation_id, 9))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.reservation_released);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 9, "once");

    let small = k.reserve(reserve(1)).await.unwrap().into_inner();
    k.commit(commit(&small.reservation_id, 5)).await.unwrap();
    let s = &usage(&mut gate, "oak", "ms-lee").await.services[0];
    assert_eq!(
        (s.used_units, s.overage_units),
        (14, 4),
        "past the hold: overage"
    );
    // A hold quotad never made: charged as a Report.
    let unknown = k
        .commit(commit("never-held", 2))
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.reservation_released);
    let report = request("gw", vec![slice("ms-lee", &[])], 3);
    let reported = k.report(report).await.unwrap().into_inner();
    assert_eq!(reported.overall_code(), Code::Ok);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 19);
    let check = k
        .check_rate_limit(request("gw", vec![slice("ms-lee", &[])], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.overall_code(), Code::OverLimit);

    for (bad, field) in [
        (reserve(0), "amount"),
        (
            kuadrant::ReserveRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 24 * 3600,
                    nanos: 0,
                }),
                ..reserve(1)
            },
            "ttl",
        ),
        (
            kuadrant::ReserveRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..reserve(1)
            },
            "ttl",
        ),
    ] {
        let status = k.reserve(bad).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let status = k.commit(commit("", 1)).await.unwrap_err();
    assert!(status.message().starts_with("reservation_id"), "{status:?}");
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 19);
}

#[tokio::test]
async fn kuadrant_reserve_holds_every_slice_or_none() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut admin = server.admin().await;
    allocate(&mut admin, "oak", "mr-ash", 2, "normal")
        .await
        .unwrap();
    let mut k = kuadrant(server.rls_addr).await;
    let both = kuadrant::ReserveRequest {
        domain: "gw".into(),
        descriptors: vec![slice("ms-lee", &[]), slice("mr-ash", &[])],
        amount: 5,
        ttl: None,
    };
    let refused = k.reserve(both).await.unwrap().into_inner();
    assert_eq!(refused.code(), Code::OverLimit);
    let s = &usage(&mut gate, "oak", "ms-lee").await.services[0];
    assert_eq!(s.reserved_units, 0, "ms-lee's hold was let go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_callers_on_one_slice_get_exactly_its_allocation() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 100).await;
    let channels = [
        channel(server.rls_addr).await,
        channel(server.rls_addr).await,
        channel(server.rls_addr).await,
        channel(server.rls_addr).await,
    ];
    let callers = (0..64).map(|caller| {
        let mut rls = EnvoyClient::new(channels[caller % 4].clone());
        tokio::spawn(async move {
            let mut allowed = 0;
            for call in 0..5 {
                let id = format!("c{caller}-{call}");
                let answer = ask(
                    &mut rls,
                    request("gw", vec![slice("ms-lee", &[("event_id", &id)])], 1),
                )
                .await;
                allowed += u64::from(answer.overall_code() == Code::Ok);
            }
            allowed
        })
    });
    let mut allowed = 0;
    for caller in futures::future::join_all(callers).await {
        allowed += caller.unwrap();
    }
    assert_eq!(allowed, 100, "320 calls for a slice of 100");
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 100);
}

#[tokio::test]
async fn malformed_requests_are_refused_with_the_field_and_charge_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 100).await;
    let mut rls = envoy(server.rls_addr).await;
    let descriptor = |pairs: &[(&str, &str)]| RateLimitDescriptor {
        entries: entries(pairs),
        limit: None,
        hits_addend: None,
    };
    let cases = [
        (
            request("gw", vec![], 1),
            tonic::Code::InvalidArgument,
            "descriptors:",
        ),
        (
            request("gw", vec![slice("ms-lee", &[("", "x")])], 1),
            tonic::Code::InvalidArgument,
            "descriptors[1].entries[4].key",
        ),
        (
            request(
                "gw",
                vec![slice("ms-lee", &[]), descriptor(&[("path", "")])],
                1,
            ),
            tonic::Code::InvalidArgument,
            "descriptors[2].entries[1].value",
        ),
        (
            request(
                "gw",
                vec![descriptor(&[("school_id", "no such school!")])],
                1,
            ),
            tonic::Code::InvalidArgument,
            "descriptors[1].entries[1].value: school_id",
        ),
        (
            request("gw", vec![slice("ms-lee", &[("quotad_phase", "later")])], 1),
            tonic::Code::InvalidArgument,
            "descriptors[1].entries[4].value",
        ),
        (
            request("gw", vec![with_hits(slice("ms-lee", &[]), u64::MAX)], 1),
            tonic::Code::InvalidArgument,
            "descriptors[1].hits_addend",
        ),
        (
            // The first descriptor is fine: nothing is charged for it either.
            request(
                "gw",
                vec![
                    slice("ms-lee", &[]),
                    slice("ms-lee", &[("teacher_id", "x")]),
                ],
                1,
            ),
            tonic::Code::InvalidArgument,
            "descriptors[2].entries[4].key: teacher_id appears twice",
        ),
        (
            request("no-such-domain", vec![slice("ms-lee", &[])], 1),
            tonic::Code::NotFound,
            "domain \"no-such-domain\"",
        ),
    ];
    for (bad, code, says) in cases {
        let status = rls.should_rate_limit(bad).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().starts_with(says), "{says}: {status:?}");
    }
    // A school the domain may not charge.
    let elm = RateLimitDescriptor {
        entries: entries(&[
            ("school_id", "elm"),
            ("teacher_id", "ms-lee"),
            ("service_type", SERVICE),
        ]),
        limit: None,
        hits_addend: None,
    };
    let status = rls
        .should_rate_limit(request("gw", vec![slice("ms-lee", &[]), elm], 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("may not charge school elm"),
        "{status:?}"
    );
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 0);
}

#[tokio::test]
async fn on_the_main_port_a_call_needs_a_token_allowed_to_meter_the_school() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 100).await;
    let main = channel(server.addr).await;
    let call = || request("gw", vec![slice("ms-lee", &[])], 1);
    let mut anonymous = EnvoyClient::new(main.clone());
    let status = anonymous.should_rate_limit(call()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let for_school = |schools: &[&str]| {
        let token = token("gateway", Role::Service, schools);
        EnvoyClient::with_interceptor(main.clone(), BearerToken::new(&token).unwrap())
    };
    let answer = for_school(&["oak"])
        .should_rate_limit(call())
        .await
        .unwrap();
    assert_eq!(answer.into_inner().overall_code(), Code::Ok);
    let status = for_school(&["elm"])
        .should_rate_limit(call())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let teacher = token("ms-lee", Role::Teacher, &["oak"]);
    let mut as_teacher =
        EnvoyClient::with_interceptor(main.clone(), BearerToken::new(&teacher).unwrap());
    let status = as_teacher.should_rate_limit(call()).await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "teachers do not meter"
    );
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 1);
}

#[tokio::test]
async fn the_dev_domain_charges_any_school_with_the_default_keys() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(Config {
        data_dir: data.clone(),
        insecure_dev: true,
        ..Config::default()
    })
    .await;
    let (mut admin, mut gate) = clients_as(server.addr, "").await;
    create_school(&mut admin, "oak", 1_000, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    let mut rls = envoy(server.rls_addr).await;
    let answer = ask(&mut rls, request("quotad", vec![slice("ms-lee", &[])], 4)).await;
    assert_eq!(answer.overall_code(), Code::Ok);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 4);
}

#[tokio::test]
async fn a_domain_that_asks_gets_the_rate_limit_headers() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    oak_with(&server, 100).await;
    let mut rls = envoy(server.rls_addr).await;
    let answer = ask(
        &mut rls,
        request("gw-headers", vec![slice("ms-lee", &[])], 10),
    )
    .await;
    let headers: Vec<(&str, &str)> = answer
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        &headers[..2],
        [
            ("x-ratelimit-limit", "100"),
            ("x-ratelimit-remaining", "90")
        ]
    );
    assert_eq!(headers[2].0, "x-ratelimit-reset");
    let plain = ask(&mut rls, request("gw", vec![slice("ms-lee", &[])], 1)).await;
    assert!(plain.response_headers_to_add.is_empty());
}

#[tokio::test]
async fn reflection_lists_what_each_port_serves() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let rate_limits = [
        "envoy.service.ratelimit.v3.RateLimitService",
        "kuadrant.service.ratelimit.v1.RateLimitService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let quotads = ["quotad.v1.QuotaGate", "quotad.v1.QuotaAdmin"];
    let main: Vec<&str> = rate_limits.iter().chain(&quotads).copied().collect();
    for (addr, serves) in [(server.addr, main), (server.rls_addr, rate_limits.to_vec())] {
        let mut client = ServerReflectionClient::new(channel(addr).await);
        let asked = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([asked]))
            .await
            .unwrap()
            .into_inner();
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("{answer:?}")
        };
        // The reflection services list themselves as each version likes;
        // contract.rs calls both on both ports.
        let mut names: Vec<&str> = list
            .service
            .iter()
            .map(|s| s.name.as_str())
            .filter(|name| !name.starts_with("grpc.reflection."))
            .collect();
        names.sort();
        let mut serves: Vec<&str> = serves
            .into_iter()
            .filter(|name| !name.starts_with("grpc.reflection."))
            .collect();
        serves.sort();
        assert_eq!(names, serves, "{addr}");
    }
}

#[tokio::test]
async fn kuadrant_check_rate_limit_only_checks_and_report_charges() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut k = kuadrant(server.rls_addr).await;
    let check = |hits| request("gw", vec![slice("ms-lee", &[])], hits);
    for hits in [0, 1, 10] {
        let answer = k.check_rate_limit(check(hits)).await.unwrap().into_inner();
        assert_eq!(answer.overall_code(), Code::Ok, "{hits}");
    }
    let too_much = k.check_rate_limit(check(11)).await.unwrap().into_inner();
    assert_eq!(too_much.overall_code(), Code::OverLimit, "11 of 10");
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        0,
        "a check charges nothing"
    );
    k.report(check(4)).await.unwrap();
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 4);
}

#[tokio::test]
async fn kuadrant_reserve_answers_descriptors_naming_no_slice_per_the_domain() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut k = kuadrant(server.rls_addr).await;
    let reserve = |domain: &str, descriptors| kuadrant::ReserveRequest {
        domain: domain.into(),
        descriptors,
        amount: 5,
        ttl: None,
    };
    let path = RateLimitDescriptor {
        entries: entries(&[("path", "/v1")]),
        limit: None,
        hits_addend: None,
    };
    let partial = RateLimitDescriptor {
        entries: entries(&[("school_id", "oak")]),
        limit: None,
        hits_addend: None,
    };
    for descriptors in [
        vec![path.clone()],
        vec![partial.clone()],
        vec![slice("nobody", &[])],
    ] {
        let denied = k
            .reserve(reserve("gw", descriptors.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (denied.code(), denied.reservation_id.as_str()),
            (Code::OverLimit, "")
        );
        let allowed = k
            .reserve(reserve("gw-allow", descriptors))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(allowed.code(), Code::Ok);
    }
    // Beside a known slice, an unmapped descriptor is ignored; a partial one
    // is still unknown, and refuses the whole Reserve.
    let with_path = k
        .reserve(reserve("gw", vec![path, slice("ms-lee", &[])]))
        .await
        .unwrap();
    assert_eq!(with_path.into_inner().code(), Code::Ok);
    let with_partial = k
        .reserve(reserve("gw", vec![partial, slice("ms-lee", &[])]))
        .await
        .unwrap();
    assert_eq!(with_partial.into_inner().code(), Code::OverLimit);
    let s = &usage(&mut gate, "oak", "ms-lee").await.services[0];
    assert_eq!(s.reserved_units, 5, "only the Reserve answered OK holds");
}

#[tokio::test]
async fn ids_too_long_for_any_step_are_refused_before_anything_is_charged() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 100).await;
    let mut admin = server.admin().await;
    allocate(&mut admin, "oak", "mr-ash", 100, "normal")
        .await
        .unwrap();
    let mut k = kuadrant(server.rls_addr).await;
    let mut rls = envoy(server.rls_addr).await;
    // Fits as an event id, but not as "<id>:done", the id a Commit that
    // finds no hold would charge with.
    let long = "x".repeat(124);
    let both = vec![
        slice("ms-lee", &[("event_id", &long)]),
        slice("mr-ash", &[]),
    ];
    let status = k
        .reserve(kuadrant::ReserveRequest {
            domain: "gw".into(),
            descriptors: both.clone(),
            amount: 5,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = k
        .commit(kuadrant::CommitRequest {
            domain: "gw".into(),
            descriptors: vec![slice("ms-lee", &[]), slice("mr-ash", &[])],
            reservation_id: long.clone(),
            actual_amount: 7,
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("reservation_id"), "{status:?}");
    let status = rls
        .should_rate_limit(request("gw-holds", both, 3))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    for teacher in ["ms-lee", "mr-ash"] {
        let s = &usage(&mut gate, "oak", teacher).await.services[0];
        assert_eq!((s.used_units, s.reserved_units), (0, 0), "{teacher}");
    }
}

#[tokio::test]
async fn kuadrant_commit_finds_each_hold_whatever_the_order_of_its_descriptors() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut admin = server.admin().await;
    allocate(&mut admin, "oak", "mr-ash", 10, "normal")
        .await
        .unwrap();
    let mut k = kuadrant(server.rls_addr).await;
    let held = k
        .reserve(kuadrant::ReserveRequest {
            domain: "gw".into(),
            descriptors: vec![slice("ms-lee", &[]), slice("mr-ash", &[])],
            amount: 4,
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    let done = k
        .commit(kuadrant::CommitRequest {
            domain: "gw".into(),
            descriptors: vec![slice("mr-ash", &[]), slice("ms-lee", &[])],
            reservation_id: held.reservation_id,
            actual_amount: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.reservation_released);
    for teacher in ["ms-lee", "mr-ash"] {
        let s = &usage(&mut gate, "oak", teacher).await.services[0];
        assert_eq!((s.used_units, s.reserved_units), (3, 0), "{teacher}");
    }
}

#[tokio::test]
async fn a_holds_domain_needs_an_event_id_and_a_stream_done_of_nothing_ends_the_hold() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut rls = envoy(server.rls_addr).await;
    let status = rls
        .should_rate_limit(request("gw-holds", vec![slice("ms-lee", &[])], 4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("event id"), "{status:?}");
    let hold = request("gw-holds", vec![slice("ms-lee", &[("event_id", "r1")])], 8);
    assert_eq!(ask(&mut rls, hold).await.overall_code(), Code::Ok);
    let nothing = slice(
        "ms-lee",
        &[("event_id", "r1"), ("quotad_phase", "stream_done")],
    );
    let answer = ask(
        &mut rls,
        request("gw-holds", vec![with_hits(nothing, 0)], 0),
    )
    .await;
    assert_eq!(answer.overall_code(), Code::Ok);
    let s = &usage(&mut gate, "oak", "ms-lee").await.services[0];
    assert_eq!(
        (s.used_units, s.reserved_units),
        (0, 0),
        "the failed call's hold ended"
    );
    let next = request("gw-holds", vec![slice("ms-lee", &[("event_id", "r2")])], 8);
    assert_eq!(ask(&mut rls, next).await.overall_code(), Code::Ok);
}

#[tokio::test]
async fn an_over_limit_answer_still_charges_the_descriptors_that_were_allowed() {
    // As Envoy's own rate limit service: each descriptor is counted on its
    // own (README, "Behind an AI gateway"). Kuadrant's Reserve is the
    // all-or-none call.
    let (_dir, data) = temp_dir();
    let server = TestServer::start_with(config(&data)).await;
    let mut gate = oak_with(&server, 10).await;
    let mut admin = server.admin().await;
    allocate(&mut admin, "oak", "mr-ash", 2, "normal")
        .await
        .unwrap();
    let mut rls = envoy(server.rls_addr).await;
    let both = vec![slice("ms-lee", &[]), with_hits(slice("mr-ash", &[]), 3)];
    let answer = ask(&mut rls, request("gw", both, 1)).await;
    assert_eq!(codes(&answer), [Code::Ok, Code::OverLimit]);
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 1);
    assert_eq!(used_units(&mut gate, "oak", "mr-ash").await, 0);
}

#[tokio::test]
async fn a_domain_reads_its_own_keys_and_a_fixed_service_type() {
    let (_dir, data) = temp_dir();
    let mut config = config(&data);
    config.rls_domains.push(domain("custom", |d| {
        d.school_key = "tenant".into();
        d.teacher_key = "user".into();
        d.service_type = Some(SERVICE.into());
        d.event_key = "request".into();
        d.phase_key = "when".into();
        d.model_key = "llm".into();
    }));
    let server = TestServer::start_with(config).await;
    let mut gate = oak_with(&server, 10).await;
    let mut rls = envoy(server.rls_addr).await;
    let ours = |more: &[(&str, &str)]| {
        let mut all = vec![("tenant", "oak"), ("user", "ms-lee"), ("llm", "claude-x")];
        all.extend_from_slice(more);
        RateLimitDescriptor {
            entries: entries(&all),
            limit: None,
            hits_addend: None,
        }
    };
    let first = request("custom", vec![ours(&[("request", "q1")])], 2);
    ask(&mut rls, first.clone()).await;
    ask(&mut rls, first).await;
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        2,
        "the event key is 'request'"
    );
    let done = request(
        "custom",
        vec![ours(&[("request", "q1"), ("when", "stream_done")])],
        20,
    );
    assert_eq!(
        ask(&mut rls, done).await.overall_code(),
        Code::Ok,
        "the phase key is 'when'"
    );
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 22);
    // The default keys name nothing here.
    let defaults = ask(&mut rls, request("custom", vec![slice("ms-lee", &[])], 1)).await;
    assert_eq!(defaults.overall_code(), Code::OverLimit);
    assert!(defaults.statuses[0].current_limit.is_none());
}
