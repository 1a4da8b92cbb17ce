"""Kuadrant's rate limit service (kuadrant.service.ratelimit.v1.RateLimitService:
CheckRateLimit, Report, Reserve, Commit) on quotad, called with stubs generated
from Limitador's own kuadrantrls.proto (kuadrant_stubs.py, into --stubs-dir).
contract.rs checks through GetUsage what was charged.

Teachers (--teacher ROLE=ID:UNITS):
  kuadrant  domain gw: check, reserve/commit with overage, commit retry,
            reserve over the remaining, report, commit of an unknown hold
"""

import re

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from google.protobuf import duration_pb2

from contract_common import (
    Checks,
    channel,
    code_name,
    descriptor,
    parse_scenario,
    request,
    slice_entries,
)
from kuadrant_stubs import import_stubs

GENERATED_RESERVATION_ID = re.compile(r"rls-[0-9a-f]{32}")
# Above quotad's units_per_call_max (10^12): refused, never charged.
UNITS_TOO_MANY = 2**64 - 1


def main():
    scenario = parse_scenario(__doc__)
    kuadrant_pb2, kuadrant_pb2_grpc = import_stubs(scenario.stubs_dir)
    checks = Checks("kuadrant")
    chan = channel(scenario.rls_addr)
    stub = kuadrant_pb2_grpc.RateLimitServiceStub(chan)
    envoy = rls_pb2_grpc.RateLimitServiceStub(chan)
    teacher = scenario.teacher("kuadrant")
    units = teacher.allocated_units
    assert units >= 9, "the kuadrant teacher needs a slice of at least 9 units"
    slice_only = [descriptor(slice_entries(scenario, teacher))]

    def with_event(event_id, hits_addend=None, who=teacher):
        return [descriptor(slice_entries(scenario, who, event_id=event_id), hits_addend)]

    peeks = []

    def remaining(what, who=teacher):
        """limit_remaining through a pure check (Envoy's ShouldRateLimit, hits_addend 0)."""
        peeks.append(what)
        event_id = f"kq-peek-{len(peeks)}"
        answer = checks.call(what, envoy.ShouldRateLimit, request("gw", with_event(event_id, 0, who)))
        return answer.statuses[0].limit_remaining if answer and answer.statuses else None

    def reserve(amount, descriptors, ttl_ms=None):
        message = kuadrant_pb2.ReserveRequest(domain="gw", descriptors=descriptors, amount=amount)
        if ttl_ms is not None:
            message.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_ms // 1000, nanos=(ttl_ms % 1000) * 1_000_000))
        return message

    def commit(reservation_id, actual_amount):
        return kuadrant_pb2.CommitRequest(
            domain="gw", descriptors=slice_only, reservation_id=reservation_id, actual_amount=actual_amount
        )

    # CheckRateLimit only checks (as Limitador's): 2 units fit, none charged.
    checked = checks.call("CheckRateLimit 2", stub.CheckRateLimit, request("gw", with_event("kq-1"), hits_addend=2))
    if checked:
        checks.equal(code_name(checked.overall_code), "OK", "CheckRateLimit 2: overall_code")
        checks.equal([s.limit_remaining for s in checked.statuses], [units], "CheckRateLimit 2: limit_remaining")
        if checked.statuses:
            checks.equal(
                checked.statuses[0].current_limit.name,
                f"quotad:{scenario.school_id}/{scenario.service_type}",
                "CheckRateLimit 2: current_limit.name",
            )

    # Reserve 3 without an event id: a generated reservation id; the hold counts.
    held = checks.call("Reserve 3", stub.Reserve, reserve(3, slice_only))
    reservation_id = ""
    if held:
        checks.equal(code_name(held.code), "OK", "Reserve 3: code")
        reservation_id = held.reservation_id
        checks.check(
            GENERATED_RESERVATION_ID.fullmatch(reservation_id) is not None,
            "Reserve 3: reservation_id is rls-<32 hex>",
            reservation_id,
        )
    checks.equal(remaining("after Reserve 3"), units - 3, "limit_remaining with the hold")

    # Commit more than was held: the actual amount is charged, the hold ends.
    committed = checks.call("Commit 5 of a hold of 3", stub.Commit, commit(reservation_id, 5))
    if committed:
        checks.equal(committed.reservation_released, True, "Commit 5: reservation_released")
    checks.equal(remaining("after Commit 5"), units - 5, "limit_remaining after Commit 5")
    checks.call("Commit retry", stub.Commit, commit(reservation_id, 5))
    checks.equal(remaining("after the Commit retry"), units - 5, "a Commit retry charges nothing")

    # Reserve more than remains: OVER_LIMIT, no reservation id, nothing held,
    # not even on the other slice named (multi's), which had room: all or none.
    other = scenario.teacher("multi")
    other_remaining = remaining("the other slice before", who=other)
    amount = units - 5 + 1
    assert other_remaining is None or other_remaining >= amount, "multi's slice must have room"
    both = [descriptor(slice_entries(scenario, other)), descriptor(slice_entries(scenario, teacher))]
    over = checks.call("Reserve over the remaining", stub.Reserve, reserve(amount, both))
    if over:
        checks.equal(code_name(over.code), "OVER_LIMIT", "Reserve over the remaining: code")
        checks.equal(over.reservation_id, "", "Reserve over the remaining: reservation_id")
    checks.equal(remaining("the other slice after", who=other), other_remaining,
                 "Reserve over the remaining holds nothing on the other slice")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    checks.status("Reserve amount 0", stub.Reserve, reserve(0, slice_only), invalid)
    checks.status("Reserve ttl negative", stub.Reserve, reserve(1, slice_only, ttl_ms=-1000), invalid)
    checks.status("Reserve ttl over hold_ttl_ms_max", stub.Reserve, reserve(1, slice_only, ttl_ms=2 * 3_600_000),
                  invalid)
    checks.status("Commit more than one call may charge", stub.Commit, commit("kq-huge-commit", UNITS_TOO_MANY),
                  invalid)
    checks.status("Report more than one call may charge", stub.Report,
                  request("gw", with_event("kq-huge", UNITS_TOO_MANY)), invalid)
    checks.equal(remaining("after refused Reserves"), units - 5, "refused calls charge and hold nothing")

    # With an event id in the descriptors, that is the reservation id.
    named = checks.call("Reserve 1 with event kq-r2", stub.Reserve, reserve(1, with_event("kq-r2"), ttl_ms=60_000))
    if named:
        checks.equal(code_name(named.code), "OK", "Reserve kq-r2: code")
        checks.equal(named.reservation_id, "kq-r2", "Reserve kq-r2: reservation_id")
    released = checks.call("Commit kq-r2 1", stub.Commit, commit("kq-r2", 1))
    if released:
        checks.equal(released.reservation_released, True, "Commit kq-r2: reservation_released")

    # Report: usage that happened, charged past the slice, never refused.
    report = request("gw", with_event("kq-p1"), hits_addend=5)
    reported = checks.call("Report 5 (past the slice)", stub.Report, report)
    if reported:
        checks.equal(code_name(reported.overall_code), "OK", "Report 5: overall_code")
    checks.call("Report retry", stub.Report, report)

    over_check = checks.call("CheckRateLimit past the slice", stub.CheckRateLimit, request("gw", with_event("kq-2")))
    if over_check:
        checks.equal(code_name(over_check.overall_code), "OVER_LIMIT", "CheckRateLimit past the slice: overall_code")

    # A hold nobody made: charged as a Report under the reservation id, not released.
    late = checks.call("Commit an unknown hold", stub.Commit, commit("kq-late-1", 2))
    if late:
        checks.equal(late.reservation_released, False, "Commit an unknown hold: reservation_released")
    checks.call("Commit an unknown hold again", stub.Commit, commit("kq-late-1", 2))

    checks.finish()


if __name__ == "__main__":
    main()
