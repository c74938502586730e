//! Durations in the config: read as humantime reads them (`"1500ms"`, `"1s 500ms"`), printed by
//! [`format_duration`] in the largest unit that holds them whole, or as the sources wrote them (`as_written`).

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
            Some(d) => s.serialize_some(&crate::config::duration::format_duration(*d)),
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

/// Where the effective config holds a duration the sources wrote too, it takes the sources' spelling ("1500ms"
/// rather than "1s 500ms"). Only durations: a value is replaced only if both read as the same duration, so no
/// redacted value can come back.
pub(super) fn as_written(effective: &mut toml::Value, written: &toml::Value) {
    match (effective, written) {
        (toml::Value::Table(table), toml::Value::Table(sources)) => {
            for (key, value) in table.iter_mut() {
                if let Some(source) = sources.get(key) {
                    as_written(value, source);
                }
            }
        }
        (toml::Value::Array(items), toml::Value::Array(sources)) => {
            for (item, source) in items.iter_mut().zip(sources) {
                as_written(item, source);
            }
        }
        (toml::Value::String(shown), toml::Value::String(source)) => {
            let same = humantime::parse_duration(shown).ok().zip(humantime::parse_duration(source).ok());
            if same.is_some_and(|(a, b)| a == b) {
                *shown = source.clone();
            }
        }
        _ => {}
    }
}
