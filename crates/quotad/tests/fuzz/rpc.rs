//! Every RPC, fed arbitrary bytes, damaged encodings and well-formed
//! messages of its own type. For every call:
//!
//! - nothing panics, anywhere in the process (handler, actors, WAL writer);
//! - the answer is OK or a status that blames the request (INVALID_ARGUMENT,
//!   NOT_FOUND, FAILED_PRECONDITION, ...), never INTERNAL or UNKNOWN, which
//!   would say the server is broken;
//! - a body that is not a valid message is INVALID_ARGUMENT saying it could
//!   not be decoded as the method's own type, and a well-formed one never is;
//! - a refused call appends no WAL record, so it changed no state; nor does
//!   a read (GetUsage, Check, the lists, reports), nor a sync batch whose
//!   every event was rejected as bad input.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Instant;

use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};
use proptest::test_runner::TestCaseError;
use prost::Message;
use quotad::proto::{SyncRejectReason, SyncResult, SyncStatus, SyncUsageResponse};
use tonic::Code;

use crate::damage::{apply, damage};
use crate::harness::{panics, Answer, Harness};
use crate::messages::{Method, Schema};
use crate::{cases, runner, runner_seeded, seed};

/// Calls per test in the normal test run (scripts/fuzz makes many more):
/// about 2 to 4 s each in a debug build.
const CASES_DEFAULT: u32 = 6_000;

/// Messages per type checked by the generator's own test.
const CASES_GENERATOR: u32 = 200;

/// The prefix of the status message of a body the codec could not decode.
const UNDECODABLE: &str = "the request could not be decoded as ";

/// Methods that only read: even when they succeed they must write nothing.
const READS: [&str; 13] = [
    "/quotad.v1.QuotaGate/Check",
    "/quotad.v1.QuotaGate/GetUsage",
    "/quotad.v1.QuotaAdmin/GetSchool",
    "/quotad.v1.QuotaAdmin/ListSchools",
    "/quotad.v1.QuotaAdmin/ListAllocations",
    "/quotad.v1.QuotaAdmin/ListRequests",
    "/quotad.v1.QuotaAdmin/ListHistory",
    "/quotad.v1.QuotaAdmin/VerifyHistory",
    "/quotad.v1.QuotaAdmin/GetUsageReport",
    "/quotad.v1.QuotaAdmin/GetUsageRollups",
    "/quotad.v1.QuotaAdmin/GetSuggestions",
    "/quotad.v1.QuotaAdmin/ListAlerts",
    "/kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit",
];

/// Calls that answer one result per event, rejected ones included.
const SYNCS: [&str; 2] = [
    "/quotad.v1.QuotaGate/SyncUsage",
    "/quotad.v1.QuotaGate/BulkIncrement",
];

/// The statuses a request may be answered with: OK, or one that says what
/// is wrong with the request or in its way. INTERNAL, UNKNOWN, UNAVAILABLE
/// and the like would say the server failed (and invite a retry of the same
/// bytes).
fn blames_the_request(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::ResourceExhausted
    )
}

/// A method (by index) and well-formed encodings of its request type.
fn well_formed(schema: &Schema) -> BoxedStrategy<(usize, Vec<u8>)> {
    let each: Vec<BoxedStrategy<(usize, Vec<u8>)>> = schema
        .methods
        .iter()
        .enumerate()
        .map(|(i, method)| {
            schema
                .message(&method.input)
                .prop_map(move |body| (i, body))
                .boxed()
        })
        .collect();
    Union::new(each).boxed()
}

/// Arbitrary bytes, or a well-formed encoding damaged a few times.
fn hostile(schema: &Schema) -> BoxedStrategy<(usize, Vec<u8>)> {
    let methods = schema.methods.len();
    let arbitrary = (0..methods, proptest::collection::vec(any::<u8>(), 0..96));
    let damaged = (
        well_formed(schema),
        proptest::collection::vec(damage(), 1..4),
    )
        .prop_map(|((method, mut body), damages)| {
            for d in &damages {
                apply(d, &mut body);
            }
            (method, body)
        });
    prop_oneof![1 => arbitrary, 2 => damaged].boxed()
}

/// Every result of a sync answer is "rejected: bad input".
fn all_bad_input(results: &[SyncResult]) -> bool {
    !results.is_empty()
        && results.iter().all(|r| {
            r.status == SyncStatus::Rejected as i32 && r.reason == SyncRejectReason::BadInput as i32
        })
}

/// The checks every call's answer must pass (see the module's doc).
/// `written` is how many records the call appended.
fn check(
    method: &Method,
    well_formed: bool,
    answer: &Answer,
    written: u64,
    panicked: usize,
) -> Result<(), TestCaseError> {
    let (code, message) = (answer.status.code(), answer.status.message());
    prop_assert_eq!(
        panicked,
        0,
        "{} panicked; answered {:?}",
        method.path,
        answer.status
    );
    prop_assert!(
        blames_the_request(code),
        "{} answered {:?}: a server failure, not a refusal of the request",
        method.path,
        answer.status
    );
    if message.starts_with(UNDECODABLE) {
        prop_assert!(
            !well_formed,
            "{}: a well-formed {} was not decoded: {message}",
            method.path,
            method.input
        );
        prop_assert_eq!(code, Code::InvalidArgument, "{}", message);
        let named = format!("{UNDECODABLE}{}: ", method.input);
        prop_assert!(
            message.starts_with(&named),
            "{}: names another type: {message}",
            method.path
        );
    }
    if code != Code::Ok {
        prop_assert_eq!(
            written,
            0,
            "{} was refused ({:?}) yet wrote {} record(s)",
            method.path,
            answer.status,
            written
        );
        return Ok(());
    }
    if READS.contains(&method.path.as_str()) {
        prop_assert_eq!(written, 0, "the read {} wrote records", method.path);
    }
    if SYNCS.contains(&method.path.as_str()) {
        // BulkIncrementResponse has the same one field.
        let response = SyncUsageResponse::decode(answer.body.as_slice())
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", method.path)))?;
        if all_bad_input(&response.results) {
            prop_assert_eq!(
                written,
                0,
                "{}: every event was bad input, yet records were written",
                method.path
            );
        }
    }
    Ok(())
}

