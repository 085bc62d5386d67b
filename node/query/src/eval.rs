//! Evaluation over JSON documents, with IoT Hub's `undefined` semantics.

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};

use crate::QueryError;
use crate::ast::{
    Aggregate, BinaryOp, Expr, Path, Projection, ProjectionValue, Query, Segment, Source,
};

/// Something a condition can look properties up in.
pub trait Document {
    /// The value at `path`, or `None` (undefined).
    fn resolve(&self, path: &Path) -> Option<Value>;
}

/// A twin (or any JSON object) as a document. Top-level names match case-insensitively when there
/// is no exact match (identity properties such as `LastActivityTime`); nested user keys are
/// case-sensitive, as twin keys are.
pub struct JsonDocument<'a> {
    /// The document.
    pub value: &'a Value,
    /// Path prefix the query may write before property names (`devices.` for twin queries).
    pub prefix: &'a [&'a str],
}

/// Follows `segments` into `value`.
pub fn walk(value: &Value, segments: &[Segment]) -> Option<Value> {
    let mut current = value;
    for (i, segment) in segments.iter().enumerate() {
        current = match (segment, current) {
            (Segment::Field(name), Value::Object(map)) => match map.get(name) {
                Some(v) => v,
                None if i == 0 => map
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)?,
                None => return None,
            },
            (Segment::Index(n), Value::Array(items)) => items.get(*n)?,
            _ => return None,
        };
    }
    Some(current.clone())
}

impl Document for JsonDocument<'_> {
    fn resolve(&self, path: &Path) -> Option<Value> {
        let mut segments = path.segments.as_slice();
        // `devices.tags.x` and `devices.modules.moduleId` name the same properties as `tags.x`.
        let prefix_len = self
            .prefix
            .iter()
            .zip(segments)
            .take_while(|(p, s)| matches!(s, Segment::Field(f) if f.eq_ignore_ascii_case(p)))
            .count();
        if prefix_len == self.prefix.len() && segments.len() > prefix_len {
            segments = &segments[prefix_len..];
        }
        walk(self.value, segments)
    }
}

/// Functions the language knows (upper case).
const FUNCTIONS: [&str; 31] = [
    "IS_DEFINED",
    "IS_NULL",
    "IS_BOOL",
    "IS_NUMBER",
    "IS_STRING",
    "IS_OBJECT",
    "IS_ARRAY",
    "IS_PRIMITIVE",
    "AS_NUMBER",
    "ABS",
    "EXP",
    "POWER",
    "SQUARE",
    "CEILING",
    "FLOOR",
    "SIGN",
    "SQRT",
    "CONCAT",
    "LENGTH",
    "LOWER",
    "UPPER",
    "SUBSTRING",
    "INDEX_OF",
    "STARTS_WITH",
    "STARTSWITH",
    "ENDS_WITH",
    "ENDSWITH",
    "CONTAINS",
    "ARRAY_CONTAINS",
    "ARRAY_LENGTH",
    "ROUND",
];

/// Whether `name` (upper case) is a function.
pub fn is_function(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}

fn num(n: f64) -> Option<Value> {
    if n.is_finite() {
        if n.fract() == 0.0 && n.abs() < 9.0e15 {
            Some(Value::from(n as i64))
        } else {
            Number::from_f64(n).map(Value::Number)
        }
    } else {
        None
    }
}

fn as_f64(v: &Option<Value>) -> Option<f64> {
    v.as_ref().and_then(Value::as_f64)
}

fn as_str(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str)
}

/// Compares two primitives of the same type; anything else is undefined.
fn compare(a: &Option<Value>, b: &Option<Value>) -> Option<std::cmp::Ordering> {
    match (a.as_ref()?, b.as_ref()?) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(std::cmp::Ordering::Equal),
        _ => None,
    }
}

