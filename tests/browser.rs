//! The playground in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/browser/playground.mjs`) against `tiller serve` on the default model. Screenshots of
//! each view go to `artifacts/playground/`.
//!
//! Needs `node`, `/usr/bin/chromium` (or `CHROMIUM`) and `tests/browser/node_modules`
//! (`scripts/install_browser.sh` installs all three). Without them the test says so and
//! passes, unless `TILLER_REQUIRE_BROWSER=1` (set by `.ci/run`), where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn the_playground_works_in_headless_chromium() {
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
    let server = common::Server::start(&[]);
    let out = PathBuf::from("artifacts/playground");
    let result = Command::new("node")
        .arg("tests/browser/playground.mjs")
        .arg(server.url())
        .arg(&out)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    println!("{stdout}");
    assert!(
        result.status.success(),
        "playground checks failed:\n{stdout}\n{stderr}"
    );
    for view in ["compare", "sweep", "heatmap", "vectors"] {
        assert!(
            out.join(format!("{view}.png")).exists(),
            "no screenshot of {view}"
        );
    }
}
