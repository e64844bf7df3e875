//! Human tables or JSON for scripts.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, one document per command.
    Json,
}

/// A table with a header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header.to_vec());
    t
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
