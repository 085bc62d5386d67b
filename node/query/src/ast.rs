//! The syntax tree.

use serde_json::Value;

/// `SELECT [TOP n] projection FROM source [WHERE condition] [GROUP BY paths]`
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`.
    pub top: Option<u64>,
    /// What each row holds.
    pub projection: Projection,
    /// `FROM`.
    pub from: Source,
    /// `WHERE`.
    pub condition: Option<Expr>,
    /// `GROUP BY`.
    pub group_by: Vec<Path>,
}

/// The collection a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `devices`: device twins.
    Devices,
    /// `devices.modules`: module twins.
    DevicesModules,
    /// `devices.jobs`: per-device job records.
    DevicesJobs,
}

impl Source {
    /// The path prefix a query may put before property names (`devices.tags.x`).
    pub fn prefix(self) -> &'static [&'static str] {
        match self {
            Source::Devices => &["devices"],
            Source::DevicesModules => &["devices", "modules"],
            Source::DevicesJobs => &["devices", "jobs"],
        }
    }
}

/// `*` or a list of items.
#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// Whole documents.
    Star,
    /// Selected values.
    Items(Vec<ProjectionItem>),
}

/// One projected value and its name.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionItem {
    /// The value.
    pub value: ProjectionValue,
    /// `AS alias`; without it the last path segment (or the function name) names the column.
    pub alias: Option<String>,
}

/// A projected value.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionValue {
    /// A property path.
    Path(Path),
    /// An aggregate over the rows (or each group).
    Aggregate(Aggregate, Option<Path>),
}

/// Aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// `COUNT()`
    Count,
    /// `AVG(x)`
    Avg,
    /// `SUM(x)`
    Sum,
    /// `MIN(x)`
    Min,
    /// `MAX(x)`
    Max,
}

/// A segment of a property path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// `.name` (or `[[name]]`).
    Field(String),
    /// `[n]`
    Index(usize),
}

/// A property path such as `properties.reported.temp` or `$body.readings[0].value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Its segments, first one first.
    pub segments: Vec<Segment>,
}

impl Path {
    /// The name a projection column gets from this path: its last field.
    pub fn column_name(&self) -> String {
        self.segments
            .iter()
            .rev()
            .find_map(|s| match s {
                Segment::Field(f) => Some(f.clone()),
                Segment::Index(_) => None,
            })
            .unwrap_or_default()
    }
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `AND`
    And,
    /// `OR`
    Or,
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
}

/// An expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal; `None` is `undefined`.
    Constant(Option<Value>),
    /// A property path.
    Path(Path),
    /// `NOT e`
    Not(Box<Expr>),
    /// `-e`
    Negate(Box<Expr>),
    /// `a op b`
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `e IN [...]` (or `NIN` when `negated`).
    In {
        /// Left side.
        value: Box<Expr>,
        /// The list.
        list: Vec<Expr>,
        /// `NIN`.
        negated: bool,
    },
    /// `[a, b, ...]`
    Array(Vec<Expr>),
    /// `NAME(args)` (names are upper-cased).
    Call(String, Vec<Expr>),
}
