//! How the config holds a secret: read from an environment variable or a file (never printed), or, in `demo`
//! only, written inline.

use std::fmt;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where secrets may come from: `demo` builds its config in code with an inline secret; files may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretPolicy {
    InlineAllowed,
    ExternalOnly,
}

/// A secret as a variable or a file holds it, trailing newline and spaces trimmed; `None` if that leaves nothing.
pub(super) fn trimmed_secret(value: &str) -> Option<SecretString> {
    let value = value.trim();
    (!value.is_empty()).then(|| SecretString::from(value.to_owned()))
}

/// A secret written in the config file: deserializes from a string, serializes and prints as `<redacted>`.
#[derive(Clone)]
pub struct InlineSecret(pub SecretString);

impl fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for InlineSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| InlineSecret(SecretString::from(s)))
    }
}

impl Serialize for InlineSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}