/// What the calls of one run were answered, per method: how deep the
/// fuzzing got (a method only ever refused as undecodable or invalid was
/// barely tried). Printed at the end of a run (`--no-capture` shows it).
#[derive(Default)]
struct Tally {
    /// Per method: status code name to calls, and calls that wrote records.
    by_method: BTreeMap<String, (BTreeMap<String, u32>, u32)>,
}

impl Tally {
    fn count(&mut self, method: &Method, answer: &Answer, written: u64) {
        let (codes, writes) = self.by_method.entry(method.path.clone()).or_default();
        let code = if answer.status.message().starts_with(UNDECODABLE) {
            "Undecodable".to_string()
        } else {
            format!("{:?}", answer.status.code())
        };
        *codes.entry(code).or_default() += 1;
        *writes += u32::from(written > 0);
    }

    fn report(&self, name: &str) -> String {
        let mut lines = vec![format!("{name}: answers per method")];
        for (path, (codes, writes)) in &self.by_method {
            let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            lines.push(format!("  {path}: {}; wrote {writes}", codes.join(", ")));
        }
        lines.join("\n")
    }
}

/// Calls one harness takes before a fresh one starts: a long run goes
/// back to the set-up's state now and then instead of drifting ever further
/// from it (pools spent, schools made of arbitrary ids).
const CASES_PER_HARNESS: u32 = 10_000;

/// Runs `cases` calls drawn from `strategy`, checking each, against a fresh
/// harness per [`CASES_PER_HARNESS`]. A harness's state carries over from
/// call to call (what one call creates, the next may find), as it would on
/// a server. Chunk k of a run uses seed + k, and a failure names its
/// chunk's seed and size: run alone, that chunk replays the failure.
fn fuzz(name: &str, strategy: BoxedStrategy<(usize, Vec<u8>)>, well_formed: bool, cases: u32) {
    let schema = Schema::load();
    let tally = RefCell::new(Tally::default());
    let started = Instant::now();
    let first_seed = seed();
    let mut left = cases;
    let mut chunk = 0u64;
    while left > 0 {
        let chunk_cases = left.min(CASES_PER_HARNESS);
        left -= chunk_cases;
        let chunk_seed = first_seed.wrapping_add(chunk);
        chunk += 1;
        let harness = RefCell::new(Harness::start());
        let last_probe = Cell::new(harness.borrow().probe());
        let mut runner = runner_seeded(chunk_cases, chunk_seed);
        let outcome = runner.runner.run(&strategy, |(index, body)| {
            let method = &schema.methods[index];
            let mut harness = harness.borrow_mut();
            let panics_before = panics();
            let answer = harness.call(&method.path, &body);
            let probe = harness.probe();
            let written = probe - last_probe.get() - 1;
            last_probe.set(probe);
            tally.borrow_mut().count(method, &answer, written);
            check(
                method,
                well_formed,
                &answer,
                written,
                panics() - panics_before,
            )
        });
        if let Err(failure) = outcome {
            eprintln!("{}", tally.borrow().report(name));
            panic!(
                "{failure}\nreplay with PROPTEST_RNG_SEED={chunk_seed} PROPTEST_CASES={chunk_cases}"
            );
        }
        // Still serving: every actor the set-up started is alive.
        assert!(harness.borrow().actors_alive() >= 5, "actors were lost");
    }
    eprintln!(
        "{}\n{name}: {cases} cases in {:.1} s (seed {first_seed})",
        tally.borrow().report(name),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn every_rpc_answers_well_formed_messages_and_a_refusal_changes_nothing() {
    let schema = Schema::load();
    fuzz(
        "well-formed",
        well_formed(&schema),
        true,
        cases(CASES_DEFAULT),
    );
}

#[test]
fn every_rpc_answers_arbitrary_and_damaged_bytes_and_a_refusal_changes_nothing() {
    let schema = Schema::load();
    fuzz("hostile", hostile(&schema), false, cases(CASES_DEFAULT));
}

/// The generator builds what it claims: every method's well-formed bodies
/// decode as its type (checked with prost on the gate's and admin's types
/// that matter most; the server checks them all in the tests above).
#[test]
fn the_generated_messages_are_well_formed() {
    use quotad::proto::{BulkSetAllocationsRequest, ConsumeRequest, SetAllocationRequest};
    let schema = Schema::load();
    let mut runner = runner(cases(CASES_GENERATOR));
    for (input, decodes) in [
        (
            "quotad.v1.ConsumeRequest",
            (|b: &[u8]| ConsumeRequest::decode(b).is_ok()) as fn(&[u8]) -> bool,
        ),
        ("quotad.v1.SetAllocationRequest", |b| {
            SetAllocationRequest::decode(b).is_ok()
        }),
        ("quotad.v1.BulkSetAllocationsRequest", |b| {
            BulkSetAllocationsRequest::decode(b).is_ok()
        }),
    ] {
        runner.run(&schema.message(input), |body| {
            prop_assert!(decodes(&body), "{input}: {body:?}");
            Ok(())
        });
    }
}
