//! What a rate limit request asks, read against its domain: for each
//! descriptor, the slice it names (if any), the units it charges and the id
//! its charge carries. Everything is checked here, before anything is
//! charged, so that a bad request changes nothing.

use std::sync::Arc;

use quotad_core::{
    parse_model_field, EventId, InvalidInput, ReservationId, SchoolId, ServiceType, TeacherId,
};

use super::domain::Domain;
use super::RlsError;
use crate::engine::TeacherRef;
use quotad_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;

/// The most descriptors one request may carry, and entries one descriptor.
pub const DESCRIPTORS_MAX: usize = 32;
pub const ENTRIES_MAX: usize = 32;

/// Which call of a gateway this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the AI call: decide (a check, a consume or a hold).
    Request,
    /// After it (Envoy's `apply_on_stream_done`, Kuadrant's Report): usage
    /// that already happened, never refused.
    StreamDone,
}

impl Phase {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "request" => Some(Self::Request),
            "stream_done" => Some(Self::StreamDone),
            _ => None,
        }
    }
}

/// A slice a descriptor names: the engine knows whether it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRef {
    pub teacher: TeacherRef,
    pub service: ServiceType,
}

/// What one descriptor names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// None of its entries is mapped: it is ignored.
    Unmapped,
    /// Part of a slice (a school without a teacher, say): no known slice.
    Partial,
    Slice(SliceRef),
}

/// One descriptor, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub target: Target,
    /// 0: a pure check.
    pub units: u64,
    /// The id this descriptor's charge carries (a slice's only); None
    /// when the request carries none. A stream-done charge's id is its own
    /// (`<id>:done`), so that the usage it reports is not taken for a
    /// retry of the request-path consume of the same event.
    pub event_id: Option<EventId>,
    /// The hold a request-path reserve makes, and its stream-done commit
    /// ends: the event's id (a slice's only; None without an event id).
    pub hold_id: Option<ReservationId>,
    pub model: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub phase: Phase,
    pub items: Vec<Item>,
    /// The request's event id as sent, before a descriptor's suffix.
    pub event_id: Option<String>,
}

impl Plan {
    pub fn slices(&self) -> impl Iterator<Item = (&SliceRef, &Item)> {
        self.items.iter().filter_map(|item| match &item.target {
            Target::Slice(slice) => Some((slice, item)),
            _ => None,
        })
    }
}

/// How a request's units are given.
#[derive(Debug, Clone, Copy)]
pub enum Units {
    /// Envoy's: the descriptor's `hits_addend` when set, else the
    /// request's (a plain uint32: 0 means unset, that is 1).
    Hits(u32),
    /// Kuadrant's Reserve and Commit: one amount for every descriptor.
    Amount(u64),
}

/// The id the k-th slice of a request charges with: the request's own for
/// the first, `<id>#<k>` after, so that each slice counts the event once
/// and a retry (the same descriptors) finds the same ids.
pub fn derived_id(base: &str, k: usize) -> String {
    match k {
        0 => base.to_string(),
        k => format!("{base}#{k}"),
    }
}

/// The id of the usage a stream-done call (or a Report) charges for the
/// event `id`.
pub fn done_id(id: &str) -> String {
    format!("{id}:done")
}

