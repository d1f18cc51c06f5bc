//! Reading OpenAI request bodies. Bodies are parsed by hand from JSON values so that every
//! mistake (wrong type, out-of-range value, a feature this server lacks) becomes a 400 that
//! names the field, and unknown harmless fields are ignored.

use crate::error::ApiError;
use marlin_engine::SamplingParams;
use marlin_model::{ChatMessage, GenerationDefaults};
use serde_json::{Map, Value};

pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

pub struct Params {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::param(
        field,
        format!("`{field}` must be {expected}, not {}", type_name(got)),
    )
}

/// A present, non-null field.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn get_f32(obj: &Map<String, Value>, name: &str) -> Result<Option<f32>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN) as f32;
            if v.is_finite() {
                Ok(Some(v))
            } else {
                Err(ApiError::param(name, format!("`{name}` must be finite")))
            }
        }
        Some(v) => Err(wrong_type(name, "a number", v)),
    }
}

fn get_i64(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Ok(Some(i)),
            (None, Some(u), _) => Ok(Some(u as i64)),
            // 5.0 is an integer in JSON Schema terms; 5.5 is not.
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(ApiError::param(
                name,
                format!("`{name}` must be an integer, not {n}"),
            )),
        },
        Some(v) => Err(wrong_type(name, "an integer", v)),
    }
}

fn get_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(name, "a boolean", v)),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type(name, "a string", v)),
    }
}

/// Parses a request body; `defaults` are the model's recommended sampling settings.
pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    defaults: &GenerationDefaults,
) -> Result<Params, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(format!(
            "The request body must be a JSON object, not {}",
            type_name(&value)
        )));
    };
    reject_unsupported(&obj, endpoint)?;

    let model = get_str(&obj, "model")?.map(str::to_owned);
    let prompt = match endpoint {
        Endpoint::Chat => Prompt::Chat(parse_messages(&obj)?),
        Endpoint::Completions => parse_prompt(&obj)?,
    };

    let sampling = parse_sampling(&obj, defaults)?;
    let mut max_tokens = get_i64(&obj, "max_tokens")?.map(|v| ("max_tokens", v));
    if endpoint == Endpoint::Chat {
        if let Some(v) = get_i64(&obj, "max_completion_tokens")? {
            max_tokens = Some(("max_completion_tokens", v));
        }
    }
    let max_tokens = match max_tokens {
        None => None,
        Some((name, v)) if v < 1 => {
            return Err(ApiError::param(
                name,
                format!("`{name}` must be at least 1, got {v}"),
            ))
        }
        Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
    };

    let stop = match field(&obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                v => Err(wrong_type("stop", "a string or an array of strings", v)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };

    let stream = get_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match field(&obj, "stream_options") {
        None => false,
        Some(Value::Object(opts)) => get_bool(opts, "include_usage")
            .map_err(|_| {
                ApiError::param(
                    "stream_options.include_usage",
                    "`stream_options.include_usage` must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    let ignore_eos = get_bool(&obj, "ignore_eos")?.unwrap_or(false);

    Ok(Params {
        model,
        prompt,
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
        ignore_eos,
    })
}

/// Fields whose request this server cannot honour: answering without them would be wrong.
fn reject_unsupported(obj: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    if let Some(n) = get_i64(obj, "n")? {
        if n != 1 {
            return Err(ApiError::unsupported(
                "n",
                format!("Only n = 1 is supported, got n = {n}"),
            ));
        }
    }
    if let Some(best_of) = get_i64(obj, "best_of")? {
        if best_of != 1 {
            return Err(ApiError::unsupported(
                "best_of",
                format!("Only best_of = 1 is supported, got {best_of}"),
            ));
        }
    }
    match (endpoint, field(obj, "logprobs")) {
        (_, None) | (_, Some(Value::Bool(false))) => {}
        (Endpoint::Completions, Some(Value::Number(n))) if n.as_f64() == Some(0.0) => {}
        (_, Some(Value::Bool(true) | Value::Number(_))) => {
            return Err(ApiError::unsupported(
                "logprobs",
                "logprobs are not supported",
            ))
        }
        (_, Some(v)) => return Err(wrong_type("logprobs", "a boolean or an integer", v)),
    }
    if let Some(k) = get_i64(obj, "top_logprobs")? {
        if k != 0 {
            return Err(ApiError::unsupported(
                "top_logprobs",
                "top_logprobs are not supported",
            ));
        }
    }
    if get_bool(obj, "echo")? == Some(true) {
        return Err(ApiError::unsupported("echo", "echo is not supported"));
    }
    if get_str(obj, "suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix is not supported"));
    }
    for name in ["tools", "functions"] {
        match field(obj, name) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(ApiError::unsupported(
                    name,
                    format!("`{name}` (tool calling) is not supported"),
                ))
            }
        }
    }
    for name in ["tool_choice", "function_call"] {
        match field(obj, name) {
            None => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => {
                return Err(ApiError::unsupported(
                    name,
                    format!("`{name}` (tool calling) is not supported"),
                ))
            }
        }
    }
    match field(obj, "response_format") {
        None => {}
        Some(Value::Object(f)) => match f.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(ApiError::unsupported(
                    "response_format",
                    format!("response_format `{t}` is not supported; only `text` is"),
                ))
            }
            _ => {
                return Err(ApiError::param(
                    "response_format",
                    "`response_format` must have a string `type`",
                ))
            }
        },
        Some(v) => return Err(wrong_type("response_format", "an object", v)),
    }
    match field(obj, "logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(Value::Object(_)) => {
            return Err(ApiError::unsupported(
                "logit_bias",
                "logit_bias is not supported",
            ))
        }
        Some(v) => return Err(wrong_type("logit_bias", "an object", v)),
    }
    Ok(())
}

