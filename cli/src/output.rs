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
