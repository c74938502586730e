//! The documentation, kept true: `README.md`, `CHANGELOG.md`, `deploy/README.md` and every `docs/*.md`.
//!
//! - Figures. Every measured figure sits in a block `<!-- figures: bench/results/FILE -->` … `<!-- /figures -->`
//!   that links its results file, and every number in the block appears in that file, written the same way
//!   (thousands separators aside). Outside such blocks nothing may read like a measurement.
//! - Links. Every relative link and image resolves to a file, and an anchor to a heading of that page; the README
//!   links every page of `docs/`.
//! - The alerts table of `docs/operations.md` names exactly the alerts of `deploy/prometheus/alerts.yml`, and each
//!   alert's `runbook_url` is its own section of `docs/troubleshooting.md`.
//! - The README's minimal configuration loads.
//!
//! The configuration keys and the metric families are checked beside the code that defines them (`config.rs`,
//! `metrics.rs`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use easemob_gateway::config::{Config, SecretPolicy};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A page of the documentation: its path from the repository root, and its text.
struct Page {
    path: String,
    text: String,
}

impl Page {
    fn read(path: &str) -> Page {
        let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        Page { path: path.to_owned(), text }
    }

    /// The text with every fenced code block blanked (lines kept, so line numbers still hold): examples and
    /// configuration values are not figures, and a link in an example is not a link.
    fn prose(&self) -> String {
        let mut fenced = false;
        let lines = self.text.lines().map(|line| {
            let fence = line.trim_start().starts_with("```");
            let blank = fenced || fence;
            if fence {
                fenced = !fenced;
            }
            if blank { "" } else { line }
        });
        lines.collect::<Vec<_>>().join("\n")
    }

    fn dir(&self) -> &Path {
        Path::new(&self.path).parent().unwrap_or(Path::new(""))
    }
}

/// `README.md`, `CHANGELOG.md`, `deploy/README.md`, then every `docs/*.md` by name.
fn pages() -> Vec<Page> {
    let mut docs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    ["README.md".to_owned(), "CHANGELOG.md".to_owned(), "deploy/README.md".to_owned()]
        .into_iter()
        .chain(docs)
        .map(|path| Page::read(&path))
        .collect()
}

/// The numbers in `text` as written, thousands separators dropped (`1,000` is `1000`; `0.159` stays `0.159`), each
/// with its byte offset just past it. Digits glued to a letter or `_` before them are part of a name (`p99`,
/// `x86_64`), not a figure; a sign is not part of a number.
fn numbers(text: &str) -> Vec<(String, usize)> {
    let b = text.as_bytes();
    let digits_at = |i: usize, n: usize| i + n <= b.len() && b[i..i + n].iter().all(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let glued = i > 0 && (b[i - 1].is_ascii_alphabetic() || b[i - 1] == b'_');
        let mut number = String::new();
        while i < b.len() && b[i].is_ascii_digit() {
            number.push(b[i] as char);
            i += 1;
            // A thousands separator: a comma followed by exactly three digits.
            if i < b.len() && b[i] == b',' && digits_at(i + 1, 3) && !digits_at(i + 4, 1) {
                i += 1;
            }
        }
        if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
            number.push('.');
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                number.push(b[i] as char);
                i += 1;
            }
        }
        if !glued {
            out.push((number, i));
        }
    }
    out
}

