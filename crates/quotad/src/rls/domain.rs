//! A rate limit domain: how the descriptors of one `RateLimitRequest.domain`
//! name a teacher's slice, which schools it may charge, and how it answers.
//! Read from the config file's `[[rls_domains]]` tables, checked once at
//! start into [`Domains`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use quotad_core::{InvalidInput, SchoolId, ServiceType};

/// The domain a first run has under `--insecure-dev`, with the default keys.
pub const DEV_DOMAIN: &str = "quotad";

/// What a request whose descriptors name no known slice is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSlice {
    /// OVER_LIMIT: a gateway that sends an unknown teacher is refused.
    #[default]
    Deny,
    /// OK, nothing charged.
    Allow,
}

impl UnknownSlice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }
}

/// One `[[rls_domains]]` table, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainConfig {
    /// The `RateLimitRequest.domain` this table configures.
    pub name: String,
    /// The schools this domain may charge; `"*"` is any school.
    pub schools: Vec<String>,
    /// Descriptor entry keys whose values name the school, the teacher and
    /// the service type.
    pub school_key: String,
    pub teacher_key: String,
    pub service_key: String,
    /// A service type for every descriptor of the domain (then
    /// `service_key` is not read).
    pub service_type: Option<String>,
    /// The key whose value is the usage event's id (a gateway fills it from
    /// `x-request-id`); empty: none, every call is a new event.
    pub event_key: String,
    /// The key whose value is the model, recorded with the usage.
    pub model_key: String,
    /// The key whose value says which call this is: `request` (the default)
    /// or `stream_done` (Envoy's `apply_on_stream_done` call).
    pub phase_key: String,
    pub unknown_slice: UnknownSlice,
    /// A request-path call with units holds them (Reserve) instead of
    /// consuming; the stream-done call commits the hold.
    pub holds: bool,
    /// How long such a hold lives; 0 is the server's `hold_ttl_ms_default`.
    pub hold_ttl_ms: u64,
    /// Add `x-ratelimit-limit`, `-remaining` and `-reset` to the answer's
    /// `response_headers_to_add`.
    pub response_headers: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            name: DEV_DOMAIN.into(),
            schools: Vec::new(),
            school_key: "school_id".into(),
            teacher_key: "teacher_id".into(),
            service_key: "service_type".into(),
            service_type: None,
            event_key: "event_id".into(),
            model_key: "model".into(),
            phase_key: "quotad_phase".into(),
            unknown_slice: UnknownSlice::Deny,
            holds: false,
            hold_ttl_ms: 0,
            response_headers: false,
        }
    }
}

/// The schools a domain may charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schools {
    Any,
    Only(BTreeSet<SchoolId>),
}

impl Schools {
    pub fn allows(&self, school: &SchoolId) -> bool {
        match self {
            Self::Any => true,
            Self::Only(schools) => schools.contains(school),
        }
    }
}

/// A checked domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub schools: Schools,
    pub school_key: String,
    pub teacher_key: String,
    pub service_key: String,
    pub service_type: Option<ServiceType>,
    /// None: the domain's descriptors carry no event id.
    pub event_key: Option<String>,
    pub model_key: Option<String>,
    pub phase_key: Option<String>,
    pub unknown_slice: UnknownSlice,
    pub holds: bool,
    pub hold_ttl_ms: u64,
    pub response_headers: bool,
}

/// Every domain, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domains(BTreeMap<String, Domain>);

impl Domains {
    /// Checks the tables; under `insecure_dev` a domain `quotad` that may
    /// charge any school is added when none is configured.
    pub fn new(
        tables: &[DomainConfig],
        insecure_dev: bool,
        hold_ttl_ms_max: u64,
    ) -> Result<Self, InvalidInput> {
        let mut domains = BTreeMap::new();
        for table in tables {
            let domain = Domain::new(table, hold_ttl_ms_max)?;
            if domains.insert(domain.name.clone(), domain).is_some() {
                return Err(InvalidInput::new(
                    "rls_domains",
                    format!("the domain {:?} is configured twice", table.name),
                ));
            }
        }
        if insecure_dev && !domains.contains_key(DEV_DOMAIN) {
            let dev = DomainConfig {
                schools: vec!["*".into()],
                ..DomainConfig::default()
            };
            domains.insert(DEV_DOMAIN.into(), Domain::new(&dev, hold_ttl_ms_max)?);
        }
        Ok(Self(domains))
    }

