//! Two tiller replicas sharing a PostgreSQL vector store behind nginx, all real processes on
//! loopback: read-your-writes through the balancer, compare-and-set across replicas, changes
//! reaching the other replica, the database stopped and started, a replica killed with
//! SIGKILL mid-stream and mid-write. Also: the deployment files parse and mirror the test.

mod harness;

use harness::{request, wait_for, Nginx, Postgres, Replica, Reply};
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// A direction of the default model's width whose every value is `value`, at block 10.
fn vector_body(value: f32) -> String {
    json!({"layers": {"10": vec![value; 576]}, "description": "replica test"}).to_string()
}

fn put(addr: &str, name: &str, value: f32, headers: &[(&str, &str)]) -> Reply {
    let path = format!("/vectors/{name}");
    request(addr, "PUT", &path, headers, &vector_body(value)).unwrap()
}

fn version_on(addr: &str, name: &str) -> Option<u64> {
    let r = request(addr, "GET", &format!("/vectors/{name}"), &[], "").ok()?;
    (r.status == 200).then(|| r.json()["version"].as_u64().unwrap_or(0))
}

fn generate_with(addr: &str, name: &str) -> Reply {
    let body = json!({"prompt": "The weather today", "max_tokens": 2, "ignore_eos": true,
        "steering": [{"vector": name, "layer": 10, "coefficient": 2.0}]});
    request(addr, "POST", "/generate", &[], &body.to_string()).unwrap()
}

