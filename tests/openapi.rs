//! The OpenAPI document: generated from the code, committed, and complete.

mod common;

use serde_json::Value;

#[test]
fn committed_openapi_matches_the_code() {
    let committed = std::fs::read_to_string("openapi/openapi.json").unwrap_or_default();
    let generated = tiller::api::openapi_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date: run `cargo run -- openapi` and commit the result"
    );
}

fn properties(schema: &Value) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = schema["properties"]
        .as_object()
        .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for sub in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(properties(sub));
    }
    out
}

fn nested(p: &Value) -> impl Iterator<Item = &Value> {
    p["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(p["allOf"].as_array().into_iter().flatten())
}

/// Every field of every schema has a description; every field that is not a reference to
/// another (documented) schema has an example.
#[test]
fn every_wire_field_has_a_description_and_an_example() {
    let doc: Value = serde_json::from_str(&tiller::api::openapi_json()).unwrap();
    let mut missing = Vec::new();
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        for (prop, p) in properties(schema) {
            let described = p.get("description").is_some()
                || nested(&p).any(|o| o.get("description").is_some());
            let is_ref = p.get("$ref").is_some()
                || nested(&p).any(|o| o.get("$ref").is_some())
                || p["items"].get("$ref").is_some();
            let example = p.get("example").is_some() || p.get("examples").is_some();
            if !described || (!example && !is_ref) {
                missing.push(format!("{name}.{prop}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields without a description or example: {missing:?}"
    );
}

#[test]
fn every_route_is_documented_with_its_errors() {
    let doc: Value = serde_json::from_str(&tiller::api::openapi_json()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/vectors",
        "/vectors/{name}",
        "/vectors/extract",
        "/inspect/activations",
        "/inspect/logprobs",
        "/inspect/neurons/top",
        "/info",
        "/health",
        "/ready",
    ] {
        assert!(paths.contains_key(route), "{route} is not documented");
    }
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let codes: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            assert!(
                codes.iter().any(|c| c.starts_with('2')),
                "{method} {path} has no success response"
            );
            if !matches!(path.as_str(), "/health" | "/ready") {
                assert!(
                    codes.iter().any(|c| c.starts_with('4')),
                    "{method} {path} documents no error"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_server_serves_its_document() {
    let s = common::tiny_state(common::test_config(None));
    let r = common::get(&s, "/openapi.json").await;
    assert_eq!(r.status, axum::http::StatusCode::OK);
    assert_eq!(r.text(), tiller::api::openapi_json());
}