fn parse_sampling(
    obj: &Map<String, Value>,
    defaults: &GenerationDefaults,
) -> Result<SamplingParams, ApiError> {
    // Absent fields take the model's generation_config.json values, else OpenAI's defaults.
    let default_temperature = match defaults.do_sample {
        Some(false) => 0.0,
        _ => defaults.temperature.unwrap_or(1.0),
    };
    let top_k = match get_i64(obj, "top_k")? {
        None => defaults.top_k.unwrap_or(0),
        Some(-1 | 0) => 0,
        Some(k) if k < 0 => {
            return Err(ApiError::param(
                "top_k",
                format!("`top_k` must be -1 (off) or at least 1, got {k}"),
            ))
        }
        Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
    };
    let seed = get_i64(obj, "seed")?.map(|s| s as u64);
    let params = SamplingParams {
        temperature: get_f32(obj, "temperature")?.unwrap_or(default_temperature),
        top_k,
        top_p: get_f32(obj, "top_p")?.unwrap_or(defaults.top_p.unwrap_or(1.0)),
        min_p: get_f32(obj, "min_p")?.unwrap_or(defaults.min_p.unwrap_or(0.0)),
        repetition_penalty: get_f32(obj, "repetition_penalty")?
            .unwrap_or(defaults.repetition_penalty.unwrap_or(1.0)),
        presence_penalty: get_f32(obj, "presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: get_f32(obj, "frequency_penalty")?.unwrap_or(0.0),
        seed,
    };
    if params.temperature > 2.0 && field(obj, "temperature").is_some() {
        return Err(ApiError::param(
            "temperature",
            format!(
                "`temperature` must be in [0, 2], got {}",
                params.temperature
            ),
        ));
    }
    params.validate().map_err(|e| match e {
        marlin_engine::sampler::SamplingError::InvalidParam { field, .. } => {
            ApiError::param(field, e.to_string())
        }
    })?;
    Ok(params)
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::param("messages", "`messages` is required"))
        }
        Some(Value::Array(m)) => m,
        Some(v) => return Err(wrong_type("messages", "an array", v)),
    };
    if messages.is_empty() {
        return Err(ApiError::param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let param = format!("messages[{i}]");
            let Value::Object(m) = message else {
                return Err(wrong_type(&param, "an object", message));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.as_str(),
                Some(v) => return Err(wrong_type(&format!("{param}.role"), "a string", v)),
                None => {
                    return Err(ApiError::param(
                        &format!("{param}.role"),
                        format!("`{param}.role` is required"),
                    ))
                }
            };
            let role = match role {
                "system" | "user" | "assistant" => role,
                "developer" => "system",
                other => {
                    return Err(ApiError::param(
                        &format!("{param}.role"),
                        format!(
                            "role `{other}` is not supported (use system, developer, user or assistant)"
                        ),
                    ))
                }
            };
            let content_param = format!("{param}.content");
            let content = match m.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                None | Some(Value::Null) => {
                    return Err(ApiError::param(
                        &content_param,
                        format!("`{content_param}` is required"),
                    ))
                }
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type"), part.get("text")) {
                            (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => {
                                text.push_str(s)
                            }
                            (Some(Value::String(t)), _) if t != "text" => {
                                return Err(ApiError::unsupported(
                                    &content_param,
                                    format!("content parts of type `{t}` are not supported; only text is"),
                                ))
                            }
                            _ => {
                                return Err(ApiError::param(
                                    &content_param,
                                    "a content part must be {\"type\": \"text\", \"text\": STRING}",
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(wrong_type(
                        &content_param,
                        "a string or an array of text parts",
                        v,
                    ))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let token_ids = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    match obj.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(ids)] => token_ids(ids).map(Prompt::Tokens).ok_or_else(|| {
                ApiError::param(
                    "prompt",
                    "a token-id prompt must hold non-negative integers",
                )
            }),
            [] => Err(ApiError::param("prompt", "`prompt` must not be empty")),
            [Value::Number(_), ..] => token_ids(items).map(Prompt::Tokens).ok_or_else(|| {
                ApiError::param(
                    "prompt",
                    "a token-id prompt must hold non-negative integers",
                )
            }),
            [_, _, ..] => Err(ApiError::unsupported(
                "prompt",
                "Only one prompt per request is supported; send several requests",
            )),
            [v] => Err(wrong_type(
                "prompt",
                "a string or an array of one string",
                v,
            )),
        },
        Some(v) => Err(wrong_type(
            "prompt",
            "a string or an array of one string",
            v,
        )),
    }
}
