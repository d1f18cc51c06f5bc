//! `marlin bench serve`: output throughput, time to first token and inter-token latency of
//! `marlin serve` at several concurrency levels, measured by a streaming client as vLLM's
//! benchmark_serving does.
//!
//! Each level keeps CONCURRENCY requests in flight until REQUESTS (default 2 × concurrency, at
//! least 8) have finished. Every request is a chat prompt unique to it (`Story {i}: ...`) with
//! `max_tokens` = --gen-tokens and `ignore_eos`, so it generates exactly that many tokens. TTFT is
//! the time to the first streamed text; ITL the time between streamed text chunks.
//!
//! The client runs beside the server and takes CPU from it; on a small machine that cost is
//! part of what a level measures, so it is kept small: one connection per request, HTTP/1.1 on
//! hyper, a line scan for `data:` events and a JSON parse of each.

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const TOPICS: [&str; 16] = [
    "the sea",
    "a cat",
    "mountains",
    "coffee",
    "rain",
    "the moon",
    "a robot",
    "autumn",
    "bread",
    "music",
    "a river",
    "snow",
    "a library",
    "the desert",
    "bees",
    "trains",
];

/// What `marlin bench serve` was asked for.
pub struct Plan {
    /// `host:port` of a running server; `None` starts `marlin serve` on a free port.
    pub address: Option<String>,
    /// Flags for the `marlin serve` it starts.
    pub serve_args: Vec<String>,
    pub concurrency: Vec<usize>,
    pub requests: Option<usize>,
    pub max_tokens: usize,
    pub json: bool,
}

/// One level's figures.
struct Level {
    concurrency: usize,
    requests: usize,
    output_tokens: usize,
    seconds: f64,
    ttft_ms: [f64; 3],
    itl_ms: [f64; 3],
}

impl Level {
    fn tok_s(&self) -> f64 {
        self.output_tokens as f64 / self.seconds
    }

    fn to_json(&self) -> Value {
        json!({
            "concurrency": self.concurrency,
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "seconds": self.seconds,
            "output_tok_s": self.tok_s(),
            "ttft_p50_ms": self.ttft_ms[0],
            "ttft_p95_ms": self.ttft_ms[1],
            "ttft_p99_ms": self.ttft_ms[2],
            "itl_p50_ms": self.itl_ms[0],
            "itl_p95_ms": self.itl_ms[1],
            "itl_p99_ms": self.itl_ms[2],
        })
    }
}

/// The server `bench serve` started; stopped when dropped, whatever happened meanwhile.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `host:port` from `http://host:port[/]`.
pub fn address_of(url: &str) -> Result<String> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("--url {url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") || !matches!(uri.path(), "" | "/") {
        bail!("--url must look like http://HOST:PORT (plain HTTP, no path), got {url:?}");
    }
    let authority = uri
        .authority()
        .with_context(|| format!("--url {url:?} has no host"))?;
    Ok(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    ))
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port to serve on")?;
    Ok(listener.local_addr()?.port())
}