fn invalid(field: String, problem: impl Into<String>) -> RlsError {
    RlsError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// The mapped entries of one descriptor.
#[derive(Default)]
struct Mapped<'a> {
    school: Option<(usize, &'a str)>,
    teacher: Option<(usize, &'a str)>,
    service: Option<(usize, &'a str)>,
    event: Option<(usize, &'a str)>,
    model: Option<(usize, &'a str)>,
    phase: Option<(usize, &'a str)>,
}

/// Reads a request's descriptors. `phase` given: the RPC decides it (the
/// phase entries are then not read); None: the phase entry does.
pub fn plan(
    domain: &Domain,
    descriptors: &[RateLimitDescriptor],
    units: Units,
    phase: Option<Phase>,
    units_max: u64,
) -> Result<Plan, RlsError> {
    if descriptors.is_empty() {
        return Err(invalid(
            "descriptors".into(),
            "at least one descriptor is needed",
        ));
    }
    if descriptors.len() > DESCRIPTORS_MAX {
        return Err(invalid(
            "descriptors".into(),
            format!(
                "has {}; at most {DESCRIPTORS_MAX} are allowed",
                descriptors.len()
            ),
        ));
    }
    let mapped = descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| read_entries(domain, i, d))
        .collect::<Result<Vec<_>, _>>()?;
    let phase = match phase {
        Some(phase) => phase,
        None => request_phase(&mapped)?,
    };
    // The descriptor's own event entry, else the request's first.
    let request_event = mapped
        .iter()
        .enumerate()
        .find_map(|(i, m)| m.event.map(|(j, value)| (i, j, value)));
    let mut items = Vec::with_capacity(descriptors.len());
    let mut slices = 0;
    for (i, (descriptor, m)) in descriptors.iter().zip(&mapped).enumerate() {
        let units = item_units(i, descriptor, units, units_max)?;
        let model = match m.model {
            Some((j, value)) => parse_model_field(value)
                .map_err(|e| invalid(value_field(i, j), format!("model: {}", e.problem)))?,
            None => Arc::from(""),
        };
        let target = target(domain, i, m)?;
        let event = m.event.map(|(j, value)| (i, j, value)).or(request_event);
        let (event_id, hold_id) = match (&target, event) {
            (Target::Slice(_), Some((ei, ej, base))) => {
                let bad = |e: InvalidInput| {
                    invalid(value_field(ei, ej), format!("event_id: {}", e.problem))
                };
                let id = derived_id(base, slices);
                let event_id = match phase {
                    Phase::Request => EventId::parse(&id),
                    Phase::StreamDone => EventId::parse(&done_id(&id)),
                }
                .map_err(bad)?;
                (
                    Some(event_id),
                    Some(ReservationId::parse(&id).map_err(bad)?),
                )
            }
            _ => (None, None),
        };
        if matches!(target, Target::Slice(_)) {
            slices += 1;
        }
        items.push(Item {
            target,
            units,
            event_id,
            hold_id,
            model,
        });
    }
    Ok(Plan {
        phase,
        items,
        event_id: request_event.map(|(_, _, value)| value.to_string()),
    })
}

/// People count from 1, as in every other message of quotad's.
fn entry_field(i: usize, j: usize, part: &str) -> String {
    format!("descriptors[{}].entries[{}].{part}", i + 1, j + 1)
}

fn value_field(i: usize, j: usize) -> String {
    entry_field(i, j, "value")
}

fn read_entries<'a>(
    domain: &Domain,
    i: usize,
    descriptor: &'a RateLimitDescriptor,
) -> Result<Mapped<'a>, RlsError> {
    let entries = &descriptor.entries;
    if entries.is_empty() {
        return Err(invalid(
            format!("descriptors[{}].entries", i + 1),
            "at least one entry is needed",
        ));
    }
    if entries.len() > ENTRIES_MAX {
        return Err(invalid(
            format!("descriptors[{}].entries", i + 1),
            format!("has {}; at most {ENTRIES_MAX} are allowed", entries.len()),
        ));
    }
    let mut mapped = Mapped::default();
    for (j, entry) in entries.iter().enumerate() {
        if entry.key.is_empty() {
            return Err(invalid(entry_field(i, j, "key"), "must not be empty"));
        }
        if entry.value.is_empty() {
            return Err(invalid(entry_field(i, j, "value"), "must not be empty"));
        }
        let key = entry.key.as_str();
        let slot = if key == domain.school_key {
            &mut mapped.school
        } else if key == domain.teacher_key {
            &mut mapped.teacher
        } else if domain.service_type.is_none() && key == domain.service_key {
            &mut mapped.service
        } else if domain.event_key.as_deref() == Some(key) {
            &mut mapped.event
        } else if domain.model_key.as_deref() == Some(key) {
            &mut mapped.model
        } else if domain.phase_key.as_deref() == Some(key) {
            &mut mapped.phase
        } else {
            continue; // not mapped: ignored
        };
        if slot.is_some() {
            return Err(invalid(
                entry_field(i, j, "key"),
                format!("{key} appears twice in one descriptor"),
            ));
        }
        *slot = Some((j, entry.value.as_str()));
    }
    Ok(mapped)
}

/// The phase entries of a request: all alike, `request` when there is none.
fn request_phase(mapped: &[Mapped]) -> Result<Phase, RlsError> {
    let mut phase = None;
    for (i, m) in mapped.iter().enumerate() {
        let Some((j, value)) = m.phase else { continue };
        let this = Phase::parse(value).ok_or_else(|| {
            invalid(
                value_field(i, j),
                format!("{value:?} is not a phase (request or stream_done)"),
            )
        })?;
        if phase.is_some_and(|p| p != this) {
            return Err(invalid(
                value_field(i, j),
                "the descriptors of one request name different phases",
            ));
        }
        phase = Some(this);
    }
    Ok(phase.unwrap_or(Phase::Request))
}

fn item_units(
    i: usize,
    descriptor: &RateLimitDescriptor,
    units: Units,
    units_max: u64,
) -> Result<u64, RlsError> {
    let (value, field) = match (units, descriptor.hits_addend) {
        (Units::Amount(amount), _) => (amount, "amount".to_string()),
        (Units::Hits(_), Some(own)) => (own, format!("descriptors[{}].hits_addend", i + 1)),
        (Units::Hits(0), None) => (1, "hits_addend".to_string()),
        (Units::Hits(hits), None) => (u64::from(hits), "hits_addend".to_string()),
    };
    if value > units_max {
        return Err(invalid(
            field,
            format!("is {value}; one call may use at most {units_max}"),
        ));
    }
    Ok(value)
}

fn target(domain: &Domain, i: usize, m: &Mapped) -> Result<Target, RlsError> {
    let service = match (&domain.service_type, m.service) {
        (Some(fixed), _) => Some(Ok(fixed.clone())),
        (None, Some((j, value))) => Some(
            ServiceType::parse(value)
                .map_err(|e| invalid(value_field(i, j), format!("service_type: {}", e.problem))),
        ),
        (None, None) => None,
    };
    let school = m.school.map(|(j, value)| {
        SchoolId::parse(value)
            .map_err(|e| invalid(value_field(i, j), format!("school_id: {}", e.problem)))
    });
    let teacher = m.teacher.map(|(j, value)| {
        TeacherId::parse(value)
            .map_err(|e| invalid(value_field(i, j), format!("teacher_id: {}", e.problem)))
    });
    let named = m.school.is_some() || m.teacher.is_some() || m.service.is_some();
    match (
        school.transpose()?,
        teacher.transpose()?,
        service.transpose()?,
    ) {
        (Some(school_id), Some(teacher_id), Some(service)) => Ok(Target::Slice(SliceRef {
            teacher: TeacherRef {
                school_id,
                teacher_id,
            },
            service,
        })),
        _ if named => Ok(Target::Partial),
        _ => Ok(Target::Unmapped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rls::domain::{DomainConfig, Domains};
    use quotad_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    fn domain(edit: impl FnOnce(&mut DomainConfig)) -> Domain {
        let mut table = DomainConfig {
            name: "gw".into(),
            schools: vec!["*".into()],
            ..DomainConfig::default()
        };
        edit(&mut table);
        Domains::new(&[table], false, 60_000)
            .unwrap()
            .get("gw")
            .unwrap()
            .clone()
    }

    fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            limit: None,
            hits_addend: hits,
        }
    }

    fn slice_of(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        let mut all = vec![
            ("school_id", "oak"),
            ("teacher_id", "ms-lee"),
            ("service_type", "chat"),
        ];
        all.extend_from_slice(entries);
        descriptor(&all, None)
    }

    fn read(d: &Domain, descriptors: &[RateLimitDescriptor], hits: u32) -> Plan {
        plan(d, descriptors, Units::Hits(hits), None, 1_000_000).unwrap()
    }

    fn error(d: &Domain, descriptors: &[RateLimitDescriptor]) -> String {
        plan(d, descriptors, Units::Hits(1), None, 1_000_000)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_default_keys_name_a_slice_and_other_entries_are_ignored() {
        let d = domain(|_| {});
        let p = read(
            &d,
            &[slice_of(&[("path", "/v1/chat"), ("model", "gpt-x")])],
            0,
        );
        let Target::Slice(slice) = &p.items[0].target else {
            panic!("{p:?}")
        };
        assert_eq!(slice.teacher.school_id.as_str(), "oak");
        assert_eq!(slice.teacher.teacher_id.as_str(), "ms-lee");
        assert_eq!(slice.service.as_str(), "chat");
        assert_eq!(&*p.items[0].model, "gpt-x");
        assert_eq!(p.phase, Phase::Request);
        let only_other = read(&d, &[descriptor(&[("path", "/v1")], None)], 0);
        assert_eq!(only_other.items[0].target, Target::Unmapped);
        let partial = read(&d, &[descriptor(&[("school_id", "oak")], None)], 0);
        assert_eq!(partial.items[0].target, Target::Partial);
    }

    #[test]
    fn the_keys_are_the_domains_and_a_fixed_service_type_needs_none() {
        let d = domain(|t| {
            t.school_key = "tenant".into();
            t.teacher_key = "user".into();
            t.service_type = Some("claude_messages".into());
        });
        let p = read(
            &d,
            &[descriptor(
                &[("tenant", "oak"), ("user", "ms-lee"), ("service_type", "x")],
                None,
            )],
            0,
        );
        let Target::Slice(slice) = &p.items[0].target else {
            panic!("{p:?}")
        };
        assert_eq!(slice.service.as_str(), "claude_messages");
        // The default keys mean nothing to this domain.
        let defaults = read(&d, &[slice_of(&[])], 0);
        assert_eq!(defaults.items[0].target, Target::Unmapped);
    }

    #[test]
    fn units_are_the_descriptors_then_the_requests_then_one() {
        let d = domain(|_| {});
        let mut own = slice_of(&[]);
        own.hits_addend = Some(7);
        let mut check = slice_of(&[]);
        check.hits_addend = Some(0);
        let p = read(&d, &[slice_of(&[]), own, check], 0);
        assert_eq!(
            p.items.iter().map(|i| i.units).collect::<Vec<_>>(),
            [1, 7, 0]
        );
        let p = read(&d, &[slice_of(&[])], 40);
        assert_eq!(p.items[0].units, 40);
        let amount = plan(&d, &[slice_of(&[])], Units::Amount(9), None, 100).unwrap();
        assert_eq!(amount.items[0].units, 9);
        let too_many = plan(&d, &[slice_of(&[])], Units::Hits(101), None, 100).unwrap_err();
        assert!(too_many.to_string().starts_with("hits_addend: is 101"));
        let mut big = slice_of(&[]);
        big.hits_addend = Some(u64::MAX);
        let too_many = plan(&d, &[big], Units::Hits(1), None, 100).unwrap_err();
        assert!(too_many
            .to_string()
            .starts_with("descriptors[1].hits_addend"));
    }

    #[test]
    fn each_slice_gets_its_own_id_from_the_requests_event() {
        let d = domain(|_| {});
        let other = descriptor(
            &[
                ("school_id", "oak"),
                ("teacher_id", "mr-ash"),
                ("service_type", "chat"),
            ],
            None,
        );
        let p = read(
            &d,
            &[
                descriptor(&[("event_id", "req-1")], None),
                slice_of(&[]),
                other,
            ],
            0,
        );
        let ids: Vec<_> = p
            .items
            .iter()
            .map(|i| i.event_id.as_ref().map(|e| e.as_str().to_string()))
            .collect();
        assert_eq!(ids, [None, Some("req-1".into()), Some("req-1#1".into())]);
        assert_eq!(p.event_id.as_deref(), Some("req-1"));
        assert_eq!(p.items[2].hold_id.as_ref().unwrap().as_str(), "req-1#1");
        let done = read(
            &d,
            &[slice_of(&[
                ("event_id", "req-1"),
                ("quotad_phase", "stream_done"),
            ])],
            0,
        );
        assert_eq!(
            done.items[0].event_id.as_ref().unwrap().as_str(),
            "req-1:done"
        );
        assert_eq!(done.items[0].hold_id.as_ref().unwrap().as_str(), "req-1");
        let none = read(&d, &[slice_of(&[])], 0);
        assert_eq!(none.items[0].event_id, None);
        let off = domain(|t| t.event_key = String::new());
        let p = read(&off, &[slice_of(&[("event_id", "req-1")])], 0);
        assert_eq!(p.items[0].event_id, None);
    }

    #[test]
    fn the_phase_entry_says_which_call_this_is() {
        let d = domain(|_| {});
        let done = read(&d, &[slice_of(&[("quotad_phase", "stream_done")])], 0);
        assert_eq!(done.phase, Phase::StreamDone);
        let marked = read(
            &d,
            &[
                slice_of(&[]),
                descriptor(&[("quotad_phase", "request")], None),
            ],
            0,
        );
        assert_eq!(marked.phase, Phase::Request);
        assert!(error(&d, &[slice_of(&[("quotad_phase", "later")])])
            .starts_with("descriptors[1].entries[4].value"));
        let mixed = [
            slice_of(&[("quotad_phase", "request")]),
            descriptor(&[("quotad_phase", "stream_done")], None),
        ];
        assert!(error(&d, &mixed).contains("different phases"));
        // The RPC may decide it (Kuadrant's Report).
        let forced = plan(
            &d,
            &[slice_of(&[("quotad_phase", "request")])],
            Units::Hits(1),
            Some(Phase::StreamDone),
            10,
        )
        .unwrap();
        assert_eq!(forced.phase, Phase::StreamDone);
    }

    #[test]
    fn malformed_descriptors_name_the_field() {
        let d = domain(|_| {});
        let cases: Vec<(Vec<RateLimitDescriptor>, &str)> = vec![
            (vec![], "descriptors: at least one"),
            (
                vec![descriptor(&[], None)],
                "descriptors[1].entries: at least one",
            ),
            (
                vec![slice_of(&[]), descriptor(&[("", "x")], None)],
                "descriptors[2].entries[1].key: must not be empty",
            ),
            (
                vec![descriptor(&[("path", "")], None)],
                "descriptors[1].entries[1].value: must not be empty",
            ),
            (
                vec![slice_of(&[("school_id", "elm")])],
                "descriptors[1].entries[4].key: school_id appears twice",
            ),
            (
                vec![descriptor(&[("school_id", "Bad School")], None)],
                "descriptors[1].entries[1].value: school_id:",
            ),
            (
                vec![descriptor(&[("teacher_id", "a/b")], None)],
                "descriptors[1].entries[1].value: teacher_id:",
            ),
            (
                vec![descriptor(&[("service_type", "Chat!")], None)],
                "descriptors[1].entries[1].value: service_type:",
            ),
            (
                vec![slice_of(&[("event_id", &"e".repeat(129))])],
                "descriptors[1].entries[4].value: event_id:",
            ),
            (
                vec![slice_of(&[("model", &"m".repeat(129))])],
                "descriptors[1].entries[4].value: model:",
            ),
            (
                vec![slice_of(&[]); DESCRIPTORS_MAX + 1],
                "descriptors: has 33",
            ),
        ];
        for (descriptors, says) in cases {
            let got = error(&d, &descriptors);
            assert!(got.starts_with(says), "{says:?} vs {got:?}");
        }
    }
}
