//! A deserializer over TOML values whose errors are typed: reading a config decides what to do about a value that
//! does not fit its key (read an override again by its key's type, set a table aside for a missing key) by what
//! went wrong, not by reading serde's message back. The message is kept, word for word, for the problem's line.

use std::fmt;

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, Expected, IntoDeserializer, Unexpected, Visitor};

/// Why a value did not fit its key, and serde's message for it.
#[derive(Debug)]
pub(super) struct Misfit {
    pub kind: MisfitKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MisfitKind {
    /// A required key is absent.
    MissingField(&'static str),
    /// A string where the key takes another type (an override is always a string).
    StringOfAnotherType,
    /// Anything else: another wrong type, a value out of range, an unknown key.
    Other,
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Misfit {}

impl de::Error for Misfit {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Misfit { kind: MisfitKind::Other, message: message.to_string() }
    }

    fn invalid_type(found: Unexpected, expected: &dyn Expected) -> Self {
        let kind = match found {
            Unexpected::Str(_) => MisfitKind::StringOfAnotherType,
            _ => MisfitKind::Other,
        };
        Misfit { kind, message: format!("invalid type: {found}, expected {expected}") }
    }

    fn missing_field(field: &'static str) -> Self {
        Misfit { kind: MisfitKind::MissingField(field), message: format!("missing field `{field}`") }
    }
}

/// A TOML value to deserialize, as `toml::Value` deserializes itself but with [`Misfit`] errors.
pub(super) struct Strict(pub toml::Value);

impl<'de> de::Deserializer<'de> for Strict {
    type Error = Misfit;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        match self.0 {
            toml::Value::String(s) => visitor.visit_string(s),
            toml::Value::Integer(n) => visitor.visit_i64(n),
            toml::Value::Float(x) => visitor.visit_f64(x),
            toml::Value::Boolean(b) => visitor.visit_bool(b),
            // No key takes a date-time: toml's own reading says how it does not fit.
            datetime @ toml::Value::Datetime(_) => {
                datetime.deserialize_any(visitor).map_err(|e| de::Error::custom(e.message()))
            }
            toml::Value::Array(items) => {
                let mut items = SeqDeserializer::new(items.into_iter().map(Strict));
                let value = visitor.visit_seq(&mut items)?;
                items.end()?;
                Ok(value)
            }
            toml::Value::Table(table) => {
                let mut entries = MapDeserializer::new(table.into_iter().map(|(key, value)| (key, Strict(value))));
                let value = visitor.visit_map(&mut entries)?;
                entries.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &str, visitor: V) -> Result<V::Value, Misfit> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        match self.0 {
            toml::Value::String(variant) => visitor.visit_enum(variant.into_deserializer()),
            other => Strict(other).deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq
        tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de, Misfit> for Strict {
    type Deserializer = Strict;

    fn into_deserializer(self) -> Strict {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::num::NonZeroU32;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        count: u32,
        ratio: f64,
        on: bool,
        nonzero: NonZeroU32,
        mode: Mode,
        list: Vec<u8>,
        addr: SocketAddr,
        #[serde(default)]
        maybe: Option<u8>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Local,
    }

    const VALID: &str = "count = 1\nratio = 0.5\non = true\nnonzero = 1\nmode = \"local\"\nlist = [1]\n\
                         addr = \"127.0.0.1:1\"\nmaybe = 2\n";

    /// `VALID` with `change` written over it (a key set, or `-key` removed), read by toml and by `Strict`.
    fn both(change: &str) -> (Result<Sample, toml::de::Error>, Result<Sample, Misfit>) {
        let mut table: toml::Table = toml::from_str(VALID).unwrap();
        match change.strip_prefix('-') {
            Some(key) => drop(table.remove(key)),
            None => table.extend(toml::from_str::<toml::Table>(change).unwrap()),
        }
        let value = toml::Value::Table(table);
        (value.clone().try_into(), Sample::deserialize(Strict(value)))
    }

    #[test]
    fn a_misfit_is_typed_and_words_it_as_toml_does() {
        let (toml, strict) = both("");
        assert!(toml.is_ok() && strict.is_ok(), "{strict:?}");
        for (change, kind) in [
            ("count = \"2\"", MisfitKind::StringOfAnotherType),
            ("on = \"no\"", MisfitKind::StringOfAnotherType),
            ("count = 2.5", MisfitKind::Other),
            ("ratio = \"0.5\"", MisfitKind::StringOfAnotherType),
            ("nonzero = 0", MisfitKind::Other),
            ("mode = \"redis\"", MisfitKind::Other),
            ("list = [300]", MisfitKind::Other),
            ("addr = \"localhost\"", MisfitKind::Other),
            ("maybe = \"2\"", MisfitKind::StringOfAnotherType),
            ("extra = 1", MisfitKind::Other),
            ("-count", MisfitKind::MissingField("count")),
        ] {
            let (toml, strict) = both(change);
            let (toml, strict) = (toml.unwrap_err(), strict.unwrap_err());
            assert_eq!(strict.kind, kind, "{change}: {strict}");
            assert_eq!(strict.message, toml.message(), "{change}");
        }
    }
}
