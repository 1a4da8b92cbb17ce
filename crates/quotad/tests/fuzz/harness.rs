//! quotad's services as the server wires them (the generated servers, the
//! validating codec, the api layer, the engine and its actors, the WAL), on
//! a memory log and a clock that stands still, called in-process with raw
//! request bodies: no TCP, so thousands of calls take seconds.
//!
//! Whether a call changed anything is read off the WAL: every change of
//! state is a record (replay rebuilds the state from them), so a refused
//! call must append none. [`Harness::probe`] appends a record of its own
//! and returns its position; two probes one apart bracket a call that wrote
//! nothing. The clock never moves, so no rollover, expiry or other timer
//! writes anything between two probes.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use prost::Message;
use quotad::analytics::Analytics;
use quotad::api::{AdminService, GateService};
use quotad::auth::Caller;
use quotad::config::Config;
use quotad::engine::{Clock, Engine, EngineRuntime};
use quotad::proto::quota_admin_server::QuotaAdminServer;
use quotad::proto::quota_gate_server::QuotaGateServer;
use quotad::proto::*;
use quotad::rls::{DomainConfig, Domains, RateLimiter, Trust, UnknownSlice};
use quotad::storage::{LogStore, MemoryLog, Wal, WalWriter};
use quotad_core::{Record, SchoolId, State};
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyServer;
use quotad_proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer as KuadrantServer;
use tonic::codegen::http;
use tonic::codegen::{Body as _, Service};
use tonic::{Code, Status};

/// The harness's clock: 2026-12-06T12:00:00Z, mid-cycle (a billing cycle
/// starts on the 1st), so an hour either way stays in it and nine days back
/// is the previous one.
pub const NOW_MS: i64 = 1_796_558_400_000;

/// The school of the probe records: no call names it, so no state has it.
const PROBE_SCHOOL: &str = "zz-fuzz-probe";

/// Panics anywhere in the process (a handler, an actor thread, the WAL
/// writer), counted by the hook [`install_panic_counter`] installs.
static PANICS: AtomicUsize = AtomicUsize::new(0);

pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Counts every panic, then reports it as the default hook does. An actor
/// that panics is restarted by its supervisor and its caller only sees an
/// error, so the count is how a fuzz case learns of it.
fn install_panic_counter() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            report(info);
        }));
    });
}

/// A call's answer: its status (OK when the call succeeded) and the
/// response message's bytes (empty unless OK).
#[derive(Debug)]
pub struct Answer {
    pub status: Status,
    pub body: Vec<u8>,
}

struct Services {
    gate: QuotaGateServer<GateService>,
    admin: QuotaAdminServer<AdminService>,
    envoy: EnvoyServer<RateLimiter>,
    kuadrant: KuadrantServer<RateLimiter>,
}

pub struct Harness {
    runtime: tokio::runtime::Runtime,
    services: Services,
    wal: Wal,
    store: MemoryLog,
    engine: Engine,
    _writer: WalWriter,
    _actors: EngineRuntime,
}

impl Harness {
    /// A fresh quotad with the schools, slices, usage, holds and requests
    /// that [`Harness::set_up`] makes.
    pub fn start() -> Harness {
        install_panic_counter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = Config::default();
        let store = MemoryLog::default();
        let (wal, writer, batches) =
            Wal::start(Arc::new(store.clone()), config.wal(), 0).expect("the WAL starts");
        // No snapshotter follows the log here: its batches go nowhere.
        drop(batches);
        let engine_config = config.engine().expect("the default engine config");
        let (engine, actors) = runtime
            .block_on(Engine::start(
                State::default(),
                wal.clone(),
                engine_config,
                Clock::manual(NOW_MS),
            ))
            .expect("the engine starts");
        let analytics = Arc::new(Analytics::new(
            engine.clone(),
            None,
            config.alert_thresholds(),
        ));
        let domains = Arc::new(domains(&config));
        // The rate limit listener's trust: no token, the domains decide.
        let limiter = RateLimiter::new(engine.clone(), domains, Trust::Listener);
        let services = Services {
            gate: QuotaGateServer::new(GateService::new(engine.clone()))
                .max_decoding_message_size(config.gate_request_bytes_max()),
            admin: QuotaAdminServer::new(AdminService::new(engine.clone(), analytics))
                .max_decoding_message_size(config.request_bytes_max),
            envoy: EnvoyServer::new(limiter.clone())
                .max_decoding_message_size(config.request_bytes_max),
            kuadrant: KuadrantServer::new(limiter)
                .max_decoding_message_size(config.request_bytes_max),
        };
        let mut harness = Harness {
            runtime,
            services,
            wal,
            store,
            engine,
            _writer: writer,
            _actors: actors,
        };
        harness.set_up();
        harness
    }

