//! Damage to an encoding: what a flipped bit, a torn write, a lost or a
//! repeated piece of a message or a record does to its bytes.

use proptest::prelude::*;
use proptest::sample::Index;

/// One change to an encoding, at a position picked as a fraction of its length.
#[derive(Debug, Clone)]
pub enum Damage {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, Index),
    Duplicate(Index, Index),
}

/// Any one [`Damage`].
pub fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Damage::FlipBit(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Damage::SetByte(at, byte)),
        any::<Index>().prop_map(Damage::Truncate),
        (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(at, bytes)| Damage::Insert(at, bytes)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::Remove(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::Duplicate(a, b)),
    ]
}

/// Applies `damage` to `bytes`; positions are fractions of their length, so
/// any damage applies to any encoding (a flip of nothing changes nothing).
pub fn apply(damage: &Damage, bytes: &mut Vec<u8>) {
    let len = bytes.len();
    let range = |a: &Index, b: &Index| {
        let (a, b) = (a.index(len + 1), b.index(len + 1));
        a.min(b)..a.max(b)
    };
    match damage {
        Damage::FlipBit(at, bit) if len > 0 => bytes[at.index(len)] ^= 1 << bit,
        Damage::SetByte(at, byte) if len > 0 => bytes[at.index(len)] = *byte,
        Damage::Truncate(at) => bytes.truncate(at.index(len + 1)),
        Damage::Insert(at, new) => {
            let at = at.index(len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Damage::Remove(a, b) => {
            bytes.drain(range(a, b));
        }
        Damage::Duplicate(a, b) => {
            let copy = bytes[range(a, b)].to_vec();
            bytes.extend(copy);
        }
        Damage::FlipBit(..) | Damage::SetByte(..) => {}
    }
}
