//! An OpenAI-compatible HTTP server (axum + tokio) over the engine's continuous-batching
//! scheduler.
//!
//! The server binds first and loads the model in the background (`/health` answers 503 until it
//! is ready). The scheduler runs on its own OS thread; each request hands it a [`Sink`] that
//! forwards updates over a tokio channel, and dropping the receiving end (a client that went
//! away) cancels the request and frees its KV blocks.

mod error;
mod metrics;
mod openai;

pub use error::ApiError;
pub use metrics::Metrics;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use marlin_engine::scheduler::{
    Scheduler, SchedulerConfig, SchedulerHandle, Sink, SubmitError, Update,
};
use marlin_engine::{Engine, EngineError, Finish, FinishReason, Request};
use marlin_model::{ChatTemplate, GenerationDefaults, Tokenizer};
use openai::{Endpoint, Params, Prompt};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What the loader hands the server once the model is ready.
pub struct LoadedModel {
    pub engine: Engine,
    pub chat_template: Option<ChatTemplate>,
    pub stop_token_ids: Vec<u32>,
    pub generation: GenerationDefaults,
}

pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients name (`/v1/models`).
    pub served_name: String,
    /// Required as `Authorization: Bearer KEY` on /v1 routes when set.
    pub api_key: Option<String>,
    pub scheduler: SchedulerConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot load the model: {0}")]
    Load(LoadError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Ready {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    handle: SchedulerHandle,
    stop_token_ids: Vec<u32>,
    generation: GenerationDefaults,
}

struct AppState {
    config: ServerConfig,
    ready: OnceLock<Ready>,
    metrics: Arc<Metrics>,
    created: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A running server's shared state; build the routers from it.
#[derive(Clone)]
pub struct Server {
    state: Shared,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            state: Arc::new(AppState {
                config,
                ready: OnceLock::new(),
                metrics: Arc::new(Metrics::new()),
                created: unix_now(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }

    pub fn is_ready(&self) -> bool {
        self.state.ready.get().is_some()
    }

    /// Starts the scheduler thread over a loaded model; the API answers from then on.
    pub fn start(&self, model: LoadedModel) -> std::io::Result<()> {
        let tokenizer = model.engine.tokenizer().clone();
        let observer: Arc<dyn marlin_engine::scheduler::Observer> = self.state.metrics.clone();
        let (scheduler, handle) =
            Scheduler::new(model.engine, self.state.config.scheduler, Some(observer));
        scheduler.spawn()?;
        let ready = Ready {
            tokenizer,
            template: model.chat_template,
            handle,
            stop_token_ids: model.stop_token_ids,
            generation: model.generation,
        };
        if self.state.ready.set(ready).is_err() {
            return Err(std::io::Error::other("the server already has a model"));
        }
        Ok(())
    }

    /// The API routes; with `with_metrics`, `/metrics` too.
    pub fn router(&self, with_metrics: bool) -> Router {
        let mut router = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(list_models))
            .route("/v1/models/{id}", get(get_model))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions));
        if with_metrics {
            router = router.route("/metrics", get(metrics_text));
        }
        router
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                authenticate,
            ))
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                count_http,
            ))
            .with_state(self.state.clone())
    }

    /// A router with only `/metrics`, for a separate metrics port.
    pub fn metrics_router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics_text))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(
                self.state.clone(),
                count_http,
            ))
            .with_state(self.state.clone())
    }
}

/// Serves on `listener` (and `/metrics` on `metrics_listener` when given) while `load` runs in
/// the background; returns when `shutdown` completes, or with the error if loading fails.
pub async fn serve<L, S>(
    config: ServerConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    load: L,
    shutdown: S,
) -> Result<(), ServerError>
where
    L: FnOnce() -> Result<LoadedModel, LoadError> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let server = Server::new(config);
    // Ok once the model serves; an error, or a dropped sender if the loader panicked.
    let (loaded_tx, loaded_rx) = oneshot::channel::<Result<(), LoadError>>();
    let loading = server.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = load().and_then(|model| loading.start(model).map_err(Into::into));
        if result.is_ok() {
            eprintln!(
                "model loaded in {:.1}s; serving",
                started.elapsed().as_secs_f64()
            );
        }
        let _ = loaded_tx.send(result);
    });

    // A watch channel: a listener that subscribes late still sees the stop.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut load_failure = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let failure = tokio::select! {
            _ = &mut shutdown => None,
            loaded = loaded_rx => match loaded {
                Ok(Ok(())) => {
                    shutdown.await;
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(_) => Some("the model loader panicked".into()),
            },
        };
        let _ = stop.send(true);
        failure
    });

    let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let metrics_task = metrics_listener.map(|l| {
        let router = server.metrics_router();
        let stop = stopped(&stop_rx);
        tokio::spawn(async move { axum::serve(l, router).with_graceful_shutdown(stop).await })
    });
    let router = server.router(metrics_task.is_none());
    axum::serve(listener, router)
        .with_graceful_shutdown(stopped(&stop_rx))
        .await?;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    match (&mut load_failure).await {
        Ok(Some(e)) => Err(ServerError::Load(e)),
        _ => Ok(()),
    }
}