    pub fn get(&self, name: &str) -> Option<&Domain> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Domain names are metric labels and log fields: short and plain (`/`
/// too, for Envoy Gateway's `<namespace>/<gateway>/<listener>`).
const DOMAIN_NAME_BYTES_MAX: usize = 64;

impl Domain {
    fn new(table: &DomainConfig, hold_ttl_ms_max: u64) -> Result<Self, InvalidInput> {
        let problem = |what: String| {
            InvalidInput::new("rls_domains", format!("domain {:?}: {what}", table.name))
        };
        let name_ok = !table.name.is_empty()
            && table.name.len() <= DOMAIN_NAME_BYTES_MAX
            && table
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
        if !name_ok {
            return Err(problem(format!(
                "name must be 1-{DOMAIN_NAME_BYTES_MAX} bytes of letters, digits and _ - . : /"
            )));
        }
        let schools = match table.schools.as_slice() {
            [] => {
                return Err(problem(
                    "schools is empty: name the schools it may charge, or [\"*\"] for any".into(),
                ))
            }
            [any] if any == "*" => Schools::Any,
            names => Schools::Only(
                names
                    .iter()
                    .map(|name| SchoolId::parse(name).map_err(|e| problem(format!("schools: {e}"))))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let service_type = table
            .service_type
            .as_deref()
            .map(ServiceType::parse)
            .transpose()
            .map_err(|e| problem(format!("service_type: {e}")))?;
        let optional = |key: &str| (!key.is_empty()).then(|| key.to_string());
        let mut keys = vec![
            ("school_key", table.school_key.as_str()),
            ("teacher_key", table.teacher_key.as_str()),
        ];
        if service_type.is_none() {
            keys.push(("service_key", table.service_key.as_str()));
        }
        for (setting, key) in &keys {
            if key.is_empty() {
                return Err(problem(format!("{setting} must not be empty")));
            }
        }
        for (setting, key) in [
            ("event_key", &table.event_key),
            ("model_key", &table.model_key),
            ("phase_key", &table.phase_key),
        ] {
            if !key.is_empty() {
                keys.push((setting, key));
            }
        }
        let distinct: BTreeSet<&str> = keys.iter().map(|(_, key)| *key).collect();
        if distinct.len() != keys.len() {
            return Err(problem("its descriptor keys must all differ".into()));
        }
        if table.holds && table.event_key.is_empty() {
            return Err(problem(
                "holds = true needs an event_key: the stream-done call finds its hold by the \
                 event id"
                    .into(),
            ));
        }
        if table.hold_ttl_ms > hold_ttl_ms_max {
            return Err(problem(format!(
                "hold_ttl_ms is {}; a hold may live at most {hold_ttl_ms_max} ms",
                table.hold_ttl_ms
            )));
        }
        Ok(Self {
            name: table.name.clone(),
            schools,
            school_key: table.school_key.clone(),
            teacher_key: table.teacher_key.clone(),
            service_key: table.service_key.clone(),
            service_type,
            event_key: optional(&table.event_key),
            model_key: optional(&table.model_key),
            phase_key: optional(&table.phase_key),
            unknown_slice: table.unknown_slice,
            holds: table.holds,
            hold_ttl_ms: table.hold_ttl_ms,
            response_headers: table.response_headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, schools: &[&str]) -> DomainConfig {
        DomainConfig {
            name: name.into(),
            schools: schools.iter().map(|s| s.to_string()).collect(),
            ..DomainConfig::default()
        }
    }

    #[test]
    fn insecure_dev_adds_the_default_domain_for_any_school() {
        let domains = Domains::new(&[], true, 60_000).unwrap();
        let dev = domains.get(DEV_DOMAIN).unwrap();
        assert_eq!(dev.schools, Schools::Any);
        assert_eq!(
            (
                dev.school_key.as_str(),
                dev.teacher_key.as_str(),
                dev.service_key.as_str()
            ),
            ("school_id", "teacher_id", "service_type")
        );
        assert_eq!(dev.event_key.as_deref(), Some("event_id"));
        assert_eq!(dev.unknown_slice, UnknownSlice::Deny);
        assert!(Domains::new(&[], false, 60_000).unwrap().is_empty());
        // A configured `quotad` domain is kept as written, even under dev.
        let own = Domains::new(&[table(DEV_DOMAIN, &["oak"])], true, 60_000).unwrap();
        assert!(!own
            .get(DEV_DOMAIN)
            .unwrap()
            .schools
            .allows(&SchoolId::parse("elm").unwrap()));
    }

    #[test]
    fn a_domain_names_its_schools() {
        let domains = Domains::new(&[table("gw", &["oak", "elm"])], false, 60_000).unwrap();
        let generated = Domains::new(&[table("infra/eg/http", &["*"])], false, 60_000).unwrap();
        assert!(
            generated.get("infra/eg/http").is_some(),
            "Envoy Gateway's names"
        );
        let gw = domains.get("gw").unwrap();
        assert!(gw.schools.allows(&SchoolId::parse("oak").unwrap()));
        assert!(!gw.schools.allows(&SchoolId::parse("ash").unwrap()));
        for bad in [table("gw", &[]), table("gw", &["Not Valid"])] {
            let error = Domains::new(&[bad], false, 60_000).unwrap_err();
            assert!(error.problem.contains("schools"), "{error}");
        }
    }

    #[test]
    fn bad_domains_are_refused_with_what_is_wrong() {
        let cases: Vec<(DomainConfig, &str)> = vec![
            (table("", &["*"]), "name"),
            (table("has space", &["*"]), "name"),
            (
                DomainConfig {
                    teacher_key: "school_id".into(),
                    ..table("gw", &["*"])
                },
                "differ",
            ),
            (
                DomainConfig {
                    school_key: String::new(),
                    ..table("gw", &["*"])
                },
                "school_key",
            ),
            (
                DomainConfig {
                    service_type: Some("Bad Type".into()),
                    ..table("gw", &["*"])
                },
                "service_type",
            ),
            (
                DomainConfig {
                    hold_ttl_ms: 60_001,
                    ..table("gw", &["*"])
                },
                "hold_ttl_ms",
            ),
            (
                DomainConfig {
                    holds: true,
                    event_key: String::new(),
                    ..table("gw", &["*"])
                },
                "needs an event_key",
            ),
        ];
        for (bad, says) in cases {
            let error = Domains::new(std::slice::from_ref(&bad), false, 60_000).unwrap_err();
            assert!(error.to_string().contains(says), "{bad:?}: {error}");
        }
        let twice = Domains::new(&[table("gw", &["*"]), table("gw", &["*"])], false, 60_000);
        assert!(twice.unwrap_err().problem.contains("twice"));
    }

    #[test]
    fn a_fixed_service_type_frees_the_service_key_and_empty_keys_turn_off() {
        let fixed = DomainConfig {
            service_type: Some("chat".into()),
            service_key: String::new(),
            event_key: String::new(),
            ..table("gw", &["*"])
        };
        let domains = Domains::new(&[fixed], false, 60_000).unwrap();
        let gw = domains.get("gw").unwrap();
        assert_eq!(gw.service_type, Some(ServiceType::parse("chat").unwrap()));
        assert_eq!(gw.event_key, None);
    }

    #[test]
    fn tables_are_read_from_toml_with_their_defaults() {
        let text = "name = \"gw\"\nschools = [\"oak\"]\nunknown_slice = \"allow\"\nholds = true\n";
        let table: DomainConfig = toml::from_str(text).unwrap();
        assert_eq!(table.unknown_slice, UnknownSlice::Allow);
        assert!(table.holds);
        assert_eq!(table.event_key, "event_id");
        assert!(toml::from_str::<DomainConfig>("nmae = \"gw\"\n").is_err());
        assert!(toml::from_str::<DomainConfig>("unknown_slice = \"maybe\"\n").is_err());
    }
}
