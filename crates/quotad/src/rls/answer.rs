//! The rate limit answer, from what each descriptor's slice said: the
//! codes, the limit in Envoy's terms (a month's requests, saturated to u32)
//! and the time to the end of the billing cycle.

use quotad_core::TimestampMs;
use quotad_proto::envoy::config::core::v3::HeaderValue;
use quotad_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use quotad_proto::envoy::service::ratelimit::v3::RateLimitResponse;

use super::domain::{Domain, UnknownSlice};

/// What one descriptor came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// None of its entries is mapped.
    Ignored,
    /// It names no slice quotad knows (or only part of one).
    Unknown,
    Slice(SliceState),
}

/// A slice's answer and its state after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceState {
    pub allowed: bool,
    /// `quotad:<school>/<service type>`.
    pub name: String,
    pub allocated_units: u64,
    pub remaining_units: u64,
    pub cycle_end_ms: TimestampMs,
}

fn saturated(units: u64) -> u32 {
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// Whole milliseconds until the cycle ends; 0 once it has.
fn until_reset(cycle_end_ms: TimestampMs, now_ms: TimestampMs) -> prost_types::Duration {
    let ms = cycle_end_ms.saturating_sub(now_ms).max(0);
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn unknown_code(domain: &Domain) -> Code {
    match domain.unknown_slice {
        UnknownSlice::Deny => Code::OverLimit,
        UnknownSlice::Allow => Code::Ok,
    }
}

/// One status per descriptor, in order. A descriptor that names nothing is
/// OK, unless no descriptor of the request names a known slice: then every
/// status is the domain's `unknown_slice` answer.
pub fn response(domain: &Domain, outcomes: &[Outcome], now_ms: TimestampMs) -> RateLimitResponse {
    let any_known = outcomes.iter().any(|o| matches!(o, Outcome::Slice(_)));
    let statuses: Vec<DescriptorStatus> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Ignored if any_known => DescriptorStatus {
                code: Code::Ok.into(),
                ..DescriptorStatus::default()
            },
            Outcome::Ignored | Outcome::Unknown => DescriptorStatus {
                code: unknown_code(domain).into(),
                ..DescriptorStatus::default()
            },
            Outcome::Slice(slice) => DescriptorStatus {
                code: match slice.allowed {
                    true => Code::Ok,
                    false => Code::OverLimit,
                }
                .into(),
                current_limit: Some(RateLimit {
                    name: slice.name.clone(),
                    requests_per_unit: saturated(slice.allocated_units),
                    unit: Unit::Month.into(),
                }),
                limit_remaining: saturated(slice.remaining_units),
                duration_until_reset: Some(until_reset(slice.cycle_end_ms, now_ms)),
                quota: None,
            },
        })
        .collect();
    let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
    let response_headers_to_add = match domain.response_headers {
        true => headers(outcomes, now_ms),
        false => Vec::new(),
    };
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok }.into(),
        statuses,
        response_headers_to_add,
        ..RateLimitResponse::default()
    }
}

