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

/// utoipa names a schema after its type: two wire types of the same name would share one
/// schema in the document, and one of them would be described wrongly. Every `ToSchema` type
/// in the source has its own name (or a `#[schema(as = …)]` one).
#[test]
fn schema_names_are_unique() {
    fn rs_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rs_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    rs_files(std::path::Path::new("src"), &mut files);
    let mut seen = std::collections::BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let derives = l.contains("derive(") && l.contains("ToSchema");
            if !derives && !l.trim().ends_with("ToSchema,") {
                continue;
            }
            let mut renamed = None;
            for next in lines.iter().skip(i + 1).take(6) {
                if let Some(r) = next.split("schema(as = ").nth(1) {
                    renamed = r.split(')').next().map(str::to_string);
                }
                let decl = next.trim_start();
                if let Some(rest) = decl
                    .strip_prefix("pub struct ")
                    .or(decl.strip_prefix("pub enum "))
                {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    let name = renamed.take().unwrap_or(name);
                    if let Some(other) = seen.insert(name.clone(), f.display().to_string()) {
                        panic!("two schemas named {name}: {other} and {}", f.display());
                    }
                    break;
                }
            }
        }
    }
    assert!(seen.len() > 50, "found only {} schema types", seen.len());
}
