//! A load generator for `tiller loadgen`: N concurrent clients stream `POST /generate` on
//! loopback and report aggregate tokens/s and latency percentiles (time to first token,
//! inter-token latency, end to end), unsteered, all steered with one vector, or each with its
//! own. A small blocking HTTP/1.1 client (chunked SSE) keeps it free of extra dependencies and
//! light on the CPU the server needs.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How the requests of a run are steered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SteeringMode {
    None,
    /// Every request adds the same stored vector.
    Same,
    /// Every client adds its own direction (inline values).
    Different,
}

impl SteeringMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "same" => Some(Self::Same),
            "different" => Some(Self::Different),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port`.
    pub addr: String,
    pub concurrency: usize,
    pub requests_per_client: usize,
    pub max_tokens: usize,
    pub steering: SteeringMode,
    /// Stored vector for `Same`.
    pub vector: String,
    pub layer: usize,
    pub d_model: usize,
    /// Client starts are spread over this long, so arrivals are staggered as in steady
    /// traffic rather than all in one instant.
    pub stagger: Duration,
}

/// One request's timings.
#[derive(Debug, Clone, Default)]
struct RequestTiming {
    /// When the request was sent and each token arrived, in seconds from the run's start.
    sent: f64,
    arrivals: Vec<f64>,
    /// From sending to the end of the response.
    total: f64,
}

impl RequestTiming {
    /// Time to the first token (0 for a reply without tokens).
    fn ttft(&self) -> f64 {
        self.arrivals.first().map_or(0.0, |a| a - self.sent)
    }

    /// The gaps between consecutive tokens.
    fn inter_token(&self) -> impl Iterator<Item = f64> + '_ {
        self.arrivals.windows(2).map(|w| w[1] - w[0])
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub concurrency: usize,
    pub steering: SteeringMode,
    pub requests: usize,
    pub errors: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Tokens/s while every client had a request running (from the last client's first
    /// request to the first client's end), leaving out the ramps at both ends.
    pub steady_tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// Sends one streamed request; calls `on_event(name, data)` for every SSE event.
pub fn stream_post(
    addr: &str,
    path: &str,
    body: &str,
    mut on_event: impl FnMut(&str, &str),
) -> Result<u16> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    let mut sse = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("content-type: text/event-stream") {
            sse = true;
        }
        if lower == "transfer-encoding: chunked" {
            chunked = true;
        } else if let Some(v) = lower.strip_prefix("content-length: ") {
            length = v.parse::<usize>().ok();
        }
    }
    let mut pending = String::new();
    let mut feed = |text: &str, pending: &mut String| {
        if !sse {
            // A plain (JSON) body: handed over whole, as one `body` event.
            pending.push_str(text);
            return;
        }
        pending.push_str(text);
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let (mut ev, mut data) = ("message".to_string(), String::new());
            for l in block.lines() {
                if let Some(e) = l.strip_prefix("event: ") {
                    ev = e.to_string();
                } else if let Some(d) = l.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if !data.is_empty() {
                on_event(&ev, &data);
            }
        }
    };
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            let mut buf = vec![0u8; size + 2];
            r.read_exact(&mut buf)?;
            feed(&String::from_utf8_lossy(&buf[..size]), &mut pending);
        }
    } else {
        let mut body = String::new();
        match length {
            Some(n) => {
                let mut buf = vec![0u8; n];
                r.read_exact(&mut buf)?;
                body = String::from_utf8_lossy(&buf).into_owned();
            }
            None => {
                r.read_to_string(&mut body)?;
            }
        }
        feed(&body, &mut pending);
    }
    if !sse {
        let event = if status < 400 { "body" } else { "http_error" };
        on_event(event, &pending);
    }
    Ok(status)
}

fn request_body(cfg: &LoadConfig, client: usize, i: usize) -> String {
    let prompts = [
        "Tell me about yourself.",
        "What should I do this weekend?",
        "Write a short story about a lighthouse.",
        "Explain how a bicycle works.",
        "What are good habits for learning to cook?",
        "Describe your favourite city.",
        "How do plants grow?",
        "Give me advice for a job interview.",
    ];
    let prompt = prompts[(client + i) % prompts.len()];
    let steering = match cfg.steering {
        SteeringMode::None => serde_json::json!([]),
        SteeringMode::Same => {
            serde_json::json!([{"vector": cfg.vector, "layer": cfg.layer, "coefficient": 2.0}])
        }
        SteeringMode::Different => {
            // A different direction per client, of norm about 30.
            let values: Vec<f64> = (0..cfg.d_model)
                .map(|k| ((k * (client + 3)) as f64 * 0.37).sin() * 1.77)
                .collect();
            serde_json::json!([{"values": values, "layer": cfg.layer, "coefficient": 1.0}])
        }
    };
    serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": cfg.max_tokens,
        "ignore_eos": true,
        "stream": true,
        "steering": steering,
    })
    .to_string()
}

/// Runs the load and measures it.
pub fn run(cfg: &LoadConfig) -> Result<LoadReport> {
    if cfg.concurrency == 0 || cfg.requests_per_client == 0 {
        bail!("concurrency and requests must be at least 1");
    }
    let started = Instant::now();
    let handles: Vec<_> = (0..cfg.concurrency)
        .map(|c| {
            let cfg = cfg.clone();
            std::thread::spawn(move || -> (Vec<RequestTiming>, usize) {
                let since = |t: Instant| (t - started).as_secs_f64();
                let delay = cfg.stagger.mul_f64(c as f64 / cfg.concurrency as f64);
                std::thread::sleep(delay);
                let mut out = Vec::new();
                let mut errors = 0;
                for i in 0..cfg.requests_per_client {
                    let body = request_body(&cfg, c, i);
                    let t0 = Instant::now();
                    let mut timing = RequestTiming {
                        sent: since(t0),
                        ..Default::default()
                    };
                    let mut failed = false;
                    let status = stream_post(&cfg.addr, "/generate", &body, |ev, _| match ev {
                        "token" => timing.arrivals.push(since(Instant::now())),
                        "error" | "http_error" => failed = true,
                        _ => {}
                    });
                    timing.total = t0.elapsed().as_secs_f64();
                    if failed || !matches!(status, Ok(200)) {
                        errors += 1;
                    } else {
                        out.push(timing);
                    }
                }
                (out, errors)
            })
        })
        .collect();
    let mut clients = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (t, e) = h.join().map_err(|_| anyhow!("a client thread panicked"))?;
        clients.push(t);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let steady = steady_rate(&clients);
    let timings: Vec<RequestTiming> = clients.into_iter().flatten().collect();
    let tokens: usize = timings.iter().map(|t| t.arrivals.len()).sum();
    let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft() * 1e3).collect();
    let mut itl: Vec<f64> = timings
        .iter()
        .flat_map(|t| t.inter_token().map(|x| x * 1e3))
        .collect();
    let mut e2e: Vec<f64> = timings.iter().map(|t| t.total * 1e3).collect();
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(LoadReport {
        concurrency: cfg.concurrency,
        steering: cfg.steering,
        requests: timings.len(),
        errors,
        generated_tokens: tokens,
        seconds: round(seconds),
        tokens_per_s: round(tokens as f64 / seconds),
        steady_tokens_per_s: round(steady),
        ttft_p50_ms: round(percentile(&mut ttft, 50.0)),
        ttft_p99_ms: round(percentile(&mut ttft, 99.0)),
        itl_p50_ms: round(percentile(&mut itl, 50.0)),
        itl_p99_ms: round(percentile(&mut itl, 99.0)),
        e2e_p50_ms: round(percentile(&mut e2e, 50.0)),
        e2e_p99_ms: round(percentile(&mut e2e, 99.0)),
    })
}

/// Tokens/s of all clients while every one of them was running: from the moment the last
/// client sent its first request to the moment the first client got its last token (0 if
/// that never happened).
fn steady_rate(clients: &[Vec<RequestTiming>]) -> f64 {
    let from = clients
        .iter()
        .map(|t| t.first().map_or(f64::INFINITY, |r| r.sent))
        .fold(0f64, f64::max);
    let until = clients
        .iter()
        .map(|t| {
            t.last()
                .and_then(|r| r.arrivals.last().copied())
                .unwrap_or(0.0)
        })
        .fold(f64::INFINITY, f64::min);
    if until <= from {
        return 0.0;
    }
    let tokens = clients
        .iter()
        .flatten()
        .flat_map(|t| &t.arrivals)
        .filter(|&&a| a > from && a <= until)
        .count();
    tokens as f64 / (until - from)
}

/// Sends one JSON request and returns the status and body (tests and tools).
pub fn post_json(addr: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut text = String::new();
    let status = stream_post(addr, path, body, |_, data| text.push_str(data))?;
    Ok((status, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 50.0), 51.0);
        assert_eq!(percentile(&mut xs, 99.0), 99.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }

    /// Time to first token and the gaps between tokens come from the arrival times.
    #[test]
    fn latencies_come_from_the_arrivals() {
        let r = RequestTiming {
            sent: 1.0,
            arrivals: vec![1.25, 1.5, 2.0],
            total: 1.1,
        };
        assert_eq!(r.ttft(), 0.25);
        assert_eq!(r.inter_token().collect::<Vec<_>>(), vec![0.25, 0.5]);
        assert_eq!(RequestTiming::default().ttft(), 0.0);
        assert_eq!(RequestTiming::default().inter_token().count(), 0);
    }

    /// The steady rate counts only the tokens that arrived while every client was running.
    #[test]
    fn the_steady_window_leaves_out_the_ramps() {
        let request = |sent: f64, arrivals: &[f64]| RequestTiming {
            sent,
            arrivals: arrivals.to_vec(),
            ..Default::default()
        };
        // Client 0 runs from 0 to 4, client 1 from 1 to 5: the window is (1, 4].
        let clients = vec![
            vec![request(0.0, &[0.5, 1.5, 2.0]), request(2.0, &[3.0, 4.0])],
            vec![request(1.0, &[2.5, 3.5, 4.5, 5.0])],
        ];
        // In the window: 1.5, 2.0, 3.0, 4.0 and 2.5, 3.5: 6 tokens in 3 s.
        assert_eq!(steady_rate(&clients), 2.0);
        // A client with no successful request: no window.
        assert_eq!(steady_rate(&[clients[0].clone(), vec![]]), 0.0);
    }
}
