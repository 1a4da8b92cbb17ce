//! Well-formed protobuf messages of any type in quotad's descriptor set,
//! built from the descriptors themselves: every method's request type, with
//! fields present or absent, repeated fields of a few entries, nested
//! messages, enums in and out of range. Values lean on the names the fuzz
//! harness set up (schools, teachers, service types, ids) so that calls get
//! past the first check and reach the rules; the rest are edge values
//! (empty, too long, negative, the largest integers) and arbitrary text.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Just, Strategy};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};

use crate::harness::NOW_MS;

/// A unary method quotad serves: its path and its request's type.
#[derive(Debug, Clone)]
pub struct Method {
    /// "/quotad.v1.QuotaGate/Consume".
    pub path: String,
    /// "quotad.v1.ConsumeRequest".
    pub input: String,
}

/// The services whose methods are fuzzed: everything quotad answers with a
/// token or on the rate limit listener (health and reflection are tonic's).
const SERVICES: [&str; 4] = [
    "quotad.v1.QuotaGate",
    "quotad.v1.QuotaAdmin",
    "envoy.service.ratelimit.v3.RateLimitService",
    "kuadrant.service.ratelimit.v1.RateLimitService",
];

/// Envoy's rate limit descriptor: its entries are built together
/// ([`descriptor_entries`]), so that most name a slice the harness has.
const DESCRIPTOR: &str = "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor";

/// How deep nested messages go; deeper ones are left out.
const DEPTH_MAX: usize = 4;

/// Entries of a repeated field, at most.
const REPEATED_MAX: usize = 4;

/// Every message and enum of the descriptor set, by full name (no leading dot).
pub struct Schema {
    messages: BTreeMap<String, DescriptorProto>,
    enums: BTreeMap<String, Vec<i32>>,
    pub methods: Vec<Method>,
}

