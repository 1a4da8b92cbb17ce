"""What the contract scripts share: their command line, descriptors built from
Envoy's own generated messages, and a list of checks that keeps going after a
failed one (so one run names every mismatch) and sets the exit status.

Only Envoy's generated code (the xds-protos package) and Kuadrant's (generated
at test time from the vendored kuadrant/kuadrantrls.proto) touch the wire:
nothing here comes from quotad's own copies of those files.
"""

import argparse
import sys
from dataclasses import dataclass

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import wrappers_pb2

# Every call gets this deadline, so a server that hangs fails the test instead
# of stalling it.
CALL_TIMEOUT_S = 5.0

Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit


@dataclass(frozen=True)
class Teacher:
    teacher_id: str
    allocated_units: int


@dataclass(frozen=True)
class Scenario:
    """What contract.rs set up: the school, its pool's service type and the
    teachers by role (`--teacher ROLE=ID:UNITS`)."""

    rls_addr: str
    grpc_addr: str
    token: str
    school_id: str
    service_type: str
    teachers: dict
    stubs_dir: str

    def teacher(self, role):
        return self.teachers[role]


def parse_scenario(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rls", required=True, help="quotad's rls_addr (HOST:PORT)")
    parser.add_argument("--grpc", default="", help="quotad's grpc_addr (HOST:PORT)")
    parser.add_argument("--token", default="", help="a service token for the main port")
    parser.add_argument("--school", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="ROLE=ID:UNITS",
        help="a teacher and the units allocated to them, by the role the script gives them",
    )
    parser.add_argument("--stubs-dir", default="", help="where Kuadrant's stubs were generated")
    args = parser.parse_args()
    teachers = {}
    for spec in args.teacher:
        role, _, rest = spec.partition("=")
        teacher_id, _, units = rest.partition(":")
        teachers[role] = Teacher(teacher_id, int(units or "0"))
    return Scenario(
        rls_addr=args.rls,
        grpc_addr=args.grpc,
        token=args.token,
        school_id=args.school,
        service_type=args.service,
        teachers=teachers,
        stubs_dir=args.stubs_dir,
    )


def channel(addr):
    """A plaintext channel that is ready, or a clear failure within the deadline."""
    chan = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(chan).result(timeout=CALL_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        sys.exit(f"cannot connect to quotad at {addr}")
    return chan


def descriptor(entries, hits_addend=None):
    """An Envoy RateLimitDescriptor from (key, value) pairs; hits_addend, when
    given, is the descriptor's own google.protobuf.UInt64Value."""
    result = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)
            for key, value in entries
        ]
    )
    if hits_addend is not None:
        result.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits_addend))
    return result


def slice_entries(scenario, teacher, event_id=None, phase=None, service=True):
    """The entries that name `teacher`'s slice with the default keys of a
    [[rls_domains]] table (school_id, teacher_id, service_type, event_id,
    quotad_phase)."""
    entries = [("school_id", scenario.school_id), ("teacher_id", teacher.teacher_id)]
    if service:
        entries.append(("service_type", scenario.service_type))
    if event_id is not None:
        entries.append(("event_id", event_id))
    if phase is not None:
        entries.append(("quotad_phase", phase))
    return entries


def request(domain, descriptors, hits_addend=0):
    return rls_pb2.RateLimitRequest(
        domain=domain, descriptors=descriptors, hits_addend=hits_addend
    )


def code_name(code):
    return Code.Name(code)


class Checks:
    """Records every check, prints it, and exits non-zero at the end if any
    failed."""

    def __init__(self, name):
        self.name = name
        self.failed = []
        self.passed = 0

    def check(self, condition, what, got=None):
        if condition:
            self.passed += 1
            print(f"ok    {what}")
        else:
            detail = "" if got is None else f": got {got!r}"
            self.failed.append(f"{what}{detail}")
            print(f"FAIL  {what}{detail}")
        return condition

    def equal(self, got, expected, what):
        return self.check(got == expected, f"{what} == {expected!r}", None if got == expected else got)

    def call(self, what, method, message, metadata=None):
        """The response of a call that must succeed, or None (recorded as a
        failure) if it returned an error status."""
        try:
            response = method(message, timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            self.check(False, f"{what} succeeds", f"{error.code().name}: {error.details()}")
            return None
        return response

    def status(self, what, method, message, expected, detail_contains=None, metadata=None):
        """A call that must fail with the gRPC status `expected` (a
        grpc.StatusCode), its message naming `detail_contains` if given."""
        try:
            response = method(message, timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            ok = error.code() == expected
            if ok and detail_contains is not None:
                ok = detail_contains in (error.details() or "")
            wanted = expected.name + (f" naming {detail_contains!r}" if detail_contains else "")
            self.check(ok, f"{what} -> {wanted}", None if ok else f"{error.code().name}: {error.details()}")
            return
        self.check(False, f"{what} -> {expected.name}", f"OK: {response}")

    def finish(self):
        print(f"{self.name}: {self.passed} passed, {len(self.failed)} failed")
        if self.failed:
            for failure in self.failed:
                print(f"  failed: {failure}")
            sys.exit(1)
