//! Naming rules shared by the API, the CLI and the engines.

/// Why a name was refused. The message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// Empty name.
    #[error("is empty")]
    Empty,
    /// Too long.
    #[error("`{0}` is longer than {1} characters")]
    TooLong(String, usize),
    /// Not usable as an environment variable name.
    #[error("`{0}` cannot be used in the environment variable CARONI_ENV_{0}: use a letter or `_` first, then only ASCII letters, digits and `_`")]
    NotEnv(String),
    /// Not a valid template name.
    #[error(
        "`{0}` is not a valid template name: start with an ASCII letter, digit or `_`, then use only ASCII letters, digits, `_`, `-` and `.`"
    )]
    BadTemplate(String),
    /// Not usable as the name of a real CWL tool's parameter.
    #[error("`{0}` cannot name a parameter here: use no `/`, no blanks or control characters, and not `.` or `..`")]
    BadCwl(String),
}

/// Checks a job type, input or output name: it must form a valid
/// environment variable name after `CARONI_ENV_`.
pub fn validate_env_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 64 {
        return Err(NameError::TooLong(name.into(), 64));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(NameError::NotEnv(name.into()));
    }
    Ok(())
}

/// Checks the name of a real CWL tool's input or output, as a request
/// carries it: CWL ids may hold `-` and `.`, but never a path separator
/// (a File input is staged in a directory of its name).
pub fn validate_cwl_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 128 {
        return Err(NameError::TooLong(name.into(), 128));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err(NameError::BadCwl(name.into()));
    }
    Ok(())
}

/// Checks a template name.
pub fn validate_template_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 128 {
        return Err(NameError::TooLong(name.into(), 128));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(NameError::BadTemplate(name.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cwl_names_allow_dots_and_dashes_but_never_paths() {
        for ok in ["in-file", "args.py", "x_1", "a:b"] {
            assert_eq!(validate_cwl_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/b", "..", ".", "a b", "a\\b", "a\nb"] {
            assert!(validate_cwl_name(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn env_names() {
        for ok in ["a", "_x", "foojob0", "final_text", "A1_b"] {
            assert_eq!(validate_env_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "ü", "a.b"] {
            assert!(validate_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_names() {
        assert_eq!(validate_template_name("test_simple-2.v1"), Ok(()));
        assert!(validate_template_name("a/b").is_err());
        for bad in [".", "..", "-x", ".hidden"] {
            assert!(validate_template_name(bad).is_err(), "{bad}");
        }
        assert!(validate_template_name("").is_err());
    }
}
