//! Reading a config: the TOML file, the `EASEMOB_GW__…` overrides, and strict typing. Every value that does not
//! fit its key is reported on its own line, naming the key (or the variable), and its default stands in for it so
//! that the sections' own checks (`Config::problems`) still run. Nothing here knows the sections.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::duration::format_duration;
use super::strict::{MisfitKind, Strict};

/// Environment variables with this prefix override file keys: `EASEMOB_GW__UPSTREAM__BASE_URL`.
pub const ENV_PREFIX: &str = "EASEMOB_GW";
const ENV_SEPARATOR: &str = "__";

/// Reads `path` (TOML), applies the `EASEMOB_GW__…` overrides among `env` and deserializes a `T`, strictly: a value
/// of another TOML type than its key's is a problem (a float is no integer, a string no number or boolean), and an
/// override is read by its key's type. Every such problem is reported, naming its key (or, for an override, the
/// variable); the key's default stands in for it, so that the sections' checks still run. A key among `moved` (old
/// key, where it went) is refused with a line naming its new place. Gives the `T` (none when a required key did
/// not fit) with the values it was read from, and the problems, one line each.
pub(super) fn strictly<T: DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    moved: &[(&str, &str)],
) -> (Option<(T, toml::Value)>, Vec<String>) {
    let file = path.display().to_string();
    let failed = |problem| (None, vec![problem]);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return failed(format!("{file}: {e}")),
    };
    if let Err(e) = toml::from_str::<toml::Table>(&text) {
        return failed(format!("{file}: {}", toml_problem(&text, &e)));
    }
    let env: config::Map<String, String> = env.into_iter().collect();
    let merged = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(config::Environment::with_prefix(ENV_PREFIX).separator(ENV_SEPARATOR).source(Some(env.clone())))
        .build()
        .and_then(|source| source.try_deserialize::<config::Value>());
    let mut values = match merged {
        Ok(merged) => as_toml(merged).unwrap_or_else(|| toml::Value::Table(toml::Table::new())),
        Err(e) => return failed(format!("{file}: {}", one_line(&e.to_string()))),
    };
    let mut problems = Vec::new();
    let mut set_aside_keys = Vec::new();
    let config = loop {
        let error = match serde_path_to_error::deserialize::<_, T>(Strict(values.clone())) {
            Ok(config) => break Some(config),
            Err(error) => error,
        };
        let key = error.path().to_string();
        // The message alone: the error's `Display` adds the key, which the problem names itself.
        let misfit = error.into_inner();
        let (kind, message) = match moved.iter().find(|(old, _)| *old == key) {
            Some((_, new)) => (MisfitKind::Other, format!("moved: set {new}")),
            None => (misfit.kind, one_line(&misfit.message)),
        };
        let var = override_of(&key, &env);
        if var.is_some() && kind == MisfitKind::StringOfAnotherType && retype_override(&mut values, &key) {
            continue;
        }
        if let MisfitKind::MissingField(field) = kind {
            // A required key set aside has been reported already.
            let missing = if key == "." { field.to_owned() } else { format!("{key}.{field}") };
            if !set_aside_keys.contains(&missing) {
                problems.push(located(&file, &key, None, &message));
            }
            // Without a required key its table cannot be built: the table is set aside in turn (its default,
            // or an `[[apps]]` entry fewer, stands in) so that the other keys are still checked.
            if key == "." || !set_aside(&mut values, &key) {
                break None;
            }
            set_aside_keys.push(key);
            continue;
        }
        let found = value_at(&mut values, &steps(&key)).cloned();
        let what = found.and_then(|found| type_problem(&message, &key, var.as_deref(), &found));
        problems.push(located(&file, &key, var.as_deref(), &what.unwrap_or(message)));
        if !set_aside(&mut values, &key) {
            break None;
        }
        set_aside_keys.push(key);
    };
    (config.map(|config| (config, values)), problems)
}

/// A TOML syntax error with its line and the text it is about (`duplicate key` names the key).
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return one_line(e.message()) };
    let line = text[..span.start].matches('\n').count() + 1;
    let at = text.get(span).map(str::trim).filter(|t| !t.is_empty() && t.len() <= 80);
    match at {
        Some(at) => format!("line {line}: {} (at `{at}`)", one_line(e.message())),
        None => format!("line {line}: {}", one_line(e.message())),
    }
}

/// The `EASEMOB_GW__…` variable that set `key` (`upstream.timeout`), if `env` has one.
fn override_of(key: &str, env: &config::Map<String, String>) -> Option<String> {
    let var = format!("{ENV_PREFIX}{ENV_SEPARATOR}{}", key.to_ascii_uppercase().replace('.', ENV_SEPARATOR));
    env.contains_key(&var).then_some(var)
}

