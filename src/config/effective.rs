//! The effective config, as `check-config` prints it: every default filled in, secrets redacted (each secret's
//! own type serializes as `<redacted>`), and durations spelt as the sources wrote them.

use std::fmt;

use super::Config;

/// The values a config was read from, kept only to print durations as written; never printed themselves.
#[derive(Clone, Default)]
pub struct Written(Option<toml::Value>);

impl fmt::Debug for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Written(..)")
    }
}

impl Written {
    pub(super) fn new(values: toml::Value) -> Written {
        Written(Some(values))
    }
}

impl Config {
    /// The effective config as TOML, with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut effective = toml::Value::try_from(self).expect("config serializes to TOML");
        if let Some(written) = &self.written.0 {
            durations_as_written(&mut effective, written);
        }
        toml::to_string_pretty(&effective).expect("config serializes to TOML")
    }
}

/// Where the effective config holds a duration the sources wrote too, it takes the sources' spelling ("1500ms"
/// rather than "1s 500ms"). Only durations: a value is replaced only if both read as the same duration, so no
/// redacted value can come back.
fn durations_as_written(effective: &mut toml::Value, written: &toml::Value) {
    match (effective, written) {
        (toml::Value::Table(table), toml::Value::Table(sources)) => {
            for (key, value) in table.iter_mut() {
                if let Some(source) = sources.get(key) {
                    durations_as_written(value, source);
                }
            }
        }
        (toml::Value::Array(items), toml::Value::Array(sources)) => {
            for (item, source) in items.iter_mut().zip(sources) {
                durations_as_written(item, source);
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
