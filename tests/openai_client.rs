//! Real clients against a running server on the default model: the official OpenAI Python
//! client (`pip install openai`: plain, streamed, steered via `extra_headers` and
//! `extra_body`, echo scoring, errors) and lm-evaluation-harness's `local-completions` model.

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

/// lm-evaluation-harness's own `local-completions` client (its request building, remote
/// tokenizer and response parsing, installed without its heavy dependencies, which scoring
/// through an API does not use) scores and generates through tiller, steered and not.
#[test]
fn lm_evaluation_harness_scores_through_tiller() {
    common::python_with(&[
        "requests",
        "aiohttp",
        "tenacity",
        "tqdm",
        "numpy",
        "pyyaml",
        "jinja2",
        "typing_extensions",
    ]);
    let python = common::python_with(&["--no-deps", "lm_eval==0.4.13"]);
    let server = common::Server::start(&[]);
    let out = std::process::Command::new(&python)
        .arg("tests/clients/lm_eval_client.py")
        .arg("--base-url")
        .arg(server.url())
        .output()
        .expect("run the lm-eval client script");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the lm-eval checks failed:\n{log}");
    assert!(log.contains("all lm-eval client checks passed"), "{log}");
}
