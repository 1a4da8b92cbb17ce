"""Envoy's rate limit service (envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit) on quotad, called with Envoy's own generated stubs (the
xds-protos package), as an Envoy gateway would (issue 12). contract.rs
checks through GetUsage what was charged.

Teachers (--teacher ROLE=ID:UNITS):
  main      domain gw (response headers): check, retry, pure check, exhaust,
            over limit, stream_done overage, malformed requests
  holds     domain gw-holds: a request-path call holds, stream_done commits it
  multi     domain gw: several descriptors in one request; domain gw-fixed
  stranger  no slice: answered per the domain's unknown_slice
"""

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc

from contract_common import (
    Checks,
    Code,
    Unit,
    channel,
    code_name,
    descriptor,
    parse_scenario,
    request,
    slice_entries,
)

# Above quotad's units_per_call_max (10^12): refused, never charged.
UNITS_TOO_MANY = 2**64 - 1
# The longest billing cycle (31 days), plus a second of rounding.
CYCLE_S_MAX = 31 * 24 * 3600 + 1


def check_status(checks, what, status, scenario, teacher, code, remaining):
    """One DescriptorStatus for `teacher`'s slice: its code, current_limit and
    limit_remaining, and a reset within the billing cycle."""
    checks.equal(code_name(status.code), code_name(code), f"{what}: status code")
    limit = status.current_limit
    checks.equal(
        limit.name, f"quotad:{scenario.school_id}/{scenario.service_type}", f"{what}: current_limit.name"
    )
    checks.equal(limit.requests_per_unit, teacher.allocated_units, f"{what}: current_limit.requests_per_unit")
    checks.equal(Unit.Name(limit.unit), "MONTH", f"{what}: current_limit.unit")
    checks.equal(status.limit_remaining, remaining, f"{what}: limit_remaining")
    reset_s = status.duration_until_reset.seconds
    checks.check(0 < reset_s <= CYCLE_S_MAX, f"{what}: 0 < duration_until_reset <= 31 days", reset_s)


def headers_of(response):
    return {header.key.lower(): header.value for header in response.response_headers_to_add}


def main_teacher(checks, stub, scenario):
    teacher = scenario.teacher("main")
    units = teacher.allocated_units
    assert units >= 3, "the main teacher needs a slice of at least 3 units"
    should = stub.ShouldRateLimit

    def one(event_id, hits_addend=0, descriptor_hits=None, phase=None, domain="gw"):
        entries = slice_entries(scenario, teacher, event_id=event_id, phase=phase)
        return request(domain, [descriptor(entries, descriptor_hits)], hits_addend=hits_addend)

    # 1 hit (hits_addend 0 = unset = 1): charged, with the limit it counts against.
    first = checks.call("ShouldRateLimit 1 hit", should, one("env-1"))
    if first:
        checks.equal(code_name(first.overall_code), "OK", "1 hit: overall_code")
        checks.equal(len(first.statuses), 1, "1 hit: one status per descriptor")
        if first.statuses:
            check_status(checks, "1 hit", first.statuses[0], scenario, teacher, Code.OK, units - 1)
        headers = headers_of(first)
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
            checks.check(name in headers, f"1 hit: response header {name} (domain gw asks for them)", headers)
        checks.equal(headers.get("x-ratelimit-remaining"), str(units - 1), "1 hit: x-ratelimit-remaining")
        checks.check(
            headers.get("x-ratelimit-limit", "").split(",")[0].split(";")[0].strip() == str(units),
            f"1 hit: x-ratelimit-limit starts with {units}",
            headers.get("x-ratelimit-limit"),
        )
        checks.check(headers.get("x-ratelimit-reset", "").isdigit(), "1 hit: x-ratelimit-reset is seconds", headers)

    # The same event id again: the first answer, nothing charged.
    retry = checks.call("ShouldRateLimit retry of env-1", should, one("env-1"))
    if retry and first:
        checks.equal(code_name(retry.overall_code), "OK", "retry: overall_code")
        checks.equal(
            [s.limit_remaining for s in retry.statuses],
            [units - 1],
            "retry: limit_remaining as the first answer (charged once)",
        )

    # The descriptor's own hits_addend (UInt64Value 0) wins over the request's 3:
    # a pure check, nothing charged.
    check = checks.call("ShouldRateLimit descriptor hits_addend 0", should, one("env-2", 3, descriptor_hits=0))
    if check:
        checks.equal(code_name(check.overall_code), "OK", "hits_addend 0: overall_code")
        if check.statuses:
            check_status(checks, "hits_addend 0", check.statuses[0], scenario, teacher, Code.OK, units - 1)

    # The rest of the slice through the request's hits_addend.
    rest = checks.call("ShouldRateLimit the rest of the slice", should, one("env-3", units - 1))
    if rest:
        checks.equal(code_name(rest.overall_code), "OK", "rest of the slice: overall_code")
        if rest.statuses:
            check_status(checks, "rest of the slice", rest.statuses[0], scenario, teacher, Code.OK, 0)
        checks.equal(headers_of(rest).get("x-ratelimit-remaining"), "0", "rest: x-ratelimit-remaining")

    # Nothing left: a pure check and a hit are both over the limit.
    for what, message in [
        ("pure check on an exhausted slice", one("env-4", descriptor_hits=0)),
        ("1 hit on an exhausted slice", one("env-5")),
    ]:
        over = checks.call(f"ShouldRateLimit {what}", should, message)
        if over:
            checks.equal(code_name(over.overall_code), "OVER_LIMIT", f"{what}: overall_code")
            if over.statuses:
                check_status(checks, what, over.statuses[0], scenario, teacher, Code.OVER_LIMIT, 0)

    # apply_on_stream_done: usage that happened, charged past the slice, OK.
    done = checks.call("ShouldRateLimit stream_done 2", should, one("env-6", 2, phase="stream_done"))
    if done:
        checks.equal(code_name(done.overall_code), "OK", "stream_done past the slice: overall_code")
        checks.equal([code_name(s.code) for s in done.statuses], ["OK"], "stream_done: status codes")
    done_again = checks.call("ShouldRateLimit stream_done retry", should, one("env-6", 2, phase="stream_done"))
    if done_again:
        checks.equal(code_name(done_again.overall_code), "OK", "stream_done retry: overall_code")

    malformed(checks, should, scenario, teacher)