impl Schema {
    pub fn load() -> Schema {
        let set = FileDescriptorSet::decode(quotad_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set quotad serves for reflection decodes");
        let mut schema = Schema {
            messages: BTreeMap::new(),
            enums: BTreeMap::new(),
            methods: Vec::new(),
        };
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                schema.add_message(package, message);
            }
            for e in &file.enum_type {
                schema.add_enum(package, e);
            }
            for service in &file.service {
                let service_name = format!("{package}.{}", service.name());
                if !SERVICES.contains(&service_name.as_str()) {
                    continue;
                }
                for method in &service.method {
                    assert!(
                        !method.client_streaming() && !method.server_streaming(),
                        "{service_name}/{}: the harness sends unary calls only",
                        method.name()
                    );
                    schema.methods.push(Method {
                        path: format!("/{service_name}/{}", method.name()),
                        input: method.input_type().trim_start_matches('.').to_string(),
                    });
                }
            }
        }
        assert!(
            schema.methods.len() > 30,
            "only {} methods found: is the descriptor set complete?",
            schema.methods.len()
        );
        schema
    }

    fn add_message(&mut self, scope: &str, message: &DescriptorProto) {
        let name = format!("{scope}.{}", message.name());
        for nested in &message.nested_type {
            self.add_message(&name, nested);
        }
        for e in &message.enum_type {
            self.add_enum(&name, e);
        }
        self.messages.insert(name, message.clone());
    }

    fn add_enum(&mut self, scope: &str, e: &prost_types::EnumDescriptorProto) {
        let values = e.value.iter().map(|v| v.number()).collect();
        self.enums.insert(format!("{scope}.{}", e.name()), values);
    }

    /// Encodings of well-formed messages of type `name`.
    pub fn message(&self, name: &str) -> BoxedStrategy<Vec<u8>> {
        self.message_at(name, 0)
    }

    fn message_at(&self, name: &str, depth: usize) -> BoxedStrategy<Vec<u8>> {
        let Some(message) = self.messages.get(name) else {
            panic!("{name} is not in the descriptor set");
        };
        let fields: Vec<BoxedStrategy<Vec<u8>>> = message
            .field
            .iter()
            .filter_map(|field| match (name, field.name()) {
                (DESCRIPTOR, "entries") => Some(entries(field.number())),
                _ => self.field(field, depth),
            })
            .collect();
        fields.prop_map(|parts| parts.concat()).boxed()
    }

    /// A field's encoding (empty when absent), or None for a field that
    /// cannot be built (a message nested too deep).
    fn field(&self, field: &FieldDescriptorProto, depth: usize) -> Option<BoxedStrategy<Vec<u8>>> {
        let value = self.value(field, depth)?;
        let number = u64::from(u32::try_from(field.number()).ok()?);
        let wire_type = wire_type(field.r#type());
        let tag = (number << 3) | wire_type;
        let one = value.prop_map(move |bytes| {
            let mut out = Vec::with_capacity(bytes.len() + 11);
            put_varint(&mut out, tag);
            if wire_type == LENGTH_DELIMITED {
                put_varint(&mut out, bytes.len() as u64);
            }
            out.extend(bytes);
            out
        });
        Some(if field.label() == Label::Repeated {
            proptest::collection::vec(one, 0..=REPEATED_MAX)
                .prop_map(|entries| entries.concat())
                .boxed()
        } else {
            // Absent now and then: proto3 scalars at their default are not
            // on the wire, and `optional` ones may be unset.
            proptest::option::weighted(0.9, one)
                .prop_map(Option::unwrap_or_default)
                .boxed()
        })
    }

    /// The value's bytes as they follow the tag (a length-delimited value
    /// without its length).
    fn value(&self, field: &FieldDescriptorProto, depth: usize) -> Option<BoxedStrategy<Vec<u8>>> {
        let name = field.name();
        Some(match field.r#type() {
            Type::String => text(name).prop_map(String::into_bytes).boxed(),
            Type::Bytes => proptest::collection::vec(any::<u8>(), 0..24).boxed(),
            Type::Bool => any::<bool>().prop_map(|b| varint(u64::from(b))).boxed(),
            Type::Enum => {
                let values = self
                    .enums
                    .get(field.type_name().trim_start_matches('.'))
                    .cloned()
                    .unwrap_or_default();
                let known = if values.is_empty() {
                    Just(0).boxed()
                } else {
                    proptest::sample::select(values).boxed()
                };
                prop_oneof![8 => known, 1 => Just(99), 1 => Just(-1)]
                    .prop_map(|v: i32| varint(i64::from(v) as u64))
                    .boxed()
            }
            Type::Message | Type::Group => {
                if depth >= DEPTH_MAX {
                    return None;
                }
                self.message_at(field.type_name().trim_start_matches('.'), depth + 1)
            }
            Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
                let zigzag = field.r#type() == Type::Sint64;
                let fixed = field.r#type() == Type::Sfixed64;
                signed(name)
                    .prop_map(move |v| match (zigzag, fixed) {
                        (true, _) => varint(((v << 1) ^ (v >> 63)) as u64),
                        (_, true) => v.to_le_bytes().to_vec(),
                        _ => varint(v as u64),
                    })
                    .boxed()
            }
            Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
                let zigzag = field.r#type() == Type::Sint32;
                let fixed = field.r#type() == Type::Sfixed32;
                signed(name)
                    .prop_map(move |v| {
                        let v = v as i32;
                        match (zigzag, fixed) {
                            (true, _) => varint(u64::from(((v << 1) ^ (v >> 31)) as u32)),
                            (_, true) => v.to_le_bytes().to_vec(),
                            // int32 is sign-extended to 64 bits on the wire.
                            _ => varint(i64::from(v) as u64),
                        }
                    })
                    .boxed()
            }
            Type::Uint64 | Type::Fixed64 => {
                let fixed = field.r#type() == Type::Fixed64;
                unsigned(name)
                    .prop_map(move |v| {
                        if fixed {
                            v.to_le_bytes().to_vec()
                        } else {
                            varint(v)
                        }
                    })
                    .boxed()
            }
            Type::Uint32 | Type::Fixed32 => {
                let fixed = field.r#type() == Type::Fixed32;
                unsigned(name)
                    .prop_map(move |v| {
                        let v = v as u32;
                        if fixed {
                            v.to_le_bytes().to_vec()
                        } else {
                            varint(u64::from(v))
                        }
                    })
                    .boxed()
            }
            Type::Double => any::<f64>().prop_map(|v| v.to_le_bytes().to_vec()).boxed(),
            Type::Float => any::<f32>().prop_map(|v| v.to_le_bytes().to_vec()).boxed(),
        })
    }
}