/// The merged values as TOML: the file's values keep their TOML types, and an override is the string the
/// environment holds (see `retype_override`). Nothing is coerced.
fn as_toml(value: config::Value) -> Option<toml::Value> {
    use config::ValueKind;
    Some(match value.kind {
        ValueKind::Nil => return None,
        ValueKind::Boolean(b) => toml::Value::Boolean(b),
        ValueKind::I64(n) => toml::Value::Integer(n),
        ValueKind::I128(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::U64(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::U128(n) => toml::Value::Integer(i64::try_from(n).ok()?),
        ValueKind::Float(x) => toml::Value::Float(x),
        ValueKind::String(s) => toml::Value::String(s),
        ValueKind::Table(table) => {
            toml::Value::Table(table.into_iter().filter_map(|(k, v)| Some((k, as_toml(v)?))).collect())
        }
        ValueKind::Array(items) => toml::Value::Array(items.into_iter().filter_map(as_toml).collect()),
    })
}

/// One step of a key as serde_path_to_error names it: `apps[0].client_id` is `apps`, `[0]`, `client_id`.
enum Step<'k> {
    Key(&'k str),
    Index(usize),
}

fn steps(key: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        steps.extend(pieces.next().filter(|name| !name.is_empty()).map(Step::Key));
        steps.extend(pieces.filter_map(|i| i.trim_end_matches(']').parse().ok()).map(Step::Index));
    }
    steps
}

/// The value at `steps`, if there is one.
fn value_at<'v>(mut at: &'v mut toml::Value, steps: &[Step]) -> Option<&'v mut toml::Value> {
    for step in steps {
        at = match (at, step) {
            (toml::Value::Table(table), Step::Key(key)) => table.get_mut(*key)?,
            (toml::Value::Array(items), Step::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Removes the value at `key`, so that its default stands in for it; false if there is none.
fn set_aside(values: &mut toml::Value, key: &str) -> bool {
    let steps = steps(key);
    let Some((last, parent)) = steps.split_last() else { return false };
    match (value_at(values, parent), last) {
        (Some(toml::Value::Table(table)), Step::Key(key)) => table.remove(*key).is_some(),
        (Some(toml::Value::Array(items)), Step::Index(i)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

/// An override is a string by nature; where its key takes another type it is read as a TOML value, so that
/// `2` is an integer and `2.5` a float (and refused where an integer is expected). False if it reads as no
/// other type.
fn retype_override(values: &mut toml::Value, key: &str) -> bool {
    let Some(value) = value_at(values, &steps(key)) else { return false };
    let toml::Value::String(text) = value else { return false };
    let read = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().filter(|t| t.len() == 1);
    match read.and_then(|mut t| t.remove("v")) {
        Some(typed) if !typed.is_str() => {
            *value = typed;
            true
        }
        _ => false,
    }
}

/// Where a problem is (the file and the key, or the variable that overrode the key), then what it is.
fn located(file: &str, key: &str, var: Option<&str>, what: &str) -> String {
    match var {
        Some(var) => format!("{var} (overriding {key}): {what}"),
        None if key == "." => format!("{file}: {what}"),
        None => format!("{file}: {key}: {what}"),
    }
}

/// serde's `invalid type: floating point `2.5`, expected usize` as `expected an integer from 0, found a float
/// (2.5)`: TOML's names for what was found, plain words for what was expected, and for a duration, an address
/// or a size, the value to write instead, as the file or the variable `var` would hold it. `None` for other
/// messages (an unknown key, a bad URL).
fn type_problem(message: &str, key: &str, var: Option<&str>, found: &toml::Value) -> Option<String> {
    let expected = match message {
        // How std's address parsers refuse a string.
        "invalid socket address syntax" => "socket address",
        _ => {
            let rest = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))?;
            rest.rsplit_once(", expected ")?.1
        }
    };
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "an integer from 0",
        e if e.starts_with("a nonzero u") => "an integer above 0",
        "isize" | "i64" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "socket address" => "a socket address",
        e if e.ends_with("network address") => "a network address in CIDR form",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        // An enum's name (`rate_limit.backend`): the unknown-variant message lists the names.
        "string only" => "a string",
        "a sequence" => "an array",
        e => e,
    };
    // The literal is left out for a secret written inline: it may be the secret itself.
    let literal = match found {
        _ if key.ends_with("client_secret") => String::new(),
        toml::Value::String(s) => format!(" ({s:?})"),
        toml::Value::Table(_) | toml::Value::Array(_) => String::new(),
        other => format!(" ({other})"),
    };
    let found_type = match found {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    };
    let write = match (example(key, expected, found), var) {
        (None, _) => String::new(),
        (Some(toml::Value::String(example)), Some(var)) => format!(": write {var}={example}"),
        (Some(example), Some(var)) => format!(": write {var}={example}"),
        (Some(example), None) => format!(": write {key} = {example}"),
    };
    Some(format!("expected {expected}, found {found_type}{literal}{write}"))
}

/// The value to write for a duration, an address or a size given in the wrong form: the one meant where it can
/// be told (`10` seconds, port `8080`, `"64MiB"`), else a sample of the form.
fn example(key: &str, expected: &str, found: &toml::Value) -> Option<toml::Value> {
    let number = match found {
        toml::Value::Integer(n) => Some(*n as f64),
        toml::Value::Float(x) => Some(*x),
        toml::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite() && *n >= 0.0);
    let example = match expected {
        "a duration" => {
            let duration = number.and_then(|n| Duration::try_from_secs_f64(n).ok()).unwrap_or(Duration::from_secs(10));
            toml::Value::String(format_duration(duration))
        }
        "a socket address" => {
            let port = number.filter(|n| n.fract() == 0.0 && *n <= f64::from(u16::MAX)).unwrap_or(8080.0);
            toml::Value::String(format!("127.0.0.1:{port}"))
        }
        e if e.starts_with("an integer") && key.ends_with("_bytes") => {
            let bytes = match found {
                toml::Value::String(s) => bytes_of(s),
                _ => number.map(|n| n.round() as u64),
            };
            toml::Value::Integer(bytes.unwrap_or(1024 * 1024) as i64)
        }
        _ => return None,
    };
    Some(example)
}

/// `64MiB`, `64MB`, `512KiB`: the bytes a size written with a unit means.
fn bytes_of(size: &str) -> Option<u64> {
    let size = size.trim();
    let digits = size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len());
    let (number, unit) = size.split_at(digits);
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(unit)
}

/// Parser errors span several lines (a source excerpt with a caret): keep the words, drop the excerpt.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('|')).collect::<Vec<_>>().join(": ")
}