    /// The log the WAL writes to.
    pub fn store(&self) -> &MemoryLog {
        &self.store
    }

    /// Appends a record no call makes and returns its position: a call
    /// between two probes wrote nothing when they are one apart.
    pub fn probe(&self) -> u64 {
        let record = Record::CycleRolledOver {
            school_id: SchoolId::parse(PROBE_SCHOOL).expect("a valid school id"),
            from_start_ms: 0,
            to_start_ms: 0,
            at_ms: NOW_MS,
        };
        self.wal.append(&record).expect("the WAL takes the probe")
    }

    /// The actors alive (every school and teacher the calls made).
    pub fn actors_alive(&self) -> usize {
        self.engine.actors_alive()
    }

    /// One unary call of `path` (e.g. "/quotad.v1.QuotaGate/Consume") with
    /// `body` as the request message, as quotad's HTTP/2 server hands it to
    /// the generated service: a gRPC frame, with an admin caller on the
    /// request where the auth interceptor puts it.
    pub fn call(&mut self, path: &str, body: &[u8]) -> Answer {
        let mut frame = Vec::with_capacity(body.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
        frame.extend_from_slice(body);
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://quotad{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(axum::body::Body::from(frame))
            .expect("a request");
        request.extensions_mut().insert(Caller::dev());
        let services = &mut self.services;
        self.runtime.block_on(async move {
            let response = if path.starts_with("/quotad.v1.QuotaGate/") {
                services.gate.call(request).await
            } else if path.starts_with("/quotad.v1.QuotaAdmin/") {
                services.admin.call(request).await
            } else if path.starts_with("/envoy.service.ratelimit.v3.RateLimitService/") {
                services.envoy.call(request).await
            } else if path.starts_with("/kuadrant.service.ratelimit.v1.RateLimitService/") {
                services.kuadrant.call(request).await
            } else {
                panic!("no service serves {path}");
            };
            let response = match response {
                Ok(response) => response,
                Err(never) => match never {},
            };
            answer(response).await
        })
    }

    /// A typed call that must succeed: the set-up's.
    fn must<T: Message>(&mut self, path: &str, request: T) {
        let answer = self.call(path, &request.encode_to_vec());
        assert_eq!(
            answer.status.code(),
            Code::Ok,
            "set-up call {path} failed: {:?}",
            answer.status
        );
    }

    /// Schools "oak" (k12, borrowing, self-service, two service types) and
    /// "solo" (an individual), slices of several terms, usage, a hold, a
    /// suspended slice, a pending request, synced usage over the slice and
    /// in the previous cycle, an anchor change for the next cycle: state for
    /// the rules to say no to, and records of most kinds for the storage
    /// tests ([`Harness::more_records`]).
    fn set_up(&mut self) {
        let gate = "/quotad.v1.QuotaGate/";
        let admin = "/quotad.v1.QuotaAdmin/";
        let pool = |service: &str, units| PoolUnits {
            service_type: service.into(),
            cycle_units: units,
        };
        self.must(
            &format!("{admin}CreateSchool"),
            CreateSchoolRequest {
                school_id: "oak".into(),
                name: "Oak Primary".into(),
                tier: "k12".into(),
                billing_anchor_day: 1,
                borrowing_enabled: true,
                pools: vec![pool("claude_messages", 100), pool("lesson_generation", 50)],
                changed_by: "fuzz".into(),
                self_service_requests: true,
            },
        );
        self.must(
            &format!("{admin}CreateSchool"),
            CreateSchoolRequest {
                school_id: "solo".into(),
                name: "Solo".into(),
                tier: "individual".into(),
                billing_anchor_day: 15,
                borrowing_enabled: false,
                pools: vec![pool("claude_messages", 20)],
                changed_by: "fuzz".into(),
                self_service_requests: false,
            },
        );
        let slice =
            |teacher: &str, service: &str, units, priority: &str, renew| SetAllocationRequest {
                school_id: "oak".into(),
                teacher_id: teacher.into(),
                service_type: service.into(),
                allocated_units: units,
                priority: priority.into(),
                auto_renew: renew,
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            };
        let set = format!("{admin}SetAllocation");
        self.must(&set, slice("ms-lee", "claude_messages", 10, "normal", None));
        self.must(
            &set,
            slice("mr-ng", "claude_messages", 5, "high", Some(true)),
        );
        self.must(&set, slice("mr-ng", "lesson_generation", 5, "", None));
        self.must(
            &format!("{admin}BulkSetAllocations"),
            BulkSetAllocationsRequest {
                school_id: "oak".into(),
                allocations: vec![AllocationSpec {
                    teacher_id: "ms-kim".into(),
                    service_type: "lesson_generation".into(),
                    allocated_units: 4,
                    priority: "low".into(),
                    auto_renew: Some(true),
                }],
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
        self.must(
            &format!("{admin}SetAllocationStatus"),
            SetAllocationStatusRequest {
                school_id: "oak".into(),
                teacher_id: "ms-kim".into(),
                service_type: "lesson_generation".into(),
                status: "suspended".into(),
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
        self.must(
            &format!("{gate}Consume"),
            ConsumeRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                service_type: "claude_messages".into(),
                units: 2,
                event_id: "e1".into(),
                occurred_at_ms: 0,
                model: "claude".into(),
            },
        );
        self.must(
            &format!("{gate}Reserve"),
            ReserveRequest {
                school_id: "oak".into(),
                teacher_id: "mr-ng".into(),
                service_type: "claude_messages".into(),
                estimate_units: 1,
                ttl_ms: 60_000,
                reservation_id: "r1".into(),
                model: "claude".into(),
            },
        );
        let event = |id: &str, units, occurred_at_ms| UsageEvent {
            event_id: id.into(),
            teacher_id: "ms-lee".into(),
            service_type: "claude_messages".into(),
            units,
            model: "claude".into(),
            occurred_at_ms,
        };
        self.must(
            &format!("{gate}SyncUsage"),
            SyncUsageRequest {
                school_id: "oak".into(),
                events: vec![
                    event("e2", 9, NOW_MS - 3_600_000),
                    event("e3", 1, NOW_MS - 9 * 86_400_000),
                ],
            },
        );
        self.must(
            &format!("{admin}RequestIncrease"),
            RequestIncreaseRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                service_type: "claude_messages".into(),
                units: 5,
                reason: "exam season".into(),
            },
        );
        self.more_records();
        self.must(
            &format!("{admin}UpdateSchoolSettings"),
            UpdateSchoolSettingsRequest {
                school_id: "oak".into(),
                borrowing_enabled: None,
                self_service_requests: None,
                billing_anchor_day: Some(15),
                name: None,
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
    }
}

impl Harness {
    /// Set-up calls that leave the kinds of record the rest does not: a
    /// pool change, a denied consume and reserve, a released hold, a
    /// removed slice, a rejected request.
    fn more_records(&mut self) {
        let gate = "/quotad.v1.QuotaGate/";
        let admin = "/quotad.v1.QuotaAdmin/";
        self.must(
            &format!("{admin}SetPool"),
            SetPoolRequest {
                school_id: "oak".into(),
                service_type: "lesson_generation".into(),
                cycle_units: 60,
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
        self.must(
            &format!("{gate}Consume"),
            ConsumeRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                service_type: "claude_messages".into(),
                units: 50,
                event_id: "too-many".into(),
                occurred_at_ms: 0,
                model: "claude".into(),
            },
        );
        let reserve = |units, id: &str| ReserveRequest {
            school_id: "oak".into(),
            teacher_id: "ms-lee".into(),
            service_type: "claude_messages".into(),
            estimate_units: units,
            ttl_ms: 60_000,
            reservation_id: id.into(),
            model: "claude".into(),
        };
        self.must(&format!("{gate}Reserve"), reserve(50, "r-too-many"));
        self.must(&format!("{gate}Reserve"), reserve(1, "r2"));
        self.must(
            &format!("{gate}Release"),
            ReleaseRequest {
                school_id: "oak".into(),
                teacher_id: "ms-lee".into(),
                reservation_id: "r2".into(),
            },
        );
        self.must(
            &format!("{admin}SetAllocation"),
            SetAllocationRequest {
                school_id: "oak".into(),
                teacher_id: "ms-kim".into(),
                service_type: "claude_messages".into(),
                allocated_units: 1,
                priority: String::new(),
                auto_renew: None,
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
        self.must(
            &format!("{admin}RemoveAllocation"),
            RemoveAllocationRequest {
                school_id: "oak".into(),
                teacher_id: "ms-kim".into(),
                service_type: "claude_messages".into(),
                changed_by: "fuzz".into(),
                reason: "set-up".into(),
            },
        );
        self.must(
            &format!("{admin}RequestIncrease"),
            RequestIncreaseRequest {
                school_id: "oak".into(),
                teacher_id: "mr-ng".into(),
                service_type: "claude_messages".into(),
                units: 3,
                reason: "more".into(),
            },
        );
        self.must(
            &format!("{admin}RejectRequest"),
            RejectRequestRequest {
                school_id: "oak".into(),
                request_id: 2,
                changed_by: "fuzz".into(),
                reason: "not now".into(),
            },
        );
    }
}

/// The status and message of a response from a generated server: an error
/// is "trailers-only" (the status in the headers); a success is the message
/// in one gRPC frame, then the status in the trailers.
async fn answer(response: http::Response<tonic::body::Body>) -> Answer {
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != Code::Ok {
            return Answer {
                status,
                body: Vec::new(),
            };
        }
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    let mut status = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => {
                return Answer {
                    status,
                    body: Vec::new(),
                }
            }
        };
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    status = Status::from_header_map(&trailers);
                }
            }
        }
    }
    let status = status.unwrap_or_else(|| Status::unknown("the response had no grpc-status"));
    // One frame: a flag byte, a length, the message.
    let message = data.get(5..).unwrap_or_default().to_vec();
    Answer {
        status,
        body: message,
    }
}

/// The rate limit domains: "gw" for oak with holds, "open" for any school
/// with a fixed service type that lets unknown slices through, and the dev
/// domain "quotad" for any school.
fn domains(config: &Config) -> Domains {
    let tables = [
        DomainConfig {
            name: "gw".into(),
            schools: vec!["oak".into()],
            holds: true,
            ..DomainConfig::default()
        },
        DomainConfig {
            name: "open".into(),
            schools: vec!["*".into()],
            service_type: Some("claude_messages".into()),
            unknown_slice: UnknownSlice::Allow,
            ..DomainConfig::default()
        },
    ];
    Domains::new(&tables, true, config.hold_ttl_ms_max).expect("valid domains")
}

/// Every record the log store holds, in order.
pub fn records(store: &MemoryLog) -> Vec<(u64, Vec<u8>)> {
    store.read_after(0).expect("the memory log reads")
}
