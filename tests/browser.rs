//! The playground in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/browser/playground.mjs`) against `tiller serve`: on the default model and on Gemma 3
//! with their shipped golden_gate vectors, then on a tiny random model of every architecture
//! (with a random direction shipped as golden_gate, so only what does not need a real
//! model's meaning is checked). Screenshots of each view go to `artifacts/playground/`.
//!
//! Needs `node`, `/usr/bin/chromium` (or `CHROMIUM`) and `tests/browser/node_modules`
//! (`scripts/install_browser.sh` installs all three). Without them the test says so and
//! passes, unless `TILLER_REQUIRE_BROWSER=1` (set by `.ci/run`), where it fails.

mod common;

use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use std::process::Command;
use tiller::steering::formats::{self, VectorFormat};
use tiller::steering::vector::{SteeringVector, VectorKind, VectorMeta};
use tiller::testing::{pseudo_random, write_tiny_gguf, TinyArch, TinySpec};

fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        missing.push(format!("chromium ({chromium})"));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node".into());
    }
    if !Path::new("tests/browser/node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules/playwright-core (npm ci in tests/browser)".into());
    }
    missing
}

/// Runs the browser script against `server`; `weights` is `real` or `random`.
fn run_playground(server: &common::Server, out: &Path, weights: &str) {
    let result = Command::new("node")
        .arg("tests/browser/playground.mjs")
        .arg(server.url())
        .arg(out)
        .arg(weights)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    println!("{}:\n{stdout}", out.display());
    assert!(
        result.status.success(),
        "playground checks failed on {}:\n{stdout}\n{stderr}",
        out.display()
    );
    for view in ["compare", "sweep", "heatmap", "patch", "lens", "vectors"] {
        assert!(
            out.join(format!("{view}.png")).exists(),
            "no screenshot of {view} in {}",
            out.display()
        );
    }
}

/// A folder holding one built-in vector, `golden_gate`: a random direction at the middle
/// layer, strong enough to change a tiny model's text.
fn random_builtin(spec: &TinySpec) -> PathBuf {
    let dir = common::scratch_dir();
    let v: Vec<f32> = pseudo_random(spec.d_model, 3, 1.0)
        .iter()
        .map(|x| x * 6.0)
        .collect();
    let vector = SteeringVector {
        name: "golden_gate".into(),
        meta: VectorMeta {
            model: String::new(),
            d_model: spec.d_model,
            kind: VectorKind::Direction,
            method: "manual".into(),
            description: "a random direction standing in for golden_gate".into(),
            created: String::new(),
            version: 1,
        },
        layers: [(spec.n_layers / 2, v.into())].into_iter().collect(),
    };
    let bytes = formats::encode(&vector, VectorFormat::Safetensors, spec.arch.gguf_name()).unwrap();
    std::fs::write(dir.join("golden_gate.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn the_playground_works_in_headless_chromium_on_every_architecture() {
    let missing = missing_tools();
    if !missing.is_empty() {
        let msg = format!(
            "browser test needs: {}; run scripts/install_browser.sh",
            missing.join(", ")
        );
        assert!(
            std::env::var("TILLER_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let out = PathBuf::from("artifacts/playground");
    // Real weights, shipped vectors: the default model, then Gemma 3.
    run_playground(&common::Server::start(&[]), &out, "real");
    run_playground(
        &common::Server::start_model("gemma3-270m", &[]),
        &out.join("gemma3-270m"),
        "real",
    );
    // Tiny random models of every architecture.
    for arch in TinyArch::ALL {
        let spec = TinySpec::of(arch);
        let dir = common::scratch_dir();
        let model = write_tiny_gguf(&dir, &spec, GgmlDType::Q8_0).unwrap();
        let builtin = random_builtin(&spec);
        let mut env = vec![("TILLER_VECTORS_BUILTIN_DIR", builtin.to_str().unwrap())];
        if arch == TinyArch::Gemma3 {
            // Gemma 3's file has no chat template: give it the shipped Gemma one.
            env.push(("TILLER_MODEL_CHAT_TEMPLATE", "config/templates/gemma.jinja"));
        }
        let server = common::Server::start_model(&model.display().to_string(), &env);
        run_playground(
            &server,
            &out.join(format!("tiny-{}", arch.gguf_name())),
            "random",
        );
    }
}