pub fn run(plan: Plan) -> Result<()> {
    if plan.concurrency.contains(&0) {
        bail!("--concurrency levels must be at least 1");
    }
    if plan.max_tokens == 0 {
        bail!("--gen-tokens must be at least 1 for bench serve");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (address, _server) = match &plan.address {
        Some(address) => (address.clone(), None),
        None => {
            let port = free_port()?;
            let child = Command::new(std::env::current_exe()?)
                .arg("serve")
                .args(["--port", &port.to_string()])
                .args(&plan.serve_args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting marlin serve")?;
            let mut server = Server(child);
            let address = format!("127.0.0.1:{port}");
            runtime.block_on(wait_healthy(&address, &mut server.0))?;
            (address, Some(server))
        }
    };
    runtime.block_on(async {
        let model = served_model(&address).await?;
        // Warm-up: page in the weights and the first KV blocks.
        run_level(&address, &model, 1, 1, 8).await?;
        let mut levels = Vec::new();
        for &c in &plan.concurrency {
            let requests = plan.requests.unwrap_or((2 * c).max(8));
            let level = run_level(&address, &model, c, requests, plan.max_tokens).await?;
            if plan.json {
                println!("{}", level.to_json());
            }
            levels.push(level);
        }
        if !plan.json {
            print_table(&levels);
        }
        Ok(())
    })
}

fn print_table(levels: &[Level]) {
    println!(
        "| concurrency | requests | output tok/s | TTFT p50 / p95 / p99 (ms) | ITL p50 / p95 / p99 (ms) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for l in levels {
        println!(
            "| {} | {} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} |",
            l.concurrency,
            l.requests,
            l.tok_s(),
            l.ttft_ms[0],
            l.ttft_ms[1],
            l.ttft_ms[2],
            l.itl_ms[0],
            l.itl_ms[1],
            l.itl_ms[2]
        );
    }
    if let Some((first, rest)) = levels.split_first() {
        for l in rest {
            println!(
                "throughput at {} = {:.2}x that at {}",
                l.concurrency,
                l.tok_s() / first.tok_s(),
                first.concurrency
            );
        }
    }
}

async fn wait_healthy(address: &str, server: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok((status, _)) = get(address, "/health").await {
            if status == StatusCode::OK {
                return Ok(());
            }
        }
        if let Some(status) = server.try_wait()? {
            bail!(
                "marlin serve exited ({status}) before answering /health; run it alone to see why"
            );
        }
        if Instant::now() > deadline {
            bail!("marlin serve did not become healthy within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first model id of `GET /v1/models`.
async fn served_model(address: &str) -> Result<String> {
    let (status, body) = get(address, "/v1/models").await?;
    if status != StatusCode::OK {
        bail!("GET /v1/models answered {status}");
    }
    let models: Value = serde_json::from_slice(&body).context("parsing GET /v1/models")?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("GET /v1/models lists no model")
}

/// An HTTP/1.1 connection to `address`, driven by its own task.
async fn connect(address: &str) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn get(address: &str, path: &str) -> Result<(StatusCode, Bytes)> {
    let mut sender = connect(address).await?;
    let request = Request::get(path)
        .header(hyper::header::HOST, address)
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// One streamed chat request: time to first text, the gaps between texts, completion tokens.
struct Outcome {
    ttft: f64,
    itls: Vec<f64>,
    tokens: usize,
}

async fn one_request(address: &str, model: &str, i: usize, max_tokens: usize) -> Result<Outcome> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!(
            "Story {i}: write a long story about {}.", TOPICS[i % TOPICS.len()])}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut sender = connect(address).await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header(hyper::header::HOST, address)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let start = Instant::now();
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let text = response.into_body().collect().await?.to_bytes();
        bail!(
            "POST /v1/chat/completions answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let (mut ttft, mut last, mut itls, mut tokens) = (None, start, Vec::new(), None);
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(event) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let event = event.trim_ascii_end();
            if event == b"[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_slice(event).context("parsing a streamed chunk")?;
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
            let texts = chunk["choices"].as_array().into_iter().flatten();
            if texts
                .filter_map(|c| c["delta"]["content"].as_str())
                .any(|t| !t.is_empty())
            {
                let now = Instant::now();
                match ttft {
                    None => ttft = Some((now - start).as_secs_f64()),
                    Some(_) => itls.push((now - last).as_secs_f64()),
                }
                last = now;
            }
        }
    }
    Ok(Outcome {
        ttft: ttft.context("a streamed response carried no text")?,
        itls,
        tokens: tokens.context("a streamed response carried no usage")?,
    })
}

async fn run_level(
    address: &str,
    model: &str,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
) -> Result<Level> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (address, model, next) = (address.to_owned(), model.to_owned(), next.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return Ok::<_, anyhow::Error>(outcomes);
                    }
                    outcomes.push(one_request(&address, &model, i, max_tokens).await?);
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut ttfts: Vec<f64> = outcomes.iter().map(|o| o.ttft).collect();
    let mut itls: Vec<f64> = outcomes.iter().flat_map(|o| o.itls.clone()).collect();
    Ok(Level {
        concurrency,
        requests,
        output_tokens: outcomes.iter().map(|o| o.tokens).sum(),
        seconds,
        ttft_ms: percentiles_ms(&mut ttfts),
        itl_ms: percentiles_ms(&mut itls),
    })
}

/// p50, p95 and p99 in milliseconds, interpolated between neighbours (NaN when empty).
fn percentiles_ms(values: &mut [f64]) -> [f64; 3] {
    values.sort_by(f64::total_cmp);
    [50.0, 95.0, 99.0].map(|p| {
        let Some(&top) = values.last() else {
            return f64::NAN;
        };
        let k = (values.len() - 1) as f64 * p / 100.0;
        let (lo, hi) = (
            k.floor() as usize,
            (k.ceil() as usize).min(values.len() - 1),
        );
        let v = values[lo] + (values[hi] - values[lo]) * (k - lo as f64);
        1000.0 * v.min(top)
    })
}