fn store_status(addr: &str) -> String {
    let h = request(addr, "GET", "/health", &[], "").unwrap().json();
    h["store"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Name, version and ETag of every stored vector a replica serves.
fn stored(addr: &str) -> Vec<(String, u64, String)> {
    let list = request(addr, "GET", "/vectors", &[], "").unwrap().json();
    let mut out: Vec<_> = list["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["origin"] == "stored")
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["version"].as_u64().unwrap(),
                v["etag"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// PUTs `name` on every replica at the same instant with the header `(key, value)`; their
/// statuses, sorted.
fn puts_at_once(addrs: &[&String], name: &str, key: &'static str, value: &str) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(addrs.len()));
    let threads: Vec<_> = addrs
        .iter()
        .map(|addr| {
            let (barrier, addr) = (barrier.clone(), addr.to_string());
            let (path, value) = (format!("/vectors/{name}"), value.to_string());
            std::thread::spawn(move || {
                let body = vector_body(7.0);
                barrier.wait();
                request(&addr, "PUT", &path, &[(key, &value)], &body)
                    .unwrap()
                    .status
            })
        })
        .collect();
    let mut statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    statuses.sort();
    statuses
}

/// `tiller vectors migrate` copies a folder store in (creating the tables), and a second run
/// leaves the database as it is.
fn migrate_a_folder_store(url: &str) {
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("from_folder.json");
    std::fs::write(&file, vector_body(3.0)).unwrap();
    let model = crate::common::default_model_path().display().to_string();
    let tiller = |args: &[&str]| {
        harness::run_ok(
            std::process::Command::new(env!("CARGO_BIN_EXE_tiller"))
                .args(args)
                .args(["--model", &model])
                .env("TILLER_VECTORS_DIR", folder.path().join("store")),
            &format!("tiller {args:?}"),
        )
    };
    tiller(&["vectors", "import", &file.display().to_string()]);
    let store = folder.path().join("store").display().to_string();
    let first = tiller(&["vectors", "migrate", "--from", &store, "--to", url]);
    assert!(
        first.contains("copied 1 vector(s)") && first.contains("from_folder"),
        "{first}"
    );
    let again = tiller(&["vectors", "migrate", "--from", &store, "--to", url]);
    assert!(
        again.contains("copied 0") && again.contains("same content: from_folder"),
        "{again}"
    );
}

#[test]
fn replicas_share_vectors_through_postgres_behind_nginx() {
    if let Some(why) = harness::tools_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let _serial = crate::one_at_a_time();
    let pg = Postgres::start();
    let url = pg.url();
    migrate_a_folder_store(&url);
    let env = [
        ("TILLER_STORE_URL", url.as_str()),
        ("TILLER_STORE_TIMEOUT_SECS", "2"),
    ];
    let (port_a, port_b) = (harness::free_port(), harness::free_port());
    let (mut a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Replica::start(port_a, &env));
        let b = s.spawn(|| Replica::start(port_b, &env));
        (a.join().unwrap(), b.join().unwrap())
    });
    let lb = Nginx::start(&[port_a, port_b]);
    let (a_addr, b_addr, lb_addr) = (a.addr(), b.addr(), lb.addr());
    assert_eq!(store_status(&a_addr), "ok");
    // The migrated vector is served by both, with the folder's version.
    for addr in [&a_addr, &b_addr] {
        assert_eq!(version_on(addr, "from_folder"), Some(1));
    }

    // Read-your-writes through the balancer: round-robin sends each steer to the replica
    // that did not take the write, before any change notice can be relied on.
    for i in 0..6 {
        let name = format!("rw{i}");
        assert_eq!(put(&lb_addr, &name, 1.0, &[]).status, 201);
        let r = generate_with(&lb_addr, &name);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["steering"][0]["vector_version"], 1);
    }
    // And directly: written on A, read on B at once.
    assert_eq!(put(&a_addr, "direct", 1.0, &[]).status, 201);
    assert_eq!(version_on(&b_addr, "direct"), Some(1));
    // A row no replica was told about (written with SQL, no NOTIFY) is found when a request
    // names it: the lookup, not the notice, serves it.
    pg.sql(
        "INSERT INTO tiller_vectors SELECT model, 'unannounced', version, etag, deleted, kind, \
         method, description, width, layers, data, now() FROM tiller_vectors WHERE name = 'rw0'",
    );
    assert!(stored(&a_addr).iter().all(|v| v.0 != "unannounced"));
    let r = generate_with(&a_addr, "unannounced");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(version_on(&b_addr, "unannounced"), Some(1));

    // Compare-and-set from both replicas with the same ETag: exactly one wins.
    for round in 0..4 {
        let etag = put(&a_addr, "cas", round as f32, &[])
            .header("etag")
            .unwrap()
            .to_string();
        let both = [&a_addr, &b_addr];
        assert_eq!(
            puts_at_once(&both, "cas", "If-Match", &etag),
            [200, 412],
            "round {round}"
        );
        let fresh = format!("new{round}");
        assert_eq!(
            puts_at_once(&both, &fresh, "If-None-Match", "*"),
            [201, 412],
            "round {round}"
        );
    }

    // A change made on one replica reaches the other within 1 s (the other already holds the
    // name, so it answers from its copy and never asks the database).
    let rounds: usize = std::env::var("TILLER_REPLICA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    assert_eq!(put(&a_addr, "live", 0.0, &[]).status, 201);
    wait_for(Duration::from_secs(1), "B to see `live`", || {
        version_on(&b_addr, "live") == Some(1)
    });
    let mut lags = Vec::new();
    for i in 0..rounds {
        let (from, to) = if i % 2 == 0 {
            (&a_addr, &b_addr)
        } else {
            (&b_addr, &a_addr)
        };
        let r = put(from, "live", i as f32, &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json()["version"].as_u64().unwrap();
        let lag = harness::time_until(Duration::from_secs(1), "the other replica", || {
            version_on(to, "live") == Some(v)
        });
        lags.push(lag.as_secs_f64() * 1e3);
    }
    lags.sort_by(f64::total_cmp);
    eprintln!(
        "change reached the other replica: median {:.1} ms, max {:.1} ms over {rounds}",
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    assert_eq!(
        request(&a_addr, "DELETE", "/vectors/direct", &[], "")
            .unwrap()
            .status,
        204
    );
    wait_for(Duration::from_secs(1), "the delete on B", || {
        version_on(&b_addr, "direct").is_none()
    });

    // The database stops: known vectors keep steering, writes are refused with the envelope
    // and Retry-After, /ready stays ready and /health says the store is degraded.
    pg.stop();
    for addr in [&a_addr, &b_addr] {
        wait_for(Duration::from_secs(5), "the store to be degraded", || {
            store_status(addr) == "degraded"
        });
        assert_eq!(generate_with(addr, "live").status, 200);
        assert_eq!(request(addr, "GET", "/ready", &[], "").unwrap().status, 200);
        let w = put(addr, "during_outage", 1.0, &[]);
        assert_eq!(w.status, 503, "{}", w.body);
        assert_eq!(w.json()["error"]["code"], "store_unavailable");
        assert!(w.header("retry-after").is_some());
        let gone = generate_with(addr, "never_written");
        assert_eq!(gone.status, 503, "{}", gone.body);
    }
    // It comes back: both replicas reconnect and resync by themselves, a row written while
    // they were away included.
    pg.start_again();
    pg.sql(
        "INSERT INTO tiller_vectors SELECT model, 'while_away', version, etag, deleted, kind, \
         method, description, width, layers, data, now() FROM tiller_vectors WHERE name = 'rw0'",
    );
    for addr in [&a_addr, &b_addr] {
        wait_for(Duration::from_secs(10), "the store to reconnect", || {
            store_status(addr) == "ok"
        });
    }
    for addr in [&a_addr, &b_addr] {
        assert!(
            stored(addr).iter().any(|v| v.0 == "while_away"),
            "resynced on {addr}"
        );
    }
    assert_eq!(put(&a_addr, "after_outage", 1.0, &[]).status, 201);
    wait_for(
        Duration::from_secs(1),
        "B to see the write after the outage",
        || version_on(&b_addr, "after_outage") == Some(1),
    );

    // A database that accepts connections and never answers: writes fail within the
    // timeout instead of hanging, generation goes on, the listener notices by itself.
    pg.signal_all("STOP");
    let started = std::time::Instant::now();
    let w = put(&a_addr, "frozen", 1.0, &[]);
    assert_eq!(w.status, 503, "{}", w.body);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(generate_with(&b_addr, "live").status, 200);
    for addr in [&a_addr, &b_addr] {
        wait_for(
            Duration::from_secs(8),
            "a frozen database to be noticed",
            || store_status(addr) == "degraded",
        );
    }
    pg.signal_all("CONT");
    for addr in [&a_addr, &b_addr] {
        wait_for(Duration::from_secs(10), "the store to recover", || {
            store_status(addr) == "ok"
        });
    }
    assert_eq!(put(&b_addr, "thawed", 1.0, &[]).status, 201);
    wait_for(
        Duration::from_secs(1),
        "A to see the write after the freeze",
        || version_on(&a_addr, "thawed") == Some(1),
    );

    // A replica killed mid-stream loses only its own request; nginx sends new requests to
    // the live one, and nothing stored is lost.
    let before = stored(&b_addr);
    let mut stream = std::net::TcpStream::connect(&a_addr).unwrap();
    let body = json!({"prompt": "Tell me a long story", "max_tokens": 400, "stream": true,
        "ignore_eos": true, "steering": [{"vector": "live", "layer": 10, "coefficient": 1.0}]})
    .to_string();
    use std::io::{Read, Write};
    write!(
        stream,
        "POST /generate HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 256];
    assert!(stream.read(&mut first).unwrap() > 0);
    // Writes in flight on A when it dies: each is committed whole or not at all.
    let writer = {
        let a_addr = a_addr.clone();
        std::thread::spawn(move || {
            let mut acked = 0u64;
            for k in 1..=10_000u64 {
                match request(
                    &a_addr,
                    "PUT",
                    "/vectors/burst",
                    &[],
                    &vector_body(k as f32),
                ) {
                    Ok(r) if r.status == 200 || r.status == 201 => acked = k,
                    _ => break,
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    a.kill();
    let acked = writer.join().unwrap();
    assert!(acked > 0, "no write reached A before it was killed");
    for _ in 0..4 {
        assert_eq!(generate_with(&lb_addr, "live").status, 200);
    }
    // Every acknowledged write is there, and the stored one is whole: its values are the
    // ones written with its version.
    wait_for(
        Duration::from_secs(2),
        "B to see the last burst write",
        || version_on(&b_addr, "burst").is_some_and(|v| v >= acked),
    );
    let burst = request(&b_addr, "GET", "/vectors/burst?format=json", &[], "")
        .unwrap()
        .json();
    let version = burst["version"].as_u64().unwrap();
    assert!(
        version == acked || version == acked + 1,
        "{version} vs {acked}"
    );
    let values: Vec<f64> = serde_json::from_value(burst["layers"]["10"].clone()).unwrap();
    assert!(
        values.iter().all(|&x| x == version as f64),
        "version {version}: {:?}",
        &values[..4]
    );
    let mut after: Vec<_> = stored(&b_addr)
        .into_iter()
        .filter(|v| v.0 != "burst")
        .collect();
    after.sort();
    assert_eq!(after, before);
    // Restarted, A loads everything from the database.
    a.restart();
    assert_eq!(stored(&a_addr), stored(&b_addr));
    drop(lb);
}

/// The deployment files parse, and say what the test starts: PostgreSQL, two replicas on one
/// database, nginx with the tested config; Kubernetes probes on /ready and /health, a grace
/// period longer than the server's, a disruption budget, a service and an autoscaler on the
/// queue depth.
#[test]
fn deployment_files_parse_and_match_the_tested_setup() {
    let python = crate::common::python_with(&["pyyaml==6.0.2"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = [
        "docker/compose.yaml",
        "docker/k8s/examples/store-secret.yaml",
    ]
    .into_iter()
    .map(String::from)
    .chain(
        std::fs::read_dir(root.join("docker/k8s"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| format!("docker/k8s/{}", e.file_name().to_string_lossy())),
    )
    .collect::<Vec<_>>();
    let script = "import json, sys, yaml\n\
        print(json.dumps({f: list(yaml.safe_load_all(open(f))) for f in sys.argv[1:]}))";
    let out = harness::run_ok(
        std::process::Command::new(&python)
            .current_dir(root)
            .args(["-c", script])
            .args(&files),
        "parsing the deployment files",
    );
    let docs: Value = serde_json::from_str(&out).unwrap();
    let compose = &docs["docker/compose.yaml"][0]["services"];
    for svc in ["postgres", "tiller-a", "tiller-b", "nginx"] {
        assert!(compose[svc].is_object(), "compose service {svc}");
    }
    let url_of = |svc: &str| compose[svc]["environment"]["TILLER_STORE_URL"].clone();
    assert!(url_of("tiller-a")
        .as_str()
        .is_some_and(|u| u.starts_with("postgres://")));
    assert_eq!(url_of("tiller-a"), url_of("tiller-b"));
    // Every setting the files give tiller is one it reads.
    let mut settings: Vec<(String, String)> = Vec::new();
    for svc in ["tiller-a", "tiller-b"] {
        for (k, v) in compose[svc]["environment"].as_object().unwrap() {
            settings.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    let volumes = compose["nginx"]["volumes"].to_string();
    assert!(
        volumes.contains("./nginx.conf:/etc/nginx/nginx.conf"),
        "{volumes}"
    );

    let k8s: Vec<&Value> = docs
        .as_object()
        .unwrap()
        .iter()
        .filter(|(f, _)| f.starts_with("docker/k8s/"))
        .flat_map(|(_, d)| d.as_array().unwrap())
        .collect();
    let of_kind =
        |kind: &str| -> Vec<&Value> { k8s.iter().copied().filter(|d| d["kind"] == kind).collect() };
    let deployment = of_kind("Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let server_grace = tiller::config::Config::default().server.shutdown_grace_secs;
    assert!(
        grace > server_grace,
        "grace {grace} s vs shutdown_grace_secs {server_grace}"
    );
    let env = container["env"].to_string();
    assert!(env.contains("TILLER_STORE_URL"), "{env}");
    assert!(
        env.contains(&format!("\"value\":\"{server_grace}\"")),
        "{env}"
    );
    for pair in container["env"].as_array().unwrap() {
        let value = pair["value"]
            .as_str()
            .unwrap_or("postgres://from-a-secret/db");
        settings.push((
            pair["name"].as_str().unwrap().to_string(),
            value.to_string(),
        ));
    }
    tiller::config::Config::load(None, settings, &[]).expect("the files' settings load");
    assert!(!of_kind("Secret").is_empty(), "the example secret");
    assert!(container["lifecycle"]["preStop"].is_object());
    let init = pod["initContainers"][0]["args"].to_string();
    assert!(init.contains("fetch-model"), "{init}");
    assert!(!of_kind("PodDisruptionBudget").is_empty());
    assert!(!of_kind("Service").is_empty());
    let hpa = of_kind("HorizontalPodAutoscaler")[0].to_string();
    assert!(hpa.contains("tiller_queue_depth"), "{hpa}");
}
