//! A request body that is not a valid protobuf message (garbage bytes, a
//! string field that is not UTF-8) is the caller's bad input: INVALID_ARGUMENT
//! saying it could not be decoded, never INTERNAL, and it changes nothing.
//! The bodies are sent as raw gRPC frames over a real HTTP/2 connection, with
//! the same bearer token the generated clients send.

use prost::bytes::{Buf, BufMut};
use prost::Message;
use quotad::proto::*;
use quotad_proto::BearerToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{self, *};

const CONSUME: &str = "/quotad.v1.QuotaGate/Consume";
const SET_ALLOCATION: &str = "/quotad.v1.QuotaAdmin/SetAllocation";
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const KUADRANT_RESERVE: &str = "/kuadrant.service.ratelimit.v1.RateLimitService/Reserve";

/// Field 1 (school_id), wire type 2 (length-delimited), two bytes that are
/// not UTF-8 (0xc3 starts a two-byte sequence; 0x28 cannot continue it).
const SCHOOL_ID_NOT_UTF8: [u8; 4] = [0x0a, 0x02, 0xc3, 0x28];

/// Sends the given bytes as the message, and reads the answer's bytes back.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One unary call of `path` with `body` as the message, as the admin.
async fn call_raw(server: &TestServer, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = BearerToken::new(&admin_token()).unwrap();
    let mut grpc = tonic::client::Grpc::new(InterceptedService::new(channel, bearer));
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|_| ())
}

fn assert_undecodable(result: Result<(), Status>, message_type: &str) {
    let status = result.expect_err("an undecodable body must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let prefix = format!("the request could not be decoded as {message_type}: ");
    assert!(
        status.message().starts_with(&prefix),
        "{:?} should start with {prefix:?}",
        status.message()
    );
}

/// A school "oak" with ms-lee holding 10 units, one of them used.
async fn setup(server: &TestServer) {
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    create_school(&mut admin, "oak", 100, false).await;
    allocate(&mut admin, "oak", "ms-lee", 10, "normal")
        .await
        .unwrap();
    gate.consume(consume("oak", "ms-lee", 1, "baseline"))
        .await
        .unwrap();
}

/// ms-lee's usage and oak's pools, through the generated clients.
async fn state(server: &TestServer) -> (GetUsageResponse, Vec<Pool>) {
    let (mut admin, mut gate) = (server.admin().await, server.gate().await);
    let usage = common::usage(&mut gate, "oak", "ms-lee").await;
    (usage, school(&mut admin, "oak").await.pools)
}

/// A consume of one unit by ms-lee, encoded, without its school_id (an
/// empty string is not on the wire), for the test to prepend one.
fn consume_without_school(event_id: &str) -> Vec<u8> {
    consume("", "ms-lee", 1, event_id).encode_to_vec()
}

#[tokio::test]
async fn garbage_bytes_are_invalid_argument_and_change_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let before = state(&server).await;

    let garbage = vec![0xff; 7];
    assert_undecodable(
        call_raw(&server, CONSUME, garbage.clone()).await,
        "quotad.v1.ConsumeRequest",
    );
    assert_undecodable(
        call_raw(&server, SET_ALLOCATION, garbage.clone()).await,
        "quotad.v1.SetAllocationRequest",
    );
    assert_undecodable(
        call_raw(&server, SHOULD_RATE_LIMIT, garbage.clone()).await,
        "envoy.service.ratelimit.v3.RateLimitRequest",
    );
    assert_undecodable(
        call_raw(&server, KUADRANT_RESERVE, garbage).await,
        "kuadrant.service.ratelimit.v1.ReserveRequest",
    );

    assert_eq!(state(&server).await, before, "garbage changed the state");
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_invalid_argument_and_changes_nothing() {
    let (_dir, data) = temp_dir();
    let server = TestServer::start(&data).await;
    setup(&server).await;
    let before = state(&server).await;

    let mut body = SCHOOL_ID_NOT_UTF8.to_vec();
    body.extend(consume_without_school("not-utf8"));
    let result = call_raw(&server, CONSUME, body).await;
    assert_undecodable(result.clone(), "quotad.v1.ConsumeRequest");
    let message = result.unwrap_err().message().to_string();
    assert!(
        message.contains("school_id"),
        "{message:?} should name the field"
    );
    assert_eq!(
        state(&server).await,
        before,
        "the bad body changed the state"
    );

    // The same frame with a UTF-8 school_id is charged: what was refused
    // above was only the two bad bytes.
    let mut body = vec![0x0a, 0x03];
    body.extend(b"oak");
    body.extend(consume_without_school("utf8"));
    call_raw(&server, CONSUME, body).await.unwrap();
    let mut gate = server.gate().await;
    assert_eq!(used_units(&mut gate, "oak", "ms-lee").await, 2);
    assert_still_serving(&server).await;
}

/// A valid consume is still answered, and health still says SERVING.
async fn assert_still_serving(server: &TestServer) {
    let mut gate = server.gate().await;
    let used_before = used_units(&mut gate, "oak", "ms-lee").await;
    decide(&mut gate, consume("oak", "ms-lee", 1, "after")).await;
    assert_eq!(
        used_units(&mut gate, "oak", "ms-lee").await,
        used_before + 1
    );

    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "quotad.v1.QuotaGate", "quotad.v1.QuotaAdmin"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let answer = health.check(request).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
}