/// The `entries` field (number `number`) of a descriptor: each entry an
/// `Entry { key = 1; value = 2 }` message.
fn entries(number: i32) -> BoxedStrategy<Vec<u8>> {
    let tag = (u64::from(number.unsigned_abs()) << 3) | LENGTH_DELIMITED;
    descriptor_entries()
        .prop_map(move |entries| {
            let mut out = Vec::new();
            for (key, value) in entries {
                let mut entry = Vec::new();
                for (field, text) in [(1u64, key), (2, value)] {
                    put_varint(&mut entry, (field << 3) | LENGTH_DELIMITED);
                    put_varint(&mut entry, text.len() as u64);
                    entry.extend(text.into_bytes());
                }
                put_varint(&mut out, tag);
                put_varint(&mut out, entry.len() as u64);
                out.extend(entry);
            }
            out
        })
        .boxed()
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;
const FIXED32: u64 = 5;

fn wire_type(t: Type) -> u64 {
    match t {
        Type::String | Type::Bytes | Type::Message | Type::Group => LENGTH_DELIMITED,
        Type::Double | Type::Fixed64 | Type::Sfixed64 => FIXED64,
        Type::Float | Type::Fixed32 | Type::Sfixed32 => FIXED32,
        _ => VARINT,
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    put_varint(&mut out, value);
    out
}

/// Valid values the harness knows, per string field: the schools, teachers
/// and service types it set up, ids some of which were used, the words the
/// enumerations take. Invalid values come from [`WILD`] and arbitrary text.
const SCHOOLS: &[&str] = &["oak", "oak", "solo", "elm"];
const TEACHERS: &[&str] = &["ms-lee", "mr-ng", "ms-kim", "solo", "nobody"];
const SERVICE_TYPES: &[&str] = &["claude_messages", "lesson_generation", "homework_help"];
const IDS: &[&str] = &["e1", "e2", "e3", "r1", "r2", "b1"];
/// ListSchools pages by school id, ListHistory and ListRequests by number.
const PAGE_TOKENS: &[&str] = &["", "", "oak", "solo", "1", "3"];
const PRIORITIES: &[&str] = &["low", "normal", "high", ""];
const TIERS: &[&str] = &["k12", "preschool", "individual"];
const STATUSES: &[&str] = &[
    "active",
    "suspended",
    "pending",
    "approved",
    "rejected",
    "expired",
];
const DOMAINS: &[&str] = &["quotad", "gw", "open"];
const WORDS: &[&str] = &["term start", "claude", "Oak Primary", ""];

/// Values no field accepts, or only some do: near misses of valid ones.
const WILD: &[&str] = &[
    "",
    "Oak",
    "oak ",
    "Ms Lee",
    "Not A Type!",
    "a/b:c",
    "urgent",
    "university",
    "paused",
    "unknown",
    "-1",
    "\u{0}",
    "\u{feff}oak",
];

/// A string field's value: mostly a valid one for a field of that name (so
/// that most calls get past the checks and reach the rules), sometimes a
/// near miss, too long, or arbitrary text.
fn text(field: &str) -> BoxedStrategy<String> {
    let valid: &'static [&'static str] = match field {
        "school_id" => SCHOOLS,
        "page_token" => PAGE_TOKENS,
        "teacher_id" | "from_teacher_id" | "to_teacher_id" => TEACHERS,
        "service_type" | "feature" => SERVICE_TYPES,
        "priority" => PRIORITIES,
        "tier" => TIERS,
        "status" => STATUSES,
        "domain" => DOMAINS,
        "event_id" | "reservation_id" | "batch_id" => {
            // Some ids used before (duplicates), most new.
            return prop_oneof![
                4 => proptest::sample::select(IDS).prop_map(str::to_string),
                8 => "[a-z][a-z0-9-]{0,10}",
                1 => wild(),
            ]
            .boxed();
        }
        _ => WORDS,
    };
    prop_oneof![
        24 => proptest::sample::select(valid).prop_map(str::to_string),
        3 => wild(),
    ]
    .boxed()
}

fn wild() -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::sample::select(WILD).prop_map(str::to_string),
        // Past every id's, name's and reason's limit.
        1 => (1usize..5).prop_map(|k| "x".repeat(k * 1_200)),
        2 => "\\PC{0,24}",
    ]
    .boxed()
}

