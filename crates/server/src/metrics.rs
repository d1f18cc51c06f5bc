//! Prometheus metrics, named like vLLM's under `marlin:`. Each server has its own registry (no
//! process-wide recorder), so several servers can run in one process (tests).

use marlin_engine::scheduler::Observer;
use marlin_engine::FinishReason;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    preemptions: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    success: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    http: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(
        registry,
        Histogram::with_opts(opts).expect("valid histogram"),
    )
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help).unwrap());
        let counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help).unwrap());
        Self {
            running: gauge(
                "marlin:num_requests_running",
                "Requests in the running batch.",
            ),
            waiting: gauge(
                "marlin:num_requests_waiting",
                "Requests waiting to be scheduled (new or preempted).",
            ),
            kv_usage: register(
                &r,
                Gauge::new(
                    "marlin:kv_cache_usage_perc",
                    "Fraction of KV cache blocks in use (1 = full).",
                )
                .unwrap(),
            ),
            preemptions: counter(
                "marlin:num_preemptions_total",
                "Sequences preempted to free KV cache blocks.",
            ),
            prompt_tokens: counter(
                "marlin:prompt_tokens_total",
                "Prompt tokens of the requests scheduled.",
            ),
            generation_tokens: counter("marlin:generation_tokens_total", "Tokens generated."),
            prefix_cache_queries: counter(
                "marlin:prefix_cache_queries_total",
                "Tokens of the sequences started, looked up in the prefix cache.",
            ),
            prefix_cache_hits: counter(
                "marlin:prefix_cache_hits_total",
                "Tokens found in the prefix cache (their keys and values not recomputed).",
            ),
            success: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "marlin:request_success_total",
                        "Requests finished, by finish reason (abort: the client went away).",
                    ),
                    &["finished_reason"],
                )
                .unwrap(),
            ),
            ttft: histogram(
                &r,
                "marlin:time_to_first_token_seconds",
                "Time from the request's arrival to its first generated token.",
                TTFT_BUCKETS,
            ),
            itl: histogram(
                &r,
                "marlin:inter_token_latency_seconds",
                "Time between two consecutive generated tokens of a request.",
                ITL_BUCKETS,
            ),
            e2e: histogram(
                &r,
                "marlin:e2e_request_latency_seconds",
                "Time from the request's arrival to its last token.",
                E2E_BUCKETS,
            ),
            http: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "marlin:http_requests_total",
                        "HTTP requests answered, by route and status code.",
                    ),
                    &["route", "status"],
                )
                .unwrap(),
            ),
            registry: r,
        }
    }

    pub fn finished(&self, reason: FinishReason) {
        let label = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        self.success.with_label_values(&[label]).inc();
    }

    pub fn http_request(&self, route: &str, status: u16) {
        self.http
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of valid metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Metrics {
    fn on_preemption(&self) {
        self.preemptions.inc();
    }
    fn on_prompt_tokens(&self, tokens: usize) {
        self.prompt_tokens.inc_by(tokens as u64);
    }
    fn on_generation_tokens(&self, tokens: usize) {
        self.generation_tokens.inc_by(tokens as u64);
    }
    fn on_prefix_cache(&self, queried: usize, hit: usize) {
        self.prefix_cache_queries.inc_by(queried as u64);
        self.prefix_cache_hits.inc_by(hit as u64);
    }
    fn on_cancel(&self) {
        self.success.with_label_values(&["abort"]).inc();
    }
    fn on_state(&self, running: usize, waiting: usize, kv_usage: f64) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
        self.kv_usage.set(kv_usage);
    }
}
