//! Validated identifiers. Everything a client sends is checked here once, at
//! the edge, so the rest of the code can trust these types.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::InvalidInput;

/// Longest school, teacher, event or reservation id, in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Longest service type name, in bytes.
pub const SERVICE_TYPE_BYTES_MAX: usize = 64;
/// Longest model name kept with a usage, in bytes.
pub const MODEL_BYTES_MAX: usize = 128;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(InvalidInput::new(
            field,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $allowed:expr, $allowed_text:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `value` and wraps it.
            pub fn parse(value: &str) -> Result<Self, InvalidInput> {
                check_len($field, value, $max)?;
                if let Some(bad) = value.chars().find(|c| !$allowed(*c)) {
                    return Err(InvalidInput::new(
                        $field,
                        format!("contains {bad:?}; only {} are allowed", $allowed_text),
                    ));
                }
                Ok(Self(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

name_type!(
    /// A school (or an individual user's school of one).
    SchoolId, "school_id", ID_BYTES_MAX, is_name_char, "letters, digits and _ - . : @"
);
name_type!(
    /// A teacher within a school.
    TeacherId, "teacher_id", ID_BYTES_MAX, is_name_char, "letters, digits and _ - . : @"
);
name_type!(
    /// A kind of AI usage sold as a pool, e.g. `lesson_generation`.
    ServiceType, "service_type", SERVICE_TYPE_BYTES_MAX,
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_',
    "lowercase letters, digits and _"
);

/// A client's id for one usage event: the idempotency key of a consume.
/// Any bytes but control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct EventId(Arc<str>);

/// A client's id for one reservation: the idempotency key of a hold.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct ReservationId(Arc<str>);

fn check_opaque_id(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    check_len(field, value, ID_BYTES_MAX)?;
    if value.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl EventId {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        check_opaque_id("event_id", value)?;
        Ok(Self(Arc::from(value)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ReservationId {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        check_opaque_id("reservation_id", value)?;
        Ok(Self(Arc::from(value)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The AI model a usage was made with; free text, may be empty.
pub fn parse_model_field(value: &str) -> Result<Arc<str>, InvalidInput> {
    if value.len() > MODEL_BYTES_MAX {
        return Err(InvalidInput::new(
            "model",
            format!(
                "is {} bytes long; at most {MODEL_BYTES_MAX} are allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            "model",
            "must not contain control characters",
        ));
    }
    Ok(Arc::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_types_are_lowercase_words() {
        assert!(ServiceType::parse("lesson_generation").is_ok());
        assert!(ServiceType::parse("a").is_ok());
        assert!(ServiceType::parse(&"a".repeat(64)).is_ok());
        assert_eq!(ServiceType::parse("").unwrap_err().field, "service_type");
        assert!(ServiceType::parse(&"a".repeat(65)).is_err());
        assert!(ServiceType::parse("Lesson").is_err());
        assert!(ServiceType::parse("lesson-generation").is_err());
        assert!(ServiceType::parse("lesson generation").is_err());
    }

    #[test]
    fn ids_reject_empty_long_and_odd_characters() {
        assert!(SchoolId::parse("school-1").is_ok());
        assert!(TeacherId::parse("t@example.org").is_ok());
        assert!(SchoolId::parse("").is_err());
        assert!(TeacherId::parse(&"x".repeat(129)).is_err());
        assert!(TeacherId::parse("a b").is_err());
        assert!(EventId::parse(&"é".repeat(64)).is_ok());
        assert!(EventId::parse(&"é".repeat(65)).is_err());
        assert!(EventId::parse("a\nb").is_err());
        assert!(ReservationId::parse("").is_err());
        assert!(parse_model_field("").is_ok());
        assert!(parse_model_field(&"m".repeat(129)).is_err());
    }
}
