//! What each role may do: [`authorize`] decides from the caller's role and
//! schools alone, so a refusal never tells whether another school's or
//! teacher's data exists.

use std::fmt;

use quotad_core::{SchoolId, TeacherId};

use super::token::{Caller, Role};

macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Every RPC of the service, to authorize.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Action {
            $($(#[$doc])* $name,)*
        }

        impl Action {
            /// Every action, in proto order (generated, so none is forgotten).
            pub const ALL: &'static [Action] = &[$(Action::$name,)*];

            /// The RPC's name, as in the proto.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Action::$name => stringify!($name),)*
                }
            }
        }
    };
}

actions! {
    // QuotaGate
    Consume,
    Check,
    Reserve,
    Commit,
    Release,
    GetUsage,
    SyncUsage,
    BulkIncrement,
    // QuotaAdmin
    CreateSchool,
    GetSchool,
    ListSchools,
    UpdateSchoolSettings,
    SetPool,
    SetAllocation,
    BulkSetAllocations,
    RemoveAllocation,
    SetAllocationStatus,
    ListAllocations,
    RequestIncrease,
    ApproveRequest,
    RejectRequest,
    ListRequests,
    ListHistory,
    VerifyHistory,
    GetUsageReport,
    GetUsageRollups,
    GetSuggestions,
    ListAlerts,
}

impl Action {
    /// The gate calls that meter usage: the service role's job alone.
    fn meters_usage(self) -> bool {
        matches!(
            self,
            Action::Consume
                | Action::Check
                | Action::Reserve
                | Action::Commit
                | Action::Release
                | Action::SyncUsage
                | Action::BulkIncrement
        )
    }

    fn is_gate(self) -> bool {
        self.meters_usage() || self == Action::GetUsage
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller may not do this. The reason says what the caller's role may do,
/// never what exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action} is not allowed: {reason}")]
pub struct Denied {
    pub action: Action,
    pub reason: &'static str,
}

/// Whether `caller` may do `action` on `school` (and, for calls about one
/// teacher, `teacher`). For list calls whose teacher filter is optional, pass
/// the filter: `None` means every teacher. For calls not about one school
/// (`ListSchools`), `school` is not looked at: only an admin may make them.
/// For calls that span every school (`CreateSchool` of a new id is checked
/// with [`authorize`]; `ListSchools` here): only an admin may make them.
pub fn authorize_global(caller: &Caller, action: Action) -> Result<(), Denied> {
    match caller.role {
        Role::Admin => Ok(()),
        _ => Err(Denied {
            action,
            reason: "only an admin may list every school",
        }),
    }
}

pub fn authorize(
    caller: &Caller,
    action: Action,
    school: &SchoolId,
    teacher: Option<&TeacherId>,
) -> Result<(), Denied> {
    let refusal = match caller.role {
        Role::Admin => None,
        Role::Principal => principal_refusal(caller, action, school),
        Role::Teacher => teacher_refusal(caller, action, school, teacher),
        Role::Service => service_refusal(caller, action, school),
    };
    match refusal {
        None => Ok(()),
        Some(reason) => Err(Denied { action, reason }),
    }
}

fn principal_refusal(caller: &Caller, action: Action, school: &SchoolId) -> Option<&'static str> {
    if matches!(action, Action::CreateSchool | Action::ListSchools) {
        return Some("only an admin may create or list schools");
    }
    if action.meters_usage() {
        return Some(
            "a principal may not consume, check, reserve, commit, release or sync units; \
             only the service role may",
        );
    }
    if !caller.names_school(school) {
        return Some("a principal may only act on their own school");
    }
    None
}

fn teacher_refusal(
    caller: &Caller,
    action: Action,
    school: &SchoolId,
    teacher: Option<&TeacherId>,
) -> Option<&'static str> {
    let reason = match action {
        Action::GetUsage | Action::GetUsageReport | Action::GetUsageRollups => {
            "a teacher may only read their own usage"
        }
        Action::ListAllocations => "a teacher may only read their own allocations",
        Action::RequestIncrease => "a teacher may only request increases for themselves",
        Action::ListRequests => "a teacher may only list their own requests",
        Action::ListHistory => "a teacher may only read their own history",
        _ => {
            return Some(
                "a teacher may only read their own usage, allocations, requests and history, \
                 and request increases",
            )
        }
    };
    let own = caller.names_school(school) && caller.is_teacher(teacher);
    (!own).then_some(reason)
}

fn service_refusal(caller: &Caller, action: Action, school: &SchoolId) -> Option<&'static str> {
    if !action.is_gate() {
        return Some(
            "the service role may only call the quota gate: \
             Consume, Check, Reserve, Commit, Release, SyncUsage, BulkIncrement and GetUsage",
        );
    }
    if !caller.names_school(school) {
        return Some("the service role may only act for the schools its token names");
    }
    None
}