/// `x-ratelimit-limit`, `-remaining` and `-reset` (seconds, rounded up) of
/// the slice with the fewest units left: the one that will refuse first.
fn headers(outcomes: &[Outcome], now_ms: TimestampMs) -> Vec<HeaderValue> {
    let tightest = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Slice(slice) => Some(slice),
            _ => None,
        })
        .min_by_key(|slice| slice.remaining_units);
    let Some(slice) = tightest else {
        return Vec::new();
    };
    let reset_s = (slice.cycle_end_ms.saturating_sub(now_ms).max(0) + 999) / 1000;
    [
        (
            "x-ratelimit-limit",
            saturated(slice.allocated_units).to_string(),
        ),
        (
            "x-ratelimit-remaining",
            saturated(slice.remaining_units).to_string(),
        ),
        ("x-ratelimit-reset", reset_s.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| HeaderValue {
        key: key.into(),
        value,
        raw_value: Vec::new(),
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::domain::{DomainConfig, Domains};

    fn domain(unknown_slice: UnknownSlice, response_headers: bool) -> Domain {
        let table = DomainConfig {
            name: "gw".into(),
            schools: vec!["*".into()],
            unknown_slice,
            response_headers,
            ..DomainConfig::default()
        };
        Domains::new(&[table], false, 60_000)
            .unwrap()
            .get("gw")
            .unwrap()
            .clone()
    }

    fn slice(allowed: bool, allocated: u64, remaining: u64) -> Outcome {
        Outcome::Slice(SliceState {
            allowed,
            name: "quotad:oak/chat".into(),
            allocated_units: allocated,
            remaining_units: remaining,
            cycle_end_ms: 10_000,
        })
    }

    fn codes(r: &RateLimitResponse) -> Vec<Code> {
        r.statuses.iter().map(|s| s.code()).collect()
    }

    #[test]
    fn a_slice_reports_its_limit_remaining_and_reset() {
        let d = domain(UnknownSlice::Deny, false);
        let r = response(&d, &[slice(true, 100, 40)], 7_500);
        assert_eq!(r.overall_code(), Code::Ok);
        let status = &r.statuses[0];
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!(
            (
                limit.name.as_str(),
                limit.requests_per_unit,
                limit.unit(),
                status.limit_remaining
            ),
            ("quotad:oak/chat", 100, Unit::Month, 40)
        );
        assert_eq!(
            status.duration_until_reset,
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000
            })
        );
        assert!(r.response_headers_to_add.is_empty());
        // Past the cycle's end (the rollover not seen yet): 0, never negative.
        let late = response(&d, &[slice(true, 100, 40)], 20_000);
        assert_eq!(
            late.statuses[0].duration_until_reset,
            Some(prost_types::Duration::default())
        );
    }

    #[test]
    fn units_beyond_u32_saturate() {
        let d = domain(UnknownSlice::Deny, false);
        let r = response(&d, &[slice(true, u64::MAX, u64::from(u32::MAX) + 1)], 0);
        let status = &r.statuses[0];
        assert_eq!(
            status.current_limit.as_ref().unwrap().requests_per_unit,
            u32::MAX
        );
        assert_eq!(status.limit_remaining, u32::MAX);
        let exact = response(&d, &[slice(true, u64::from(u32::MAX), 5)], 0);
        assert_eq!(
            exact.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            u32::MAX
        );
    }

    #[test]
    fn any_descriptor_over_limit_makes_the_request_over_limit() {
        let d = domain(UnknownSlice::Deny, false);
        let r = response(&d, &[slice(true, 10, 5), slice(false, 10, 0)], 0);
        assert_eq!(r.overall_code(), Code::OverLimit);
        assert_eq!(codes(&r), [Code::Ok, Code::OverLimit]);
    }

    #[test]
    fn unknown_slices_follow_the_domain_and_ignored_ones_follow_the_rest() {
        let deny = domain(UnknownSlice::Deny, false);
        let allow = domain(UnknownSlice::Allow, false);
        let r = response(&deny, &[Outcome::Ignored, Outcome::Unknown], 0);
        assert_eq!(r.overall_code(), Code::OverLimit);
        assert_eq!(codes(&r), [Code::OverLimit, Code::OverLimit]);
        let r = response(&allow, &[Outcome::Ignored, Outcome::Unknown], 0);
        assert_eq!(r.overall_code(), Code::Ok);
        assert!(r.statuses.iter().all(|s| s.current_limit.is_none()));
        // With a known slice beside them, ignored descriptors are OK, and an
        // unknown one still follows the domain.
        let r = response(
            &deny,
            &[Outcome::Ignored, slice(true, 10, 5), Outcome::Unknown],
            0,
        );
        assert_eq!(codes(&r), [Code::Ok, Code::Ok, Code::OverLimit]);
        assert_eq!(r.overall_code(), Code::OverLimit);
        let r = response(&allow, &[Outcome::Ignored, slice(true, 10, 5)], 0);
        assert_eq!(r.overall_code(), Code::Ok);
    }

    #[test]
    fn headers_name_the_tightest_slice_when_asked_for() {
        let d = domain(UnknownSlice::Deny, true);
        let r = response(&d, &[slice(true, 100, 40), slice(true, 50, 3)], 8_001);
        let headers: Vec<(&str, &str)> = r
            .response_headers_to_add
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-ratelimit-limit", "50"),
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset", "2")
            ]
        );
        let none = response(&d, &[Outcome::Unknown], 0);
        assert!(none.response_headers_to_add.is_empty());
    }
}
