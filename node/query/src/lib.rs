//! Azure IoT Hub's query language, for twin queries (`SELECT ... FROM devices ...`) and routing
//! conditions (`$body.temp > 30 AND $twin.tags.site = 'a'`).
//!
//! * [`parse_query`] / [`parse_condition`] turn text into an AST ([`ast`]) or a [`QueryError`] with
//!   the position of the problem.
//! * [`execute`] runs a query over twin documents (`WHERE`, projections, `TOP`, `GROUP BY`,
//!   aggregates).
//! * [`evaluate_condition`] evaluates a condition against any [`Document`], such as a routed
//!   message.
//!
//! Semantics follow the IoT Hub documentation: only Boolean `true` is true; comparisons between
//! different types are undefined (so false in a condition); names of user properties are
//! case-sensitive, top-level identity properties and routing property names are not.
//!
//! Depends on no other Meridian crate and has no runtime.

pub mod ast;
mod eval;
mod lexer;
mod parser;

pub use eval::{Document, JsonDocument, evaluate, evaluate_condition, execute};

/// Follows a path's segments into a JSON value (`$body.a[0].b` after `$body`); `None` when a
/// segment is missing. Names are matched exactly, except the first, which falls back to a
/// case-insensitive match.
pub fn walk_value(
    value: &serde_json::Value,
    segments: &[ast::Segment],
) -> Option<serde_json::Value> {
    eval::walk(value, segments)
}
pub use parser::{parse_condition, parse_query};

/// A query that cannot be parsed or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at line {line}, column {column})")]
pub struct QueryError {
    /// What is wrong.
    pub message: String,
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column of the offending token.
    pub column: usize,
}

impl QueryError {
    pub(crate) fn at(message: impl Into<String>, line: usize, column: usize) -> Self {
        Self {
            message: message.into(),
            line,
            column,
        }
    }
}
