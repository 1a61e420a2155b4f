//! The official OpenAI Python client (`pip install openai`) against a running server on the
//! default model: plain, streamed, steered via `extra_headers` and `extra_body`, and errors.

mod common;

#[test]
fn the_official_openai_python_client_works() {
    let python = common::python_with(&["openai==3.57.0"]);
    let server = common::Server::start(&[]);
    let out = std::process::Command::new(&python)
        .arg("tests/clients/openai_client.py")
        .arg("--base-url")
        .arg(format!("{}/v1", server.url()))
        .output()
        .expect("run the client script");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the OpenAI client checks failed:\n{log}"
    );
    assert!(log.contains("all OpenAI client checks passed"), "{log}");
}
