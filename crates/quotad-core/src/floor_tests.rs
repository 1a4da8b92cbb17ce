//! The rules on a slice's size that the engine once wrote itself: the floor
//! a slice may not shrink below, an individual's slice that is its whole
//! pool, and the one refusal for a service type a school lacks.

use super::tests::{service, teacher, SCHOOL};
use super::*;

fn school_id() -> SchoolId {
    SchoolId::parse(SCHOOL).unwrap()
}

/// A teacher with one slice of 100 units that used 30 and holds 20.
fn account_using_30_holding_20() -> TeacherAccount {
    let mut account = TeacherAccount::new(
        school_id(),
        teacher("t1"),
        BillingAnchor::new(1).unwrap(),
        0,
    );
    let slice = Slice {
        allocated_units: 100,
        used_units: 30,
        reserved_units: 20,
        borrowed_units: 7,
        ..Slice::default()
    };
    account.slices.insert(service(), slice);
    account
}

#[test]
fn the_floor_is_what_was_used_from_the_slice_and_is_held_not_what_was_borrowed() {
    let account = account_using_30_holding_20();
    assert_eq!(account.slices[&service()].floor_units(), 50);
    assert_eq!(account.floors(), [(service(), 50)].into_iter().collect());
}

#[test]
fn a_slice_shrinks_to_its_floor_and_no_further() {
    let account = account_using_30_holding_20();
    assert_eq!(account.check_shrink(&service(), 50), Ok(()));
    assert_eq!(account.check_shrink(&service(), 500), Ok(()));
    let refused = account.check_shrink(&service(), 49).unwrap_err();
    assert!(matches!(refused, RuleError::Precondition(_)), "{refused:?}");
    assert_eq!(
        refused.to_string(),
        "teacher t1 has used 30 and holds 20 units of claude_messages this cycle; the slice cannot shrink below 50"
    );
    // A slice that does not exist yet has no floor.
    let other = ServiceType::parse("openai_chat").unwrap();
    assert_eq!(account.check_shrink(&other, 0), Ok(()));
}

#[test]
fn a_bulk_entry_below_its_floor_refuses_the_whole_change_and_names_the_entry() {
    let entry = SliceSet {
        teacher_id: teacher("t1"),
        service: service(),
        allocated_units: 49,
        priority: Priority::Normal,
        auto_renew: true,
    };
    assert_eq!(check_bulk_floor(3, &entry, 49), Ok(()));
    let refused = check_bulk_floor(3, &entry, 50).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "nothing was changed: the slice of teacher t1 of claude_messages cannot shrink below 50 units (what was used and is held of it this cycle, or its units now if fewer); entry 3 asks for 49"
    );
}

/// A slice that ran over (late usage charged as overage) may keep its units
/// or grow, still below what was used; only shrinking it is refused.
#[test]
fn a_slice_used_past_its_units_may_keep_or_grow_them_but_not_shrink() {
    let mut account = account_using_30_holding_20();
    let slice = account.slices.get_mut(&service()).unwrap();
    slice.allocated_units = 10;
    slice.used_units = 40;
    slice.overage_units = 30;
    slice.reserved_units = 0;
    assert_eq!(account.slices[&service()].lowest_allowed_units(), 10);
    assert_eq!(account.floors(), [(service(), 10)].into_iter().collect());
    assert_eq!(account.check_shrink(&service(), 10), Ok(()));
    assert_eq!(account.check_shrink(&service(), 11), Ok(()));
    let refused = account.check_shrink(&service(), 9).unwrap_err();
    assert!(
        refused
            .to_string()
            .ends_with("the slice cannot shrink below 10"),
        "{refused}"
    );
}

#[test]
fn an_individual_is_owned_by_the_teacher_with_its_id_and_no_other_tier_is() {
    let id = SchoolId::parse("alice").unwrap();
    assert_eq!(
        individual_owner(Tier::Individual, &id),
        Some(teacher("alice"))
    );
    assert_eq!(individual_owner(Tier::K12, &id), None);
    assert_eq!(individual_owner(Tier::Preschool, &id), None);
}

#[test]
fn an_individuals_slice_is_the_whole_pool_and_moves_so_that_it_always_fits() {
    let terms = owner_slice_terms(250);
    assert_eq!(terms.allocated_units, 250);
    assert!(terms.auto_renew);
    assert_eq!(terms.priority, Priority::Normal);
    assert_eq!(terms.status, SliceStatus::Active);
    // Shrinking: the slice first, so it never exceeds the pool.
    assert_eq!(owner_slice_order(100, 99), OwnerSliceOrder::SliceThenPool);
    assert_eq!(owner_slice_order(100, 0), OwnerSliceOrder::SliceThenPool);
    // Growing or the same: the pool first, so the slice fits when it grows.
    assert_eq!(owner_slice_order(100, 101), OwnerSliceOrder::PoolThenSlice);
    assert_eq!(owner_slice_order(100, 100), OwnerSliceOrder::PoolThenSlice);
}

#[test]
fn a_service_type_the_school_lacks_is_not_found_naming_both() {
    let refused = service_not_configured(&school_id(), &service());
    assert!(matches!(refused, RuleError::NotFound(_)), "{refused:?}");
    assert_eq!(
        refused.to_string(),
        "service type claude_messages is not configured for school school-1"
    );
}
