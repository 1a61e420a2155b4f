//! API fuzzing with schemathesis (PyPI) against `openapi/openapi.json` on a live server on the
//! default model: thousands of generated requests, valid and not, to every operation
//! (examples, boundary values, random data, and stateful sequences that create and then use
//! vectors and SAEs). No response may be a 5xx, and every response must match its documented
//! status codes, content type and schema. Limits are tightened so that no generated request
//! is expensive.

mod common;

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let python = common::python_with(&["schemathesis==4.32.5"]);
    let cli = python.with_file_name("schemathesis");
    let server = common::Server::start(&[
        ("TILLER_LIMITS_MAX_TOKENS", "8"),
        ("TILLER_LIMITS_DEFAULT_MAX_TOKENS", "4"),
        ("TILLER_LIMITS_MAX_PROMPT_TOKENS", "64"),
        ("TILLER_VECTORS_MAX_EXTRACT_EXAMPLES", "8"),
        ("TILLER_LIMITS_MAX_PATCH_CELLS", "64"),
        ("TILLER_LIMITS_MAX_PATCH_PROMPT_TOKENS", "16"),
    ]);
    let out = std::process::Command::new(&cli)
        .args(["run", "openapi/openapi.json", "--url"])
        .arg(server.url())
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "40",
            "--seed",
            "20261201",
            "--request-timeout",
            "60",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures:\n{log}");
    assert!(log.contains("passed"), "{log}");
}