/// The entries of a rate limit descriptor as a gateway sends them: the
/// domain's keys with values of the harness's names, each left out now and
/// then, in any order, sometimes with a key twice or an unknown one.
pub fn descriptor_entries() -> BoxedStrategy<Vec<(String, String)>> {
    let entry = |key: &'static str, values: &'static [&'static str]| {
        proptest::option::weighted(
            0.9,
            proptest::sample::select(values).prop_map(move |v| (key.to_string(), v.to_string())),
        )
    };
    let base = (
        entry("school_id", SCHOOLS),
        entry("teacher_id", TEACHERS),
        entry("service_type", SERVICE_TYPES),
        proptest::option::weighted(
            0.8,
            "[a-z][a-z0-9-]{0,6}".prop_map(|id| ("event_id".to_string(), id)),
        ),
        proptest::option::weighted(0.3, Just(("model".to_string(), "claude".to_string()))),
        proptest::option::weighted(
            0.4,
            proptest::sample::select(&["request", "stream_done", "later"][..])
                .prop_map(|p| ("quotad_phase".to_string(), p.to_string())),
        ),
    );
    let extra = proptest::collection::vec((text("key"), text("value")), 0..2);
    (base, extra, any::<proptest::sample::Index>())
        .prop_map(|((a, b, c, d, e, f), extra, rotate)| {
            let mut entries: Vec<(String, String)> = [a, b, c, d, e, f]
                .into_iter()
                .flatten()
                .chain(extra)
                .collect();
            let len = entries.len();
            if len > 0 {
                entries.rotate_left(rotate.index(len));
            }
            entries
        })
        .boxed()
}

/// An integer field's value (signed view): times near the harness's now for
/// `*_ms` fields, small counts, and the extremes.
fn signed(field: &str) -> BoxedStrategy<i64> {
    if field.ends_with("_ms") {
        let hour = 3_600_000;
        let day = 24 * hour;
        return prop_oneof![
            12 => proptest::sample::select(vec![
                0,
                NOW_MS,
                NOW_MS - hour,
                NOW_MS + hour,
                NOW_MS - 9 * day,
                NOW_MS - 40 * day,
                NOW_MS + 10 * day,
            ]),
            2 => proptest::sample::select(vec![1, -1, -2, i64::MIN, i64::MAX]),
            1 => any::<i64>(),
        ]
        .boxed();
    }
    unsigned(field).prop_map(|v| v as i64).boxed()
}

/// An unsigned integer field's value: small ones most (units, days, page
/// sizes, request ids), and the extremes.
fn unsigned(_field: &str) -> BoxedStrategy<u64> {
    prop_oneof![
        12 => 0u64..8,
        2 => proptest::sample::select(vec![
            10, 28, 29, 37, 100, 1_000, 1_001, 60_000, 3_600_001, 1 << 32, 1 << 53,
            u64::from(u32::MAX), u64::MAX,
        ]),
        1 => any::<u64>(),
    ]
    .boxed()
}