/// `text` without link targets (`](…)`) and HTML comments, which hold paths and markers, not figures.
fn without_targets(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    loop {
        let link = rest.find("](");
        let comment = rest.find("<!--");
        match (link, comment) {
            (Some(l), c) if c.is_none_or(|c| l < c) => {
                out.push_str(&rest[..l + 1]);
                rest = rest[l + 2..].split_once(')').map_or("", |(_, after)| after);
            }
            (_, Some(c)) => {
                out.push_str(&rest[..c]);
                rest = rest[c..].split_once("-->").map_or("", |(_, after)| after);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// A block of figures copied from one results file.
struct Block {
    /// `page:line` of its opening marker.
    at: String,
    source: String,
    text: String,
}

const OPEN: &str = "<!-- figures: ";
const CLOSE: &str = "<!-- /figures -->";

/// The page's figure blocks, and the prose outside them (blocks blanked, lines kept).
fn blocks(page: &Page) -> (Vec<Block>, String) {
    let mut blocks = Vec::new();
    let mut outside = Vec::new();
    let mut open: Option<Block> = None;
    let prose = page.prose();
    for (n, line) in prose.lines().enumerate() {
        let at = format!("{}:{}", page.path, n + 1);
        if let Some(source) = line.trim().strip_prefix(OPEN) {
            assert!(open.is_none(), "{at}: a figures block opens inside another");
            let source = source.strip_suffix("-->").unwrap_or_else(|| panic!("{at}: unterminated marker")).trim();
            open = Some(Block { at, source: source.to_owned(), text: String::new() });
        } else if line.trim() == CLOSE {
            blocks.push(open.take().unwrap_or_else(|| panic!("{at}: {CLOSE} closes no block")));
        } else if let Some(block) = open.as_mut() {
            block.text.push_str(line);
            block.text.push('\n');
        }
        outside.push(if open.is_some() || line.trim() == CLOSE { "" } else { line });
    }
    assert!(open.is_none(), "{}: a figures block is never closed", page.path);
    (blocks, outside.join("\n"))
}

/// Where `target` (a link in `page`, without its anchor) points, from the repository root.
fn resolve(page: &Page, target: &str) -> PathBuf {
    let mut path = PathBuf::new();
    for part in page.dir().join(target).components() {
        match part {
            Component::ParentDir => assert!(path.pop(), "{}: {target} leaves the repository", page.path),
            Component::CurDir => {}
            other => path.push(other),
        }
    }
    path
}

/// The relative links and images of a page (outside code): (line, target).
fn links(page: &Page) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in page.prose().lines().enumerate() {
        for (_, after) in line.match_indices("](").map(|(i, _)| line.split_at(i + 2)) {
            let target = after.split(')').next().unwrap().split_whitespace().next().unwrap_or("");
            if !(target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:")) {
                out.push((n + 1, target.to_owned()));
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let page = Page { path: String::new(), text: text.to_owned() };
    page.prose()
        .lines()
        .filter_map(|line| line.trim_start_matches('#').strip_prefix(' ').filter(|_| line.starts_with('#')))
        .map(slug)
        .collect()
}

#[test]
fn every_figure_is_copied_from_the_results_file_its_block_names() {
    let mut problems = Vec::new();
    let mut count = 0;
    for page in pages() {
        for block in blocks(&page).0 {
            let Block { at, source, text } = &block;
            if !source.starts_with("bench/results/") {
                problems.push(format!("{at}: {source} is not a results file under bench/results/"));
                continue;
            }
            let Ok(results) = std::fs::read_to_string(Path::new(ROOT).join(source)) else {
                problems.push(format!("{at}: {source} does not exist"));
                continue;
            };
            let linked = links(&Page { path: page.path.clone(), text: text.clone() })
                .iter()
                .any(|(_, target)| resolve(&page, target.split('#').next().unwrap()) == Path::new(source));
            if !linked {
                problems.push(format!("{at}: the block does not link its results file {source}"));
            }
            let known: BTreeSet<String> = numbers(&results).into_iter().map(|(n, _)| n).collect();
            for (number, _) in numbers(&without_targets(text)) {
                count += 1;
                if !known.contains(&number) {
                    problems.push(format!("{at}: {number} is not in {source}"));
                }
            }
        }
    }
    assert!(count > 0, "no figures found: are the blocks still marked?");
    assert!(problems.is_empty(), "figures that do not match their results file:\n{}", problems.join("\n"));
}

/// What reads like a measurement: a decimal number of a time, a share or a size, or any number of microseconds,
/// requests per second, instructions, megabytes, or a ratio (`2.5×`).
fn looks_measured(number: &str, after: &str) -> bool {
    let unit = after.trim_start_matches([' ', '\u{a0}', '\u{2009}', '\u{202f}']);
    let is = |u: &str| unit.strip_prefix(u).is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()));
    let decimal_units = ["ms", "s", "%", "×", "MiB", "KiB", "GiB"];
    let any_units = ["µs", "req/s", "requests/s", "refusals/s", "instructions", "MB", "GB"];
    after.starts_with('×')
        || any_units.iter().any(|u| is(u))
        || (number.contains('.') && decimal_units.iter().any(|u| is(u)))
}

#[test]
fn no_measured_figure_stands_outside_a_figures_block() {
    let mut problems = Vec::new();
    for page in pages() {
        let outside = blocks(&page).1;
        for (n, line) in outside.lines().enumerate() {
            // Inline code holds configuration values and examples, not measurements.
            let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
            let prose = without_targets(&prose);
            for (number, end) in numbers(&prose) {
                if looks_measured(&number, &prose[end..]) {
                    let context: String = prose[end..].chars().take(12).collect();
                    problems.push(format!("{}:{}: {number}{context}", page.path, n + 1));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "figures outside a `{OPEN}bench/results/… -->` block (copy them from a results file, or drop them):\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_relative_link_resolves() {
    let mut problems = Vec::new();
    for page in pages() {
        for (line, target) in links(&page) {
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let path = if file.is_empty() { PathBuf::from(&page.path) } else { resolve(&page, file) };
            let full = Path::new(ROOT).join(&path);
            if !full.exists() {
                problems.push(format!("{}:{line}: {target}: {} does not exist", page.path, path.display()));
            } else if !anchor.is_empty() && path.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&full).unwrap();
                if !anchors(&text).contains(anchor) {
                    problems.push(format!(
                        "{}:{line}: {target}: no heading #{anchor} in {}",
                        page.path,
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn the_readme_links_every_page_of_docs() {
    let readme = Page::read("README.md");
    let linked: BTreeSet<PathBuf> =
        links(&readme).into_iter().map(|(_, target)| resolve(&readme, target.split('#').next().unwrap())).collect();
    let missing: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .unwrap()
        .map(|entry| Path::new("docs").join(entry.unwrap().file_name()))
        // Pages, not the pictures they show.
        .filter(|page| page.extension().is_none_or(|e| e != "png"))
        .filter(|page| !linked.contains(page))
        .map(|page| page.display().to_string())
        .collect();
    assert!(missing.is_empty(), "pages of docs/ the README does not link: {missing:?}");
}

/// An alerting rule of `deploy/prometheus/alerts.yml`: its name and its `runbook_url` annotation, if any.
struct Alert {
    name: String,
    runbook_url: Option<String>,
}

/// The rules of `deploy/prometheus/alerts.yml`, in order. Read line by line: each rule opens with `- alert:` and
/// its annotations follow before the next one.
fn alerts() -> Vec<Alert> {
    let rules = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap();
    let mut alerts: Vec<Alert> = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push(Alert { name: name.trim().to_owned(), runbook_url: None });
        } else if let (Some(url), Some(alert)) = (line.strip_prefix("runbook_url:"), alerts.last_mut()) {
            alert.runbook_url = Some(url.trim().trim_matches('"').to_owned());
        }
    }
    alerts
}

#[test]
fn every_alert_links_its_own_section_of_the_troubleshooting_page() {
    let page = Page::read("docs/troubleshooting.md");
    let headings = anchors(&page.text);
    let mut problems = Vec::new();
    let alerts = alerts();
    assert!(!alerts.is_empty());
    for Alert { name, runbook_url } in &alerts {
        // Relative to the repository, so it holds on any host the repository is browsed on.
        let expected = format!("{}#{}", page.path, slug(name));
        match runbook_url {
            None => problems.push(format!("{name}: no runbook_url annotation")),
            Some(url) if *url != expected => problems.push(format!("{name}: runbook_url {url}, expected {expected}")),
            Some(_) if !headings.contains(&slug(name)) => {
                problems.push(format!("{name}: no heading #{} in {}", slug(name), page.path))
            }
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "alerts without their runbook:\n{}", problems.join("\n"));
}

#[test]
fn the_operations_page_lists_every_alert_and_no_other() {
    let alerts = alerts();
    let defined: BTreeSet<&str> = alerts.iter().map(|alert| alert.name.as_str()).collect();
    let page = Page::read("docs/operations.md");
    let table = page.text.split("\n## Alerts\n").nth(1).expect("a `## Alerts` section").split("\n## ").next().unwrap();
    let documented: BTreeSet<&str> =
        table.lines().filter_map(|row| row.strip_prefix("| `")?.split('`').next()).collect();
    assert!(!defined.is_empty());
    assert_eq!(documented, defined, "docs/operations.md's alerts against deploy/prometheus/alerts.yml");
}

#[test]
fn the_readmes_minimal_config_loads() {
    let readme = Page::read("README.md");
    let toml = readme.text.split("```toml\n").nth(1).expect("a toml block").split("```").next().unwrap();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let config = Config::load(file.path()).unwrap_or_else(|e| panic!("README's config: {e}"));
    // The secret's variable is the reader's to set; anything else would be the README's mistake.
    let problems: Vec<String> = config
        .problems(SecretPolicy::ExternalOnly)
        .into_iter()
        .filter(|problem| !problem.contains("client_secret_env"))
        .collect();
    assert!(problems.is_empty(), "README's config: {problems:?}");
}

#[test]
fn numbers_are_read_as_written() {
    let found: Vec<String> = numbers("p99 of 1,000 req/s: 0.159 ms, -1.719, x86_64, 845,052 and 1, 10")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(found, ["1000", "0.159", "1.719", "845052", "1", "10"]);
    assert!(looks_measured("0.159", " ms added"));
    assert!(looks_measured("30", " µs per request"));
    assert!(looks_measured("2.5", "× cheaper"));
    assert!(!looks_measured("64", " KiB"));
    assert!(!looks_measured("10", " s"));
    assert!(!looks_measured("1.5", " seconds"), "a word, not a unit");
}
