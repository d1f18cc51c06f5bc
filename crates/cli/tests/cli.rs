//! The `marlin` binary end to end: generation on the default model, and clear errors (never a
//! panic) on bad input.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn marlin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(args)
        .output()
        .unwrap()
}

fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../tests/fixtures")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "marlin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Runs marlin expecting failure; returns stderr, checked to be an error and not a panic.
fn failure(args: &[&str]) -> String {
    let out = marlin(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

fn greedy_json(max_tokens: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        max_tokens,
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&stdout(&marlin(&args))).unwrap()
}

#[test]
fn chat_generation_on_the_default_model_matches_transformers() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/greedy.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<u64> = reference["prompts"][0]["new_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let out = greedy_json("32", &["--dtype", "f32"]);
    let got: Vec<u64> = out["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // We stop at the end-of-turn token (id 2); transformers was told to go on past it.
    let eos = expected.iter().position(|&t| t == 2).unwrap();
    assert_eq!(got, expected[..=eos]);
    assert_eq!(out["finish_reason"], "stop");
    assert_eq!(out["text"], "The capital of France is Paris.");
    assert_eq!(out["completion_tokens"].as_u64().unwrap() as usize, eos + 1);
}

#[test]
fn stop_strings_end_generation_before_the_match() {
    let out = greedy_json("32", &["--stop", "Paris"]);
    assert_eq!(out["text"], "The capital of France is ");
    assert_eq!(out["finish_reason"], "stop");
}

#[test]
fn max_tokens_ends_with_length() {
    let out = greedy_json("3", &[]);
    assert_eq!(out["finish_reason"], "length");
    assert_eq!(out["completion_tokens"], 3);
}

#[test]
fn same_seed_same_output() {
    let run = |seed: &str| {
        stdout(&marlin(&[
            "generate",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-tokens",
            "24",
            "--json",
        ]))
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds gave the same 24 tokens");
}

#[test]
fn interactive_chat_answers_and_exits() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(["chat", "--temperature", "0", "--max-tokens", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/exit\n")
        .unwrap();
    let text = stdout(&child.wait_with_output().unwrap());
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn hf_folder_generates() {
    let dir = fixtures().join("tiny-llama");
    let out: Value = serde_json::from_str(&stdout(&marlin(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "--json",
    ])))
    .unwrap();
    assert_eq!(out["completion_tokens"], 5);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marlin-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

fn generate_with(dir: &Path) -> String {
    failure(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ])
}

#[test]
fn bad_models_get_errors_naming_the_problem() {
    let missing = failure(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(missing.contains("/no/such/model"), "{missing}");

    let dir = scratch("missing-field");
    copy_dir(&fixtures().join("tiny-qwen3"), &dir);
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("intermediate_size");
    });
    let err = generate_with(&dir);
    assert!(
        err.contains("config.json") && err.contains("intermediate_size"),
        "{err}"
    );

    edit_config(&dir, |c| {
        c["intermediate_size"] = 160.into();
        c["model_type"] = "mamba".into();
    });
    let err = generate_with(&dir);
    assert!(err.contains("mamba") && err.contains("qwen3"), "{err}");

    edit_config(&dir, |c| {
        c["model_type"] = "qwen3".into();
        c["hidden_size"] = 48.into();
    });
    let err = generate_with(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("shape"),
        "{err}"
    );

    edit_config(&dir, |c| c["hidden_size"] = 64.into());
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = generate_with(&dir);
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = generate_with(&dir);
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_gguf_is_an_error() {
    let dir = scratch("truncated-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let home = std::env::var_os("MARLIN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/marlin"));
    let source = home.join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&source).expect("run `marlin pull` first");
    let path = dir.join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = failure(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(err.contains("cut.gguf"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let dir = fixtures().join("tiny-llama");
    let prompt = "hello world ".repeat(400);
    let err = failure(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert!(err.contains("context"), "{err}");
}

#[test]
fn unknown_model_name_says_what_to_do() {
    let err = failure(&["generate", "--model", "not-a-model", "--prompt", "hi"]);
    assert!(err.contains("marlin pull"), "{err}");
}

#[test]
fn bad_kernel_shape_is_named() {
    for shape in ["4096", "0x4096", "4096xK"] {
        let err = failure(&["bench", "kernels", "--shapes", "8192x8192", shape]);
        assert!(err.contains(&format!("`{shape}` is not a shape")), "{err}");
    }
}

#[test]
fn bench_runs_a_synthetic_shape_without_a_model_file() {
    let out = marlin(&[
        "bench",
        "--synthetic",
        "smollm2",
        "--quantize",
        "int4",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--repetitions",
        "1",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["weights"], "int4 g32 (embedding int8 g32)");
    // SmolLM2-135M: 30 layers of q, o (576²), k, v (192×576), gate, up, down (1536×576) at
    // int4 g32 (½ byte + a 2-byte scale per 32 weights), and the tied 49152×576 embedding as the
    // output projection at int8 g32 (1 byte + 2 per 32).
    let linear = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576);
    let expected = linear / 2 + linear / 16 + 49152 * 576 + 49152 * 576 / 16;
    assert_eq!(v["decode_weight_bytes"].as_u64(), Some(expected as u64));
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    // The copy line (and so the bound) is measured on CUDA only.
    assert!(v["copy_gb_s"].is_null() && v["kernels_from_cache"].is_null());

    // Three sequences decoding together, one batched step each.
    let out = marlin(&[
        "bench",
        "--synthetic",
        "smollm2",
        "--batch",
        "3",
        "--prompt-tokens",
        "5",
        "--gen-tokens",
        "2",
        "--repetitions",
        "1",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["batch"], 3);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    let e = failure(&["bench", "--synthetic", "smollm2", "--batch", "0"]);
    assert!(e.contains("--batch must be 1 to 512"), "{e}");

    let e = failure(&["bench", "--synthetic", "llama4"]);
    for name in [
        "`llama4`",
        "smollm2",
        "llama3-8b",
        "qwen3-4b",
        "llama3-70b-layer",
    ] {
        assert!(e.contains(name), "{e}");
    }
    let e = failure(&["bench", "--synthetic", "smollm2", "--model", "smollm2"]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn bench_serve_measures_each_concurrency_level() {
    // A small KV cache keeps the server's start quick; 3 requests of 4 tokens at 1 and 2 streams.
    let out = marlin(&[
        "bench",
        "serve",
        "--concurrency",
        "1",
        "2",
        "--requests",
        "3",
        "--gen-tokens",
        "4",
        "--json",
        "--",
        "--num-kv-blocks",
        "64",
    ]);
    let levels: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(levels.len(), 2);
    for (level, concurrency) in levels.iter().zip([1, 2]) {
        assert_eq!(level["concurrency"], concurrency);
        assert_eq!(level["requests"], 3);
        // ignore_eos: every request generates exactly --gen-tokens.
        assert_eq!(level["output_tokens"], 12);
        assert!(level["output_tok_s"].as_f64().unwrap() > 0.0);
        let (p50, p99) = (level["ttft_p50_ms"].as_f64(), level["ttft_p99_ms"].as_f64());
        assert!(p50.unwrap() > 0.0 && p50 <= p99, "{level}");
    }

    let e = failure(&["bench", "serve", "--url", "https://example.com/v1"]);
    assert!(e.contains("--url must look like http://HOST:PORT"), "{e}");
    let e = failure(&["bench", "serve", "--concurrency", "0"]);
    assert!(e.contains("--concurrency levels must be at least 1"), "{e}");
    // Nothing listens on port 9 (discard) here: a clear connection error, not a hang.
    let e = failure(&["bench", "serve", "--url", "http://127.0.0.1:9"]);
    assert!(e.contains("connecting to 127.0.0.1:9"), "{e}");
}