// ---- middleware -------------------------------------------------------------------------

async fn count_http(State(state): State<Shared>, request: HttpRequest, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_u16());
    response
}

async fn authenticate(State(state): State<Shared>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        if request.uri().path().starts_with("/v1") {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if given != Some(key.as_str()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(request).await
}

// ---- simple routes ----------------------------------------------------------------------

async fn not_found(request: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "No route {} {}: this server has GET /v1/models, POST /v1/chat/completions, \
             POST /v1/completions, GET /health and GET /metrics",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn health(State(state): State<Shared>) -> Response {
    if state.ready.get().is_some() {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("the model is loading").into_response()
    }
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn model_card(state: &AppState) -> Value {
    let mut card = json!({
        "id": state.config.served_name,
        "object": "model",
        "created": state.created,
        "owned_by": "marlin",
        "root": state.config.served_name,
        "parent": null,
    });
    if let Some(ready) = state.ready.get() {
        card["max_model_len"] = json!(ready.handle.max_context());
    }
    card
}

async fn list_models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&state)]}))
}

async fn get_model(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    if id == state.config.served_name {
        Json(model_card(&state)).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

// ---- generation -------------------------------------------------------------------------

/// Forwards the scheduler's updates to the request's task, stamped with when they happened.
struct ChannelSink(mpsc::UnboundedSender<(Instant, Update)>);

impl Sink for ChannelSink {
    fn send(&mut self, update: Update) -> bool {
        self.0.send((Instant::now(), update)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A request admitted to the scheduler.
struct Running {
    id: String,
    model: String,
    created: u64,
    arrived: Instant,
    rx: mpsc::UnboundedReceiver<(Instant, Update)>,
    metrics: Arc<Metrics>,
    last_token: Option<Instant>,
}

/// What the request task makes of one update.
enum Step {
    Text(String),
    Done(String, Finish),
    Failed(String),
}

impl Running {
    /// The next update, with its timing recorded; None if the scheduler vanished.
    async fn next(&mut self) -> Step {
        match self.rx.recv().await {
            Some((at, Update::Token(text))) => {
                match self.last_token {
                    None => self.metrics.ttft.observe((at - self.arrived).as_secs_f64()),
                    Some(last) => self.metrics.itl.observe((at - last).as_secs_f64()),
                }
                self.last_token = Some(at);
                Step::Text(text)
            }
            Some((at, Update::Finished { text, finish })) => {
                self.metrics.e2e.observe((at - self.arrived).as_secs_f64());
                self.metrics.finished(finish.reason);
                Step::Done(text, finish)
            }
            Some((_, Update::Failed(message))) => Step::Failed(message),
            None => Step::Failed("the scheduler stopped".into()),
        }
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(finish: &Finish) -> Value {
    json!({
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    })
}

async fn chat_completions(
    State(state): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(state, body, Endpoint::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn ready(state: &AppState) -> Result<&Ready, ApiError> {
    state
        .ready
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
}

/// Turns parsed parameters into an engine request: the prompt's tokens and the limits.
fn build_request(ready: &Ready, params: &Params) -> Result<Request, ApiError> {
    let prompt = match &params.prompt {
        Prompt::Chat(messages) => {
            let template = ready.template.as_ref().ok_or_else(|| {
                ApiError::invalid("this model has no chat template; use /v1/completions")
            })?;
            let text = template
                .render(messages, true)
                .map_err(|e| ApiError::param("messages", e.to_string()))?;
            ready
                .tokenizer
                .encode(&text, false)
                .map_err(|e| ApiError::param("messages", e.to_string()))?
        }
        Prompt::Text(text) => ready
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::param("prompt", e.to_string()))?,
        Prompt::Tokens(ids) => {
            let vocab = ready.tokenizer.vocab_size() as u32;
            if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
                return Err(ApiError::param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids.clone()
        }
    };
    let context = ready.handle.max_context();
    if prompt.len() >= context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::param(
                if matches!(params.prompt, Prompt::Chat(_)) {
                    "messages"
                } else {
                    "prompt"
                },
                format!(
                    "This model's maximum context length is {context} tokens. However, your \
                     request has {} input tokens. Please reduce the length of the input.",
                    prompt.len()
                ),
            )
        });
    }
    let max_tokens = params
        .max_tokens
        .unwrap_or(context - prompt.len())
        .min(context - prompt.len());
    Ok(Request {
        prompt,
        sampling: params.sampling.clone(),
        max_tokens,
        stop: params.stop.clone(),
        stop_token_ids: if params.ignore_eos {
            Vec::new()
        } else {
            ready.stop_token_ids.clone()
        },
    })
}

async fn generate(
    state: Shared,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body =
        body.map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
    let ready = ready(&state)?;
    let params = openai::parse(&body, endpoint, &ready.generation)?;
    if let Some(model) = &params.model {
        if model != &state.config.served_name {
            return Err(ApiError::model_not_found(model));
        }
    }
    let request = build_request(ready, &params)?;
    let (tx, rx) = mpsc::unbounded_channel();
    ready
        .handle
        .submit(request, Box::new(ChannelSink(tx)))
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::unavailable(e.to_string()),
            SubmitError::Invalid(EngineError::Sampling(s)) => ApiError::invalid(s.to_string()),
            SubmitError::Invalid(e) => ApiError::invalid(e.to_string()),
            SubmitError::Stopped => ApiError::internal(e.to_string()),
        })?;
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let running = Running {
        id: format!("{prefix}-{:x}{n:06x}", state.created),
        model: state.config.served_name.clone(),
        created: unix_now(),
        arrived,
        rx,
        metrics: state.metrics.clone(),
        last_token: None,
    };
    if params.stream {
        let stream = sse_stream(running, endpoint, params.include_usage);
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .expect("static headers"));
    }
    complete(running, endpoint).await
}

async fn complete(mut running: Running, endpoint: Endpoint) -> Result<Response, ApiError> {
    let mut text = String::new();
    let finish = loop {
        match running.next().await {
            Step::Text(piece) => text.push_str(&piece),
            Step::Done(piece, finish) => {
                text.push_str(&piece);
                break finish;
            }
            Step::Failed(message) => return Err(ApiError::internal(message)),
        }
    };
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(finish.reason),
        }),
        Endpoint::Completions => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_reason(finish.reason),
        }),
    };
    let object = match endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    Ok(Json(json!({
        "id": running.id,
        "object": object,
        "created": running.created,
        "model": running.model,
        "choices": [choice],
        "usage": usage(&finish),
    }))
    .into_response())
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The server-sent events of a streaming request: chunks, then (with include_usage) a usage
/// chunk, then `data: [DONE]`. Dropping the stream (client gone) drops the receiver, which
/// cancels the request in the scheduler.
fn sse_stream(
    mut running: Running,
    endpoint: Endpoint,
    include_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let object = match endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    let chunk = move |running: &Running, choice: Value| {
        let mut c = json!({
            "id": running.id,
            "object": object,
            "created": running.created,
            "model": running.model,
            "choices": [choice],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let piece = move |text: &str, reason: Option<FinishReason>| {
        let reason = reason.map(finish_reason);
        match endpoint {
            Endpoint::Chat => {
                let delta = if text.is_empty() && reason.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
            }
        }
    };
    async_stream::stream! {
        if endpoint == Endpoint::Chat {
            let first = json!({
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            });
            yield Ok(sse(&chunk(&running, first)));
        }
        loop {
            match running.next().await {
                Step::Text(text) => {
                    if !text.is_empty() {
                        yield Ok(sse(&chunk(&running, piece(&text, None))));
                    }
                }
                Step::Done(text, finish) => {
                    if !text.is_empty() {
                        yield Ok(sse(&chunk(&running, piece(&text, None))));
                    }
                    yield Ok(sse(&chunk(&running, piece("", Some(finish.reason)))));
                    if include_usage {
                        let usage_chunk = json!({
                            "id": running.id,
                            "object": object,
                            "created": running.created,
                            "model": running.model,
                            "choices": [],
                            "usage": usage(&finish),
                        });
                        yield Ok(sse(&usage_chunk));
                    }
                    break;
                }
                Step::Failed(message) => {
                    yield Ok(sse(&ApiError::internal(message).body()));
                    break;
                }
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}
