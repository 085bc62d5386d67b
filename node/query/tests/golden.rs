//! Golden-file suite: the documentation's twin queries and routing conditions, with the results
//! and errors they must give (`tests/golden/*.json`).

use std::path::Path;

use meridian_query::ast::{Path as PropertyPath, Segment};
use meridian_query::{Document, evaluate_condition, execute, parse_condition, parse_query};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn twin_queries() {
    let twins = load("twins.json");
    let twins = twins.as_array().expect("array of twins");
    let cases = load("queries.json");
    for case in cases.as_array().expect("array of cases") {
        let text = case["query"].as_str().expect("query");
        let result = parse_query(text).and_then(|q| execute(&q, twins.iter()));
        match (&case["error"], result) {
            (Value::String(expected), Err(e)) => {
                assert!(
                    e.message.contains(expected.as_str()),
                    "{text}: got error {e}, want {expected}"
                )
            }
            (Value::String(expected), Ok(rows)) => {
                panic!("{text}: want error {expected}, got {rows:?}")
            }
            (_, Err(e)) => panic!("{text}: {e}"),
            (_, Ok(rows)) => {
                if let Some(ids) = case["ids"].as_array() {
                    let got: Vec<Value> = rows.iter().map(|r| r["deviceId"].clone()).collect();
                    assert_eq!(&got, ids, "{text}");
                }
                if let Some(expected) = case["rows"].as_array() {
                    assert_eq!(&rows, expected, "{text}");
                }
            }
        }
    }
}

/// A routed message as the routing engine will present it.
struct Message<'a>(&'a Value);

impl Document for Message<'_> {
    fn resolve(&self, path: &PropertyPath) -> Option<Value> {
        let Some(Segment::Field(first)) = path.segments.first() else {
            return None;
        };
        let rest = &path.segments[1..];
        let m = self.0;
        match first.as_str() {
            "$body" => meridian_query::walk_value(&m["body"], rest),
            "$twin" => meridian_query::walk_value(&m["twin"], rest),
            name => {
                let find = |section: &Value, key: &str| {
                    section
                        .as_object()?
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(key))
                        .map(|(_, v)| v.clone())
                };
                match name.strip_prefix('$') {
                    Some(system) => find(&m["system"], system).or_else(|| find(&m["app"], system)),
                    None => find(&m["app"], name),
                }
            }
        }
    }
}

#[test]
fn routing_conditions() {
    let suite = load("routing.json");
    let message = Message(&suite["message"]);
    for case in suite["cases"].as_array().expect("cases") {
        let text = case["condition"].as_str().expect("condition");
        let condition = parse_condition(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            evaluate_condition(&condition, &message),
            case["result"].as_bool().expect("result"),
            "{text}"
        );
    }
}

/// Arbitrary text never panics the lexer, parser or evaluator.
#[test]
fn arbitrary_input_never_panics() {
    let twins = load("twins.json");
    let twins = twins.as_array().expect("array");
    let alphabet: Vec<char> =
        "SELECT*FROMdevicesWHEREandorNOTIN[]()'\"=<>!.,0x1F9 $body-+/%groupBY TOP\\u0041 [[a]]"
            .chars()
            .collect();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = [
        "SELECT * FROM devices WHERE tags.a = 1 AND properties.reported.b IN ['x', 2]",
        "SELECT x AS y, COUNT() AS n FROM devices GROUP BY x",
        "$body.a[0].b > 3 OR length(s) = 2",
    ];
    for round in 0..20_000 {
        let mut text: Vec<char> = seeds[round % seeds.len()].chars().collect();
        for _ in 0..(next() % 6 + 1) {
            let pos = (next() as usize) % (text.len() + 1);
            match next() % 3 {
                0 if pos < text.len() => {
                    text.remove(pos);
                }
                _ => text.insert(
                    pos.min(text.len()),
                    alphabet[(next() as usize) % alphabet.len()],
                ),
            }
        }
        let text: String = text.into_iter().collect();
        if let Ok(q) = parse_query(&text) {
            let _ = execute(&q, twins.iter());
        }
        if let Ok(c) = parse_condition(&text) {
            let _ = evaluate_condition(&c, &Message(&twins[0]));
        }
    }
}
