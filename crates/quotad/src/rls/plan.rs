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
    /// The ids this descriptor's charge carries (a slice's only); None
    /// when the request carries none. Every one is checked here, so that
    /// no id of a slice can be refused after another slice was charged.
    pub ids: Option<SliceIds>,
    pub model: Arc<str>,
}

/// The ids of one slice's charge for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceIds {
    /// A request-path consume's.
    pub event: EventId,
    /// Usage that already happened (a stream-done call, a Report, a
    /// commit of a hold quotad does not know): its own id (`<id>:done`),
    /// so that it is not taken for a retry of the request-path consume of
    /// the same event.
    pub done: EventId,
    /// The hold a reserve makes and its commit ends.
    pub hold: ReservationId,
}

/// Where a request's event id comes from.
#[derive(Debug, Clone, Copy)]
pub enum EventSource<'a> {
    /// The domain's event entry, if a descriptor has one.
    Descriptors,
    /// That entry, else this id (Kuadrant's Reserve: a fresh one).
    DescriptorsOr(&'a str),
    /// This id, whatever the descriptors say (Kuadrant's Commit: the
    /// reservation id), named by this field in errors.
    Given(&'a str, &'static str),
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

/// The id a slice charges an event with. Ids are per teacher, so the
/// event's own id serves every teacher the request names, whatever the
/// order of its descriptors; a teacher named with several service types
/// gets `<id>#<service type>` for each, so that each counts once.
pub fn slice_id(base: &str, service: &ServiceType, teacher_has_several: bool) -> String {
    match teacher_has_several {
        false => base.to_string(),
        true => format!("{base}#{service}"),
    }
}

/// The id of the `repeat`-th descriptor (from 0) of a request that names
/// the same slice again: `<id>#<repeat>` after the first.
fn repeated_id(id: &str, repeat: usize) -> String {
    match repeat {
        0 => id.to_string(),
        n => format!("{id}#{n}"),
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
    events: EventSource,
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
    // The descriptor's own event entry, else the request's first; the
    // field that names it when it is refused.
    let request_event = mapped.iter().enumerate().find_map(|(i, m)| {
        m.event
            .map(|(j, value)| (value_field(i, j), "event_id: ", value))
    });
    let mut items = Vec::with_capacity(descriptors.len());
    for (i, (descriptor, m)) in descriptors.iter().zip(&mapped).enumerate() {
        let units = item_units(i, descriptor, units, units_max)?;
        let model = match m.model {
            Some((j, value)) => parse_model_field(value)
                .map_err(|e| invalid(value_field(i, j), format!("model: {}", e.problem)))?,
            None => Arc::from(""),
        };
        let target = target(domain, i, m)?;
        let own = m
            .event
            .map(|(j, value)| (value_field(i, j), "event_id: ", value));
        let event = match events {
            EventSource::Given(id, field) => Some((field.to_string(), "", id)),
            EventSource::Descriptors => own.or_else(|| request_event.clone()),
            EventSource::DescriptorsOr(id) => own
                .or_else(|| request_event.clone())
                .or_else(|| Some(("descriptors".to_string(), "", id))),
        };
        items.push((target, units, model, event));
    }
    let several = teachers_with_several_services(&items);
    // How often each slice was named so far: the same slice named twice
    // counts twice, as in Envoy's own service.
    let mut named: Vec<&SliceRef> = Vec::new();
    let slices: Vec<Option<SliceRef>> = items
        .iter()
        .map(|(target, ..)| match target {
            Target::Slice(slice) => Some(slice.clone()),
            _ => None,
        })
        .collect();
    let repeats: Vec<usize> = slices
        .iter()
        .map(|slice| match slice {
            Some(slice) => {
                let before = named.iter().filter(|s| **s == slice).count();
                named.push(slice);
                before
            }
            None => 0,
        })
        .collect();
    let items = items
        .into_iter()
        .zip(repeats)
        .map(|((target, units, model, event), repeat)| {
            let ids = match (&target, event) {
                (Target::Slice(slice), Some((field, label, base))) => {
                    let split = several.contains(&slice.teacher);
                    let id = repeated_id(&slice_id(base, &slice.service, split), repeat);
                    Some(slice_ids(&id, field, label)?)
                }
                _ => None,
            };
            let needs_hold = domain.holds && phase == Phase::Request && units > 0;
            if needs_hold && ids.is_none() && matches!(target, Target::Slice(_)) {
                return Err(invalid(
                    "descriptors".into(),
                    format!(
                        "domain {:?} holds units until the stream-done call, which finds its hold \
                         by the event id: give every request one ({})",
                        domain.name,
                        domain.event_key.as_deref().unwrap_or("event_key")
                    ),
                ));
            }
            Ok(Item {
                target,
                units,
                ids,
                model,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        phase,
        items,
        event_id: request_event.map(|(_, _, value)| value.to_string()),
    })
}

/// The teachers a request names with more than one service type.
fn teachers_with_several_services<T>(items: &[(Target, u64, Arc<str>, T)]) -> Vec<TeacherRef> {
    let mut seen: Vec<(&TeacherRef, &ServiceType)> = Vec::new();
    let mut several = Vec::new();
    for (target, ..) in items {
        let Target::Slice(slice) = target else {
            continue;
        };
        let other_service = seen
            .iter()
            .any(|(teacher, service)| **teacher == slice.teacher && **service != slice.service);
        if other_service && !several.contains(&slice.teacher) {
            several.push(slice.teacher.clone());
        }
        seen.push((&slice.teacher, &slice.service));
    }
    several
}

/// A slice's three ids for the event `id`, each checked (`field` names the
/// id's source when one is too long, `label` what it was read as).
fn slice_ids(id: &str, field: String, label: &str) -> Result<SliceIds, RlsError> {
    let bad = |e: InvalidInput| invalid(field.clone(), format!("{label}{}", e.problem));
    Ok(SliceIds {
        event: EventId::parse(id).map_err(bad)?,
        done: EventId::parse(&done_id(id)).map_err(bad)?,
        hold: ReservationId::parse(id).map_err(bad)?,
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

    fn with_hits(mut d: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
        d.hits_addend = Some(hits);
        d
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
        plan(
            d,
            descriptors,
            Units::Hits(hits),
            None,
            EventSource::Descriptors,
            1_000_000,
        )
        .unwrap()
    }

    fn error(d: &Domain, descriptors: &[RateLimitDescriptor]) -> String {
        plan(
            d,
            descriptors,
            Units::Hits(1),
            None,
            EventSource::Descriptors,
            1_000_000,
        )
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
        let amount = plan(
            &d,
            &[slice_of(&[])],
            Units::Amount(9),
            None,
            EventSource::Descriptors,
            100,
        )
        .unwrap();
        assert_eq!(amount.items[0].units, 9);
        let too_many = plan(
            &d,
            &[slice_of(&[])],
            Units::Hits(101),
            None,
            EventSource::Descriptors,
            100,
        )
        .unwrap_err();
        assert!(too_many.to_string().starts_with("hits_addend: is 101"));
        let mut big = slice_of(&[]);
        big.hits_addend = Some(u64::MAX);
        let too_many = plan(
            &d,
            &[big],
            Units::Hits(1),
            None,
            EventSource::Descriptors,
            100,
        )
        .unwrap_err();
        assert!(too_many
            .to_string()
            .starts_with("descriptors[1].hits_addend"));
    }

    #[test]
    fn each_slice_charges_the_requests_event_whatever_the_order() {
        let d = domain(|_| {});
        let ash = |service: &str| {
            descriptor(
                &[
                    ("school_id", "oak"),
                    ("teacher_id", "mr-ash"),
                    ("service_type", service),
                ],
                None,
            )
        };
        let ids = |p: &Plan| -> Vec<Option<(String, String, String)>> {
            p.items
                .iter()
                .map(|i| {
                    i.ids.as_ref().map(|ids| {
                        (
                            ids.event.as_str().to_string(),
                            ids.done.as_str().to_string(),
                            ids.hold.as_str().to_string(),
                        )
                    })
                })
                .collect()
        };
        let own = |id: &str| Some((id.to_string(), format!("{id}:done"), id.to_string()));
        let event = descriptor(&[("event_id", "req-1")], None);
        let p = read(&d, &[event.clone(), slice_of(&[]), ash("chat")], 0);
        assert_eq!(ids(&p), [None, own("req-1"), own("req-1")]);
        assert_eq!(p.event_id.as_deref(), Some("req-1"));
        // Another order, or a subset: the same ids for the same slices.
        let p = read(&d, &[ash("chat"), event.clone()], 0);
        assert_eq!(ids(&p), [own("req-1"), None]);
        // One teacher with two service types: one id per service type.
        let p = read(&d, &[ash("chat"), event.clone(), ash("images")], 0);
        assert_eq!(ids(&p), [own("req-1#chat"), None, own("req-1#images")]);
        // The same slice twice counts twice.
        let p = read(&d, &[ash("chat"), event, ash("chat")], 0);
        assert_eq!(ids(&p), [own("req-1"), None, own("req-1#1")]);
        let none = read(&d, &[slice_of(&[])], 0);
        assert_eq!(none.items[0].ids, None);
        let off = domain(|t| t.event_key = String::new());
        let p = read(&off, &[slice_of(&[("event_id", "req-1")])], 0);
        assert_eq!(p.items[0].ids, None);
    }

    #[test]
    fn every_id_a_slice_may_need_is_checked_before_anything_is_charged() {
        let d = domain(|_| {});
        // 124 bytes: the event's own id fits, "<id>:done" does not.
        let long = "e".repeat(124);
        let error = error(&d, &[slice_of(&[("event_id", &long)])]);
        assert!(
            error.starts_with("descriptors[1].entries[4].value: event_id: is 129 bytes"),
            "{error}"
        );
        let given = plan(
            &d,
            &[slice_of(&[])],
            Units::Amount(1),
            Some(Phase::StreamDone),
            EventSource::Given(&long, "reservation_id"),
            10,
        )
        .unwrap_err();
        assert!(
            given.to_string().starts_with("reservation_id: is 129"),
            "{given}"
        );
        let fresh = plan(
            &d,
            &[slice_of(&[])],
            Units::Amount(1),
            Some(Phase::Request),
            EventSource::DescriptorsOr("rls-1"),
            10,
        )
        .unwrap();
        assert_eq!(fresh.items[0].ids.as_ref().unwrap().hold.as_str(), "rls-1");
    }

    #[test]
    fn a_holds_domain_needs_an_event_id_to_find_the_hold_again() {
        let holds = domain(|t| t.holds = true);
        let error = error(&holds, &[slice_of(&[])]);
        assert!(
            error.starts_with("descriptors: domain \"gw\" holds units"),
            "{error}"
        );
        read(&holds, &[slice_of(&[("event_id", "r1")])], 1);
        // A pure check holds nothing: no id needed.
        read(&holds, &[with_hits(slice_of(&[]), 0)], 1);
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
            EventSource::Descriptors,
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
