//! How deep a YAML text nests, counted the way the YAML parser sees it,
//! before the parser runs.
//!
//! The count follows YAML's lexical rules where they decide whether a `[`
//! or `{` opens a flow collection: quoted scalars start only where a token
//! starts (never inside a plain scalar such as `a'b`) and may span lines;
//! `#` starts a comment only after a space, a tab or a line break; every
//! YAML line break (`\n`, `\r`, NEL, LS, PS) ends a comment; block scalars
//! (`|`, `>`) are text. Where the rules leave a doubt (a quote right after
//! `:`, a tag), the count takes every opener and no closer, so that it can
//! only overestimate: an input can never nest deeper for the parser than
//! this count says.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Region {
    /// Plain YAML.
    Plain,
    /// Inside `'…'`.
    Single,
    /// Inside `"…"`.
    Double,
    /// Perhaps inside a quoted scalar ending with the char: openers
    /// counted, closers not.
    Maybe(char),
    /// Inside a tag (up to a space): openers counted, closers not.
    Tag,
}

fn is_break(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// The deepest nesting of collections in `text`: flow collections plus
/// one level per two columns of block indentation (`-` and `?` included).
pub(crate) fn nesting(text: &str) -> usize {
    let mut deepest = 0usize;
    let mut depth = 0usize;
    let mut region = Region::Plain;
    // Block scalar: the header line's indentation, until its first line.
    let mut header: Option<usize> = None;
    // Block scalar: the indentation of its content.
    let mut content: Option<usize> = None;
    for line in text.split(is_break) {
        let spaces = line.len() - line.trim_start_matches(' ').len();
        let blank = line.trim_matches(is_blank).is_empty();
        if region == Region::Plain && depth == 0 {
            if let Some(at) = content {
                if blank || spaces >= at {
                    continue;
                }
                content = None;
            }
            if let Some(parent) = header {
                if blank {
                    continue;
                }
                header = None;
                if spaces > parent {
                    content = Some(spaces);
                    continue;
                }
            }
        }
        if region == Region::Tag {
            region = Region::Plain;
        }
        let block_indent = line.len() - line.trim_start_matches([' ', '-', '?']).len();
        deepest = deepest.max(depth + block_indent / 2);
        let chars: Vec<char> = line.chars().collect();
        let mut prev = ' ';
        // The previous char was a flow indicator (a token of its own).
        let mut indicator = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match region {
                Region::Double | Region::Maybe('"') => {
                    if c == '\\' {
                        i += 1;
                    } else if c == '"' {
                        region = Region::Plain;
                    } else if region != Region::Double && matches!(c, '[' | '{') {
                        depth += 1;
                    }
                }
                Region::Single | Region::Maybe(_) => {
                    if c == '\'' {
                        if chars.get(i) == Some(&'\'') {
                            i += 1;
                        } else {
                            region = Region::Plain;
                        }
                    } else if region != Region::Single && matches!(c, '[' | '{') {
                        depth += 1;
                    }
                }
                Region::Tag => {
                    if is_blank(c) {
                        region = Region::Plain;
                    } else if matches!(c, '[' | '{') {
                        depth += 1;
                    }
                }
                Region::Plain => {
                    let token_start = is_blank(prev) || indicator;
                    indicator = false;
                    match c {
                        '#' if is_blank(prev) => break,
                        '\'' | '"' if token_start => {
                            region = if c == '"' {
                                Region::Double
                            } else {
                                Region::Single
                            }
                        }
                        '\'' | '"' if prev == ':' => region = Region::Maybe(c),
                        '!' if token_start => region = Region::Tag,
                        '[' | '{' if depth > 0 || token_start => {
                            depth += 1;
                            indicator = true;
                        }
                        ']' | '}' if depth > 0 => {
                            depth -= 1;
                            indicator = true;
                        }
                        ',' if depth > 0 => indicator = true,
                        '|' | '>' if depth == 0 && token_start => {
                            let rest: String = chars[i..].iter().collect();
                            let rest = rest.trim_start_matches(['+', '-']);
                            let rest = rest.trim_start_matches(is_blank);
                            if rest.is_empty() || rest.starts_with('#') {
                                header = Some(block_indent);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            deepest = deepest.max(depth + block_indent / 2);
            prev = c;
        }
    }
    deepest
}
