//! Durations in the config: read as humantime reads them (`"1500ms"`, `"1s 500ms"`), printed by
//! [`format_duration`] in the largest unit that holds them whole.

use std::time::Duration;

use serde::Serializer;

pub use humantime_serde::deserialize;

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

pub mod option {
    use std::time::Duration;

    use serde::Serializer;

    pub use humantime_serde::deserialize;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

/// How the config prints a duration, everywhere: in the largest unit that holds it whole (`1500ms`, `5m`, `7d`),
/// as the configuration reference writes defaults; humantime reads each back.
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let (unit, size) =
        UNITS.iter().find(|(_, size)| nanos.is_multiple_of(*size)).expect("a whole number of nanoseconds");
    format!("{}{unit}", nanos / size)
}
