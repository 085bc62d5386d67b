//! Fuzzes the query language: arbitrary text through the lexer, parser and evaluator (twin queries
//! and routing conditions) must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let twin = serde_json::json!({
        "deviceId": "d1",
        "tags": {"a": {"b": [1, 2, {"c": "x"}]}},
        "properties": {"reported": {"n": 1.5, "s": "text", "t": true, "z": null}}
    });
    if let Ok(query) = meridian_query::parse_query(text) {
        let _ = meridian_query::execute(&query, std::iter::once(&twin));
    }
    if let Ok(condition) = meridian_query::parse_condition(text) {
        let doc = meridian_query::JsonDocument { value: &twin, prefix: &["devices"] };
        let _ = meridian_query::evaluate_condition(&condition, &doc);
    }
});
