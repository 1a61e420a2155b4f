//! The real parts of a replicated deployment, on loopback: a private PostgreSQL cluster
//! (initdb in a temporary folder, no system service), tiller replicas on fixed ports, and
//! nginx started with `docker/nginx.conf`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where PostgreSQL's server programs are (Debian keeps them out of `PATH`).
fn postgres_bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut candidates: Vec<PathBuf> = from_pg_config.into_iter().collect();
    if let Ok(read) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = read.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|d| d.join("initdb").exists())
}

fn nginx_bin() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs `cmd` to the end; its standard output. Fails the test, with the command's error
/// output, when it does not succeed.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether the test can run here; when it cannot, the reason. With
/// `TILLER_REQUIRE_REPLICA_TOOLS=1` (CI) a missing tool fails the test instead.
pub fn tools_missing() -> Option<String> {
    let missing = match (postgres_bindir(), nginx_bin()) {
        (None, _) => "PostgreSQL's initdb (apt-get install postgresql)",
        (_, None) => "nginx (apt-get install nginx-light)",
        _ => return None,
    };
    let msg = format!("replica test needs {missing}");
    assert!(
        std::env::var("TILLER_REQUIRE_REPLICA_TOOLS").as_deref() != Ok("1"),
        "{msg}"
    );
    Some(msg)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A private PostgreSQL cluster on a free loopback port, removed when dropped.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// The server programs as the user that owns the cluster: PostgreSQL refuses to run as
    /// root, so as root they run as `postgres` (Debian's package creates it).
    fn command(&self, program: &str) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        }
    }

    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let ok = Command::new("chown")
                .args(["postgres:", &data.display().to_string()])
                .status()
                .unwrap();
            assert!(ok.success(), "chown of the cluster folder to postgres");
        }
        let pg = Postgres {
            data,
            bin: postgres_bindir().expect("initdb"),
            port: free_port(),
            _dir: dir,
        };
        run_ok(
            pg.command("initdb").arg("-D").arg(&pg.data).args([
                "-U",
                "tiller",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        );
        pg.start_again();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://tiller@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
            self.port
        );
        run_ok(
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.data.join("log"))
                .args(["-o", &options, "-w", "start"]),
            "pg_ctl start",
        );
    }

    /// Runs SQL with psql as the cluster's superuser; its output.
    pub fn sql(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run_ok(
            Command::new(self.bin.join("psql"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "tiller",
                    "-d",
                    "postgres",
                ])
                .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql]),
            "psql",
        );
        out.trim().to_string()
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server and all its processes: a database that
    /// accepts connections and never answers.
    pub fn signal_all(&self, signal: &str) {
        let Ok(pid) = std::fs::read_to_string(self.data.join("postmaster.pid")) else {
            return;
        };
        let pid = pid.lines().next().unwrap_or_default().trim().to_string();
        let _ = Command::new("pkill")
            .args([&format!("-{signal}"), "-P", &pid])
            .status();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
    }

    /// Stops the cluster at once (open connections are cut).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    /// Thaws the server first: a test that fails while it is frozen must not leave it
    /// stopped (a frozen postmaster never handles the stop signal).
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            self.signal_all("CONT");
        }
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One tiller replica on a fixed port (so that it can be killed and started again behind the
/// same nginx upstream).
pub struct Replica {
    child: Option<Child>,
    pub port: u16,
    env: Vec<(String, String)>,
}

impl Replica {
    pub fn start(port: u16, env: &[(&str, &str)]) -> Replica {
        let mut r = Replica {
            child: None,
            port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.restart();
        r
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) and waits for `/ready`.
    pub fn restart(&mut self) {
        let model = crate::common::default_model_path();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiller"));
        cmd.args(["serve", "--port", &self.port.to_string(), "--model"])
            .arg(&model)
            .env("TILLER_SAES_DIR", crate::common::scratch_dir())
            .env("TILLER_LOG_LEVEL", "warn");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start tiller serve"));
        wait_for(
            Duration::from_secs(120),
            "the replica to become ready",
            || request(&self.addr(), "GET", "/ready", &[], "").is_ok_and(|r| r.status == 200),
        );
    }

    /// SIGKILL: no shutdown, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx in front of the replicas, with `docker/nginx.conf`.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl Nginx {
    pub fn start(upstreams: &[u16]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/nginx.conf"),
        )
        .unwrap();
        let d = dir.path().display();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p};\n"))
            .collect();
        let conf = shipped
            .replace("server tiller-a:8080;", &servers)
            .replace("server tiller-b:8080;", "")
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace(
                "http {",
                &format!(
                    "http {{\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n \
                     fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;"
                ),
            );
        assert!(
            conf.contains(&format!("127.0.0.1:{}", upstreams[0])),
            "{conf}"
        );
        let file = dir.path().join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        let globals = format!("daemon off; pid {d}/nginx.pid; error_log {d}/error.log warn;");
        let nginx = |test: bool| {
            let mut c = Command::new(nginx_bin().expect("nginx"));
            c.arg("-p").arg(dir.path()).arg("-c").arg(&file);
            c.args(["-g", &globals]);
            if test {
                c.arg("-t");
            }
            c
        };
        run_ok(&mut nginx(true), "nginx -t on docker/nginx.conf");
        let child = nginx(false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let nginx = Nginx {
            child,
            _dir: dir,
            port,
        };
        wait_for(Duration::from_secs(10), "nginx to listen", || {
            request(&nginx.addr(), "GET", "/health", &[], "").is_ok_and(|r| r.status == 200)
        });
        nginx
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    /// SIGTERM, so that the master stops its workers too (SIGKILL would orphan them).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Polls `ok` every 10 ms until it holds; fails the test after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if ok() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long until `ok` holds, polled every millisecond (a measurement, not a wait); fails
/// the test after `limit`.
pub fn time_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Reply> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: tiller\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    s.write_all(format!("{head}\r\n{body}").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response head: {text}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