fn truth(v: &Option<Value>) -> Option<bool> {
    match v {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Evaluates an expression; `None` is undefined.
pub fn evaluate(expr: &Expr, doc: &dyn Document) -> Option<Value> {
    match expr {
        Expr::Constant(c) => c.clone(),
        Expr::Path(p) => doc.resolve(p),
        Expr::Not(e) => truth(&evaluate(e, doc)).map(|b| Value::Bool(!b)),
        Expr::Negate(e) => as_f64(&evaluate(e, doc)).and_then(|n| num(-n)),
        Expr::Array(items) => Some(Value::Array(
            items
                .iter()
                .map(|i| evaluate(i, doc).unwrap_or(Value::Null))
                .collect(),
        )),
        Expr::In {
            value,
            list,
            negated,
        } => {
            let v = evaluate(value, doc);
            v.as_ref()?;
            let found = list
                .iter()
                .any(|item| compare(&v, &evaluate(item, doc)) == Some(std::cmp::Ordering::Equal));
            Some(Value::Bool(found != *negated))
        }
        Expr::Binary(op, left, right) => {
            let (l, r) = (evaluate(left, doc), evaluate(right, doc));
            binary(*op, &l, &r)
        }
        Expr::Call(name, args) => {
            let values: Vec<Option<Value>> = args.iter().map(|a| evaluate(a, doc)).collect();
            call(name, &values)
        }
    }
}

fn binary(op: BinaryOp, l: &Option<Value>, r: &Option<Value>) -> Option<Value> {
    use std::cmp::Ordering::*;
    match op {
        BinaryOp::And => match (truth(l), truth(r)) {
            (Some(false), _) | (_, Some(false)) => Some(Value::Bool(false)),
            (Some(true), Some(true)) => Some(Value::Bool(true)),
            _ => None,
        },
        BinaryOp::Or => match (truth(l), truth(r)) {
            (Some(true), _) | (_, Some(true)) => Some(Value::Bool(true)),
            (Some(false), Some(false)) => Some(Value::Bool(false)),
            _ => None,
        },
        BinaryOp::Eq => compare(l, r).map(|o| Value::Bool(o == Equal)),
        BinaryOp::Ne => compare(l, r).map(|o| Value::Bool(o != Equal)),
        BinaryOp::Lt => compare(l, r).map(|o| Value::Bool(o == Less)),
        BinaryOp::Le => compare(l, r).map(|o| Value::Bool(o != Greater)),
        BinaryOp::Gt => compare(l, r).map(|o| Value::Bool(o == Greater)),
        BinaryOp::Ge => compare(l, r).map(|o| Value::Bool(o != Less)),
        BinaryOp::Add => num(as_f64(l)? + as_f64(r)?),
        BinaryOp::Sub => num(as_f64(l)? - as_f64(r)?),
        BinaryOp::Mul => num(as_f64(l)? * as_f64(r)?),
        BinaryOp::Div => {
            let d = as_f64(r)?;
            if d == 0.0 {
                return None;
            }
            num(as_f64(l)? / d)
        }
        BinaryOp::Rem => {
            let d = as_f64(r)?;
            if d == 0.0 {
                return None;
            }
            num(as_f64(l)? % d)
        }
    }
}

fn arg(values: &[Option<Value>], i: usize) -> &Option<Value> {
    values.get(i).unwrap_or(&None)
}

fn call(name: &str, v: &[Option<Value>]) -> Option<Value> {
    let a = arg(v, 0);
    let b = arg(v, 1);
    let bool_of = |x: bool| Some(Value::Bool(x));
    match name {
        "IS_DEFINED" => bool_of(a.is_some()),
        "IS_NULL" => bool_of(matches!(a, Some(Value::Null))),
        "IS_BOOL" => bool_of(matches!(a, Some(Value::Bool(_)))),
        "IS_NUMBER" => bool_of(matches!(a, Some(Value::Number(_)))),
        "IS_STRING" => bool_of(matches!(a, Some(Value::String(_)))),
        "IS_OBJECT" => bool_of(matches!(a, Some(Value::Object(_)))),
        "IS_ARRAY" => bool_of(matches!(a, Some(Value::Array(_)))),
        "IS_PRIMITIVE" => bool_of(matches!(
            a,
            Some(Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_))
        )),
        "AS_NUMBER" => match a {
            Some(Value::Number(_)) => a.clone(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok().and_then(num),
            _ => None,
        },
        "ABS" => num(as_f64(a)?.abs()),
        "EXP" => num(as_f64(a)?.exp()),
        "POWER" => num(as_f64(a)?.powf(as_f64(b)?)),
        "SQUARE" => num(as_f64(a)?.powi(2)),
        "CEILING" => num(as_f64(a)?.ceil()),
        "FLOOR" => num(as_f64(a)?.floor()),
        "ROUND" => num(as_f64(a)?.round()),
        "SIGN" => num(as_f64(a)?.signum() * f64::from(u8::from(as_f64(a)? != 0.0))),
        "SQRT" => {
            let x = as_f64(a)?;
            if x < 0.0 {
                return None;
            }
            num(x.sqrt())
        }
        "CONCAT" => {
            let mut out = String::new();
            for x in v {
                out.push_str(as_str(x)?);
            }
            Some(Value::String(out))
        }
        "LENGTH" => num(as_str(a)?.chars().count() as f64),
        "LOWER" => Some(Value::String(as_str(a)?.to_lowercase())),
        "UPPER" => Some(Value::String(as_str(a)?.to_uppercase())),
        "SUBSTRING" => {
            let s: Vec<char> = as_str(a)?.chars().collect();
            let start = as_f64(b)?.max(0.0) as usize;
            let len = match arg(v, 2) {
                Some(_) => as_f64(arg(v, 2))?.max(0.0) as usize,
                None => s.len(),
            };
            Some(Value::String(s.iter().skip(start).take(len).collect()))
        }
        "INDEX_OF" => {
            let (s, f) = (as_str(a)?, as_str(b)?);
            num(s.find(f).map_or(-1.0, |i| s[..i].chars().count() as f64))
        }
        "STARTS_WITH" | "STARTSWITH" => bool_of(as_str(a)?.starts_with(as_str(b)?)),
        "ENDS_WITH" | "ENDSWITH" => bool_of(as_str(a)?.ends_with(as_str(b)?)),
        "CONTAINS" => bool_of(as_str(a)?.contains(as_str(b)?)),
        "ARRAY_CONTAINS" => match a {
            Some(Value::Array(items)) => bool_of(
                items
                    .iter()
                    .any(|i| compare(&Some(i.clone()), b) == Some(std::cmp::Ordering::Equal)),
            ),
            _ => None,
        },
        "ARRAY_LENGTH" => match a {
            Some(Value::Array(items)) => num(items.len() as f64),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a condition holds: only Boolean `true` is true.
pub fn evaluate_condition(condition: &Expr, doc: &dyn Document) -> bool {
    matches!(evaluate(condition, doc), Some(Value::Bool(true)))
}

fn aggregate(kind: Aggregate, path: Option<&Path>, rows: &[&Value], prefix: &[&str]) -> Value {
    let values: Vec<f64> = match path {
        Some(p) => rows
            .iter()
            .filter_map(|r| JsonDocument { value: r, prefix }.resolve(p))
            .filter_map(|v| v.as_f64())
            .collect(),
        None => Vec::new(),
    };
    let n = |x: f64| num(x).unwrap_or(Value::Null);
    match kind {
        Aggregate::Count => Value::from(rows.len() as u64),
        Aggregate::Sum => n(values.iter().sum()),
        Aggregate::Avg if values.is_empty() => Value::Null,
        Aggregate::Avg => n(values.iter().sum::<f64>() / values.len() as f64),
        Aggregate::Min => values
            .iter()
            .copied()
            .reduce(f64::min)
            .map_or(Value::Null, n),
        Aggregate::Max => values
            .iter()
            .copied()
            .reduce(f64::max)
            .map_or(Value::Null, n),
    }
}

fn column(item: &crate::ast::ProjectionItem) -> String {
    item.alias.clone().unwrap_or_else(|| match &item.value {
        ProjectionValue::Path(p) => p.column_name(),
        ProjectionValue::Aggregate(kind, _) => format!("{kind:?}").to_lowercase(),
    })
}

/// Runs a query over documents (twins for `devices`/`devices.modules`, job records for
/// `devices.jobs`), returning the result rows.
pub fn execute<'a>(
    query: &Query,
    documents: impl IntoIterator<Item = &'a Value>,
) -> Result<Vec<Value>, QueryError> {
    let prefix = query.from.prefix();
    let has_aggregate = matches!(&query.projection, Projection::Items(items)
        if items.iter().any(|i| matches!(i.value, ProjectionValue::Aggregate(..))));
    if query.from == Source::DevicesJobs && (has_aggregate || !query.group_by.is_empty()) {
        return Err(QueryError::at(
            "devices.jobs queries support no aggregation",
            1,
            1,
        ));
    }
    if !query.group_by.is_empty() && query.from != Source::Devices {
        return Err(QueryError::at(
            "GROUP BY is only supported on devices",
            1,
            1,
        ));
    }
    let rows: Vec<&Value> = documents
        .into_iter()
        .filter(|d| match &query.condition {
            Some(c) => evaluate_condition(c, &JsonDocument { value: d, prefix }),
            None => true,
        })
        .collect();
    let limit = query.top.map_or(usize::MAX, |t| t as usize);
    let items = match &query.projection {
        Projection::Star => {
            if !query.group_by.is_empty() {
                return Err(QueryError::at(
                    "GROUP BY needs a projection list, not *",
                    1,
                    1,
                ));
            }
            return Ok(rows.into_iter().take(limit).cloned().collect());
        }
        Projection::Items(items) => items,
    };
    if query.group_by.is_empty() && has_aggregate {
        let mut out = Map::new();
        for item in items {
            let v = match &item.value {
                ProjectionValue::Aggregate(kind, p) => aggregate(*kind, p.as_ref(), &rows, prefix),
                ProjectionValue::Path(p) => rows
                    .first()
                    .and_then(|r| JsonDocument { value: r, prefix }.resolve(p))
                    .unwrap_or(Value::Null),
            };
            out.insert(column(item), v);
        }
        return Ok(vec![Value::Object(out)]);
    }
    if query.group_by.is_empty() {
        return Ok(rows
            .into_iter()
            .take(limit)
            .map(|r| {
                let doc = JsonDocument { value: r, prefix };
                let mut out = Map::new();
                for item in items {
                    if let ProjectionValue::Path(p) = &item.value
                        && let Some(v) = doc.resolve(p)
                    {
                        out.insert(column(item), v);
                    }
                }
                Value::Object(out)
            })
            .collect());
    }
    // GROUP BY: one row per distinct key, in key order.
    let mut groups: BTreeMap<String, (Vec<Option<Value>>, Vec<&Value>)> = BTreeMap::new();
    for r in rows {
        let doc = JsonDocument { value: r, prefix };
        let key: Vec<Option<Value>> = query.group_by.iter().map(|p| doc.resolve(p)).collect();
        let text = serde_json::to_string(&key).unwrap_or_default();
        groups
            .entry(text)
            .or_insert_with(|| (key, Vec::new()))
            .1
            .push(r);
    }
    let mut out = Vec::new();
    for (_, (key, members)) in groups.into_iter().take(limit) {
        let mut row = Map::new();
        for item in items {
            match &item.value {
                ProjectionValue::Aggregate(kind, p) => {
                    row.insert(column(item), aggregate(*kind, p.as_ref(), &members, prefix));
                }
                ProjectionValue::Path(p) => {
                    let idx = query.group_by.iter().position(|g| g == p).ok_or_else(|| {
                        QueryError::at(
                            format!("{} must be in GROUP BY to be selected", p.column_name()),
                            1,
                            1,
                        )
                    })?;
                    if let Some(v) = &key[idx] {
                        row.insert(column(item), v.clone());
                    }
                }
            }
        }
        out.push(Value::Object(row));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_condition, parse_query};
    use serde_json::json;

    fn cond(text: &str, doc: &Value) -> bool {
        let e = parse_condition(text).expect("valid");
        evaluate_condition(
            &e,
            &JsonDocument {
                value: doc,
                prefix: &[],
            },
        )
    }

    #[test]
    fn only_true_is_true_and_types_do_not_mix() {
        let d = json!({"a": 1, "s": "x", "n": null, "t": true});
        assert!(cond("a = 1", &d));
        assert!(!cond("a = '1'", &d));
        assert!(
            !cond("NOT (a = '1')", &d),
            "undefined stays undefined under NOT"
        );
        assert!(cond("a = '1' OR t", &d));
        assert!(!cond("missing = 1 OR missing != 1", &d));
        assert!(cond(
            "IS_NULL(n) AND IS_DEFINED(n) AND NOT IS_DEFINED(missing)",
            &d
        ));
        assert!(!cond("s", &d), "a string is not true");
    }

    #[test]
    fn functions() {
        let d = json!({"s": "Seattle", "num": "42.5", "arr": [1, 2, 3], "x": -4});
        assert!(cond(
            "LENGTH(s) = 7 AND LOWER(s) = 'seattle' AND UPPER(s) = 'SEATTLE'",
            &d
        ));
        assert!(cond(
            "SUBSTRING(s, 0, 3) = 'Sea' AND INDEX_OF(s, 'tt') = 3 AND INDEX_OF(s, 'z') = -1",
            &d
        ));
        assert!(cond(
            "STARTS_WITH(s, 'Se') AND ENDS_WITH(s, 'le') AND CONTAINS(s, 'att')",
            &d
        ));
        assert!(cond(
            "AS_NUMBER(num) = 42.5 AND NOT IS_DEFINED(AS_NUMBER(s))",
            &d
        ));
        assert!(cond(
            "ABS(x) = 4 AND SQUARE(x) = 16 AND POWER(2, 3) = 8 AND SQRT(16) = 4",
            &d
        ));
        assert!(cond(
            "FLOOR(1.5) = 1 AND CEILING(1.5) = 2 AND SIGN(x) = -1",
            &d
        ));
        assert!(cond("CONCAT(s, '-', 'WA') = 'Seattle-WA'", &d));
        assert!(cond(
            "ARRAY_CONTAINS(arr, 2) AND NOT ARRAY_CONTAINS(arr, 9)",
            &d
        ));
        assert!(cond(
            "x IN [-4, 5] AND x NIN [1, 2] AND 7 % 4 = 3 AND 1 + 2 * 3 = 7",
            &d
        ));
        assert!(!cond("1 / 0 = 1", &d));
    }

    #[test]
    fn group_by_and_aggregates() {
        let twins = [
            json!({"deviceId": "a", "properties": {"reported": {"status": "ok", "t": 10}}}),
            json!({"deviceId": "b", "properties": {"reported": {"status": "ok", "t": 20}}}),
            json!({"deviceId": "c", "properties": {"reported": {"status": "bad", "t": 5}}}),
        ];
        let q = parse_query(
            "SELECT properties.reported.status AS status, COUNT() AS n, AVG(properties.reported.t) AS avgT FROM devices GROUP BY properties.reported.status",
        )
        .expect("valid");
        let rows = execute(&q, twins.iter()).expect("runs");
        assert_eq!(
            rows,
            vec![
                json!({"status": "bad", "n": 1, "avgT": 5}),
                json!({"status": "ok", "n": 2, "avgT": 15})
            ]
        );
        let q = parse_query("SELECT COUNT() AS total FROM devices WHERE properties.reported.t > 6")
            .expect("valid");
        assert_eq!(
            execute(&q, twins.iter()).expect("runs"),
            vec![json!({"total": 2})]
        );
        let q = parse_query(
            "SELECT TOP 1 deviceId FROM devices WHERE devices.properties.reported.t >= 10",
        )
        .expect("valid");
        assert_eq!(
            execute(&q, twins.iter()).expect("runs"),
            vec![json!({"deviceId": "a"})]
        );
        let q = parse_query(
            "SELECT deviceId, COUNT() AS n FROM devices GROUP BY properties.reported.status",
        )
        .expect("valid");
        assert!(
            execute(&q, twins.iter()).is_err(),
            "selected field not grouped"
        );
    }

    #[test]
    fn case_insensitive_top_level_names() {
        let d = json!({"lastActivityTime": "t", "tags": {"Site": "a"}});
        assert!(cond("LastActivityTime = 't'", &d));
        assert!(!cond("tags.site = 'a'", &d), "user keys are case-sensitive");
    }
}