def malformed(checks, should, scenario, teacher):
    """Requests quotad refuses before charging anything."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    good = slice_entries(scenario, teacher, event_id="env-bad")
    checks.status("no descriptors", should, request("gw", []), invalid)
    empty_key = [good[0], ("", "x")] + good[1:]
    checks.status(
        "an entry with an empty key", should, request("gw", [descriptor(empty_key)]), invalid,
        "descriptors[1].entries[2].key",
    )
    empty_value = good[:2] + [("service_type", "")] + good[3:]
    checks.status(
        "an entry with an empty value", should, request("gw", [descriptor(empty_value)]), invalid,
        "descriptors[1].entries[3].value",
    )
    twice = good + [("teacher_id", teacher.teacher_id)]
    checks.status("a mapped key twice", should, request("gw", [descriptor(twice)]), invalid)
    bad_school = [("school_id", "Not A School!")] + good[1:]
    checks.status("a bad school id", should, request("gw", [descriptor(bad_school)]), invalid)
    bad_phase = slice_entries(scenario, teacher, event_id="env-bad", phase="later")
    checks.status("an unknown phase", should, request("gw", [descriptor(bad_phase)]), invalid)
    for phase in ("request", "stream_done"):
        huge = slice_entries(scenario, teacher, event_id=f"env-huge-{phase}", phase=phase)
        checks.status(
            f"{phase}: more units than one call may charge", should,
            request("gw", [descriptor(huge, hits_addend=UNITS_TOO_MANY)]), invalid, "hits_addend",
        )
    checks.status(
        "an unknown domain", should, request("no-such-domain", [descriptor(good)]), grpc.StatusCode.NOT_FOUND,
        "no-such-domain",
    )
    checks.status(
        "a school the domain may not charge", should, request("gw-other", [descriptor(good)]),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def holds_teacher(checks, stub, scenario):
    """Domain gw-holds: the request-path call reserves a hold (reservation id
    = event id), the stream_done call commits it with the real units."""
    teacher = scenario.teacher("holds")
    units = teacher.allocated_units
    assert units >= 6, "the holds teacher needs a slice of at least 6 units"
    should = stub.ShouldRateLimit

    def one(event_id, hits_addend, phase=None):
        entries = slice_entries(scenario, teacher, event_id=event_id, phase=phase)
        return request("gw-holds", [descriptor(entries)], hits_addend=hits_addend)

    held = checks.call("gw-holds: request path 3 (a hold)", should, one("hold-1", 3))
    if held:
        checks.equal(code_name(held.overall_code), "OK", "hold 3: overall_code")
        if held.statuses:
            check_status(checks, "hold 3", held.statuses[0], scenario, teacher, Code.OK, units - 3)
        checks.equal(len(held.response_headers_to_add), 0, "gw-holds adds no response headers")
    done = checks.call("gw-holds: stream_done 4 commits hold-1", should, one("hold-1", 4, "stream_done"))
    if done:
        checks.equal(code_name(done.overall_code), "OK", "commit 4: overall_code")
    second = checks.call("gw-holds: request path 2 (a hold left open)", should, one("hold-2", 2))
    if second and second.statuses:
        check_status(checks, "hold 2", second.statuses[0], scenario, teacher, Code.OK, units - 4 - 2)


def multi_teacher(checks, stub, scenario):
    """Three descriptors in one request: two name the slice (charged under
    event ids ID and ID#1), one names none (OK, no limit); then a domain with
    a fixed service type."""
    teacher = scenario.teacher("multi")
    units = teacher.allocated_units
    assert units >= 5, "the multi teacher needs a slice of at least 5 units"
    should = stub.ShouldRateLimit
    descriptors = [
        descriptor(slice_entries(scenario, teacher, event_id="multi-1")),
        descriptor([("generic_key", "contract")]),
        descriptor(slice_entries(scenario, teacher), hits_addend=2),
    ]
    message = request("gw", descriptors)
    first = checks.call("three descriptors", should, message)
    if first:
        checks.equal(code_name(first.overall_code), "OK", "three descriptors: overall_code")
        checks.equal(len(first.statuses), 3, "three descriptors: three statuses")
        if len(first.statuses) == 3:
            checks.equal(code_name(first.statuses[1].code), "OK", "a descriptor naming no slice: OK")
            checks.check(
                not first.statuses[1].HasField("current_limit"),
                "a descriptor naming no slice: no current_limit",
                first.statuses[1].current_limit,
            )
            # Answers run in descriptor order over one slice: 1, then 2 more.
            checks.equal(first.statuses[2].limit_remaining, units - 3, "third descriptor: limit_remaining")
    # The retry: the first call's codes, and nothing charged (what is left is
    # what the first call left; quotad reports what is left now, as Consume's
    # replays do, not the first call's number).
    again = checks.call("three descriptors again", should, message)
    if again and first:
        checks.equal(
            [code_name(s.code) for s in again.statuses],
            [code_name(s.code) for s in first.statuses],
            "three descriptors again: the first call's codes",
        )
        checks.equal(
            [s.limit_remaining for s in again.statuses],
            [units - 3, 0, units - 3],
            "three descriptors again: nothing more charged",
        )
    fixed_entries = slice_entries(scenario, teacher, event_id="fixed-1", service=False)
    fixed = checks.call("gw-fixed (service_type fixed)", should, request("gw-fixed", [descriptor(fixed_entries)]))
    if fixed and fixed.statuses:
        check_status(checks, "gw-fixed", fixed.statuses[0], scenario, teacher, Code.OK, units - 4)


def stranger(checks, stub, scenario):
    """No slice for this teacher: gw denies (unknown_slice = deny), gw-open allows."""
    teacher = scenario.teacher("stranger")
    entries = slice_entries(scenario, teacher, event_id="stranger-1")
    for domain, expected in [("gw", "OVER_LIMIT"), ("gw-open", "OK")]:
        answer = checks.call(f"{domain}: a teacher without a slice", stub.ShouldRateLimit,
                             request(domain, [descriptor(entries)]))
        if answer:
            checks.equal(code_name(answer.overall_code), expected, f"{domain}: unknown slice: overall_code")
            checks.equal([code_name(s.code) for s in answer.statuses], [expected],
                         f"{domain}: unknown slice: status codes")


def main_port(checks, scenario):
    """The same service on the main gRPC port, behind the bearer token."""
    if not scenario.grpc_addr:
        return
    stub = rls_pb2_grpc.RateLimitServiceStub(channel(scenario.grpc_addr))
    teacher = scenario.teacher("multi")
    # A pure check: charges nothing.
    message = request("gw", [descriptor(slice_entries(scenario, teacher, event_id="port-1"), hits_addend=0)])
    checks.status("main port without a token", stub.ShouldRateLimit, message, grpc.StatusCode.UNAUTHENTICATED)
    answer = checks.call("main port with a service token", stub.ShouldRateLimit, message,
                         metadata=[("authorization", f"Bearer {scenario.token}")])
    if answer:
        checks.equal(code_name(answer.overall_code), "OK", "main port: overall_code")


def main():
    scenario = parse_scenario(__doc__)
    checks = Checks("envoy")
    stub = rls_pb2_grpc.RateLimitServiceStub(channel(scenario.rls_addr))
    main_teacher(checks, stub, scenario)
    holds_teacher(checks, stub, scenario)
    multi_teacher(checks, stub, scenario)
    stranger(checks, stub, scenario)
    main_port(checks, scenario)
    checks.finish()


if __name__ == "__main__":
    main()
