//! Human tables or JSON for scripts.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, one document per command.
    Json,
}

/// `-o`: how results are printed, as the user writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputArg {
    /// Tables that fit the terminal: long cells wrap, ids are shortened to
    /// unique prefixes (which every command takes back).
    Table,
    /// Tables with every column whole and ids in full; no wrapping.
    Wide,
    /// JSON, one document per command (`workflow watch`: one line per
    /// change).
    Json,
}

static WIDE: AtomicBool = AtomicBool::new(false);
static NO_HEADERS: AtomicBool = AtomicBool::new(false);

/// Sets how tables print (once, from the command line); returns the
/// format the commands see.
pub fn configure(arg: OutputArg, no_headers: bool) -> Format {
    WIDE.store(arg == OutputArg::Wide, Relaxed);
    NO_HEADERS.store(no_headers, Relaxed);
    match arg {
        OutputArg::Json => Format::Json,
        _ => Format::Table,
    }
}

/// True with `-o wide`.
pub fn wide() -> bool {
    WIDE.load(Relaxed)
}

/// A table with a header (none with `--no-headers`); on a terminal its
/// long cells wrap to the terminal's width unless `-o wide`.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    if !NO_HEADERS.load(Relaxed) {
        t.set_header(header.to_vec());
    }
    if !wide() {
        t.set_content_arrangement(ContentArrangement::Dynamic);
    }
    t
}

/// Each id shortened to the shortest prefix (at least `min` characters)
/// that no other id of `ids` shares, so that what is printed can be typed
/// back; whole with `-o wide`.
pub fn unique_prefixes(ids: &[&str], min: usize) -> Vec<String> {
    if wide() {
        return ids.iter().map(|s| s.to_string()).collect();
    }
    ids.iter()
        .map(|id| {
            let shared = ids
                .iter()
                .filter(|o| *o != id)
                .map(|o| {
                    o.chars()
                        .zip(id.chars())
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max()
                .unwrap_or(0);
            id.chars().take((shared + 1).max(min)).collect()
        })
        .collect()
}

/// Prints JSON, pretty.
pub fn json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Formats a protobuf timestamp as RFC 3339 (UTC, seconds).
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// Text from a node made safe for a terminal: control characters (C0
/// except newline and tab, DEL, C1) and the bidirectional overrides that
/// reorder what is shown are printed as escapes (`\x1b`, `\u{202e}`), so
/// that a value, a message or a job's stderr can neither move the cursor,
/// set the window title, clear the screen, write the clipboard (OSC 52)
/// nor disguise itself. JSON output is never cleaned: it stays exact.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `println!` for human output: the text is [`clean`]ed first.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::output::clean(&format!($($arg)*)))
    };
}

/// `eprintln!` for human output: the text is [`clean`]ed first.
macro_rules! tell {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::output::clean(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn control_characters_are_shown_as_escapes() {
        assert_eq!(clean("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(clean("\u{1b}]0;owned\u{7}"), "\\x1b]0;owned\\x07");
        assert_eq!(
            clean("\u{1b}]52;c;aGk=\u{7}\u{1b}[2J\r"),
            "\\x1b]52;c;aGk=\\x07\\x1b[2J\\x0d"
        );
        assert_eq!(clean("a\u{9b}b\u{202e}c\u{7f}"), "a\\u{9b}b\\u{202e}c\\x7f");
    }
}
