//! The atomic-write claim, tested by killing a writer process (SIGKILL) at random moments:
//! the store must then hold a complete old or new version, never a broken file.

use std::process::Command;
use std::time::Duration;
use tiller::steering::store::{ModelShape, VectorStore};

#[test]
fn a_writer_killed_mid_write_leaves_a_whole_version() {
    const WIDTH: usize = 1 << 18; // 1 MiB per version, so a kill often lands mid-write.
    let dir = tempfile::tempdir().unwrap();
    let mut seen_versions = Vec::new();
    for (round, delay_ms) in [40u64, 90, 150, 230, 330, 470].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiller"))
            .args([
                "vectors",
                "stress-write",
                "--name",
                "hot",
                "--count",
                "100000",
                "--width",
            ])
            .arg(WIDTH.to_string())
            .arg("--dir")
            .arg(dir.path())
            .spawn()
            .expect("start the writer");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().expect("kill the writer");
        child.wait().unwrap();
        let shape = ModelShape {
            model_id: "stress".into(),
            d_model: WIDTH,
            n_neurons: WIDTH,
            head_width: WIDTH,
        };
        let (store, skipped) = VectorStore::open(shape, Some(dir.path())).unwrap();
        assert!(skipped.is_empty(), "round {round}: {skipped:?}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "hot.safetensors")
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
        if let Some(e) = store.get("hot") {
            let v = e.vector.meta.version;
            let values = &e.vector.layers[&0];
            assert_eq!(values.len(), WIDTH);
            assert!(
                values.iter().all(|&x| x == v as f32),
                "round {round}: version {v} has mixed content"
            );
            seen_versions.push(v);
        }
    }
    // Versions only ever grow across kills (each writer resumes from the stored one).
    assert!(
        seen_versions.windows(2).all(|w| w[0] <= w[1]),
        "{seen_versions:?}"
    );
    assert!(
        !seen_versions.is_empty(),
        "the writer never finished a version"
    );
}
