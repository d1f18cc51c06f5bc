//! The GGUF reader and tokenizer against the real default model and the transformers fixtures.

// Expected weights are f32 values as Python prints them (shortest f64 form), kept verbatim.
#![allow(clippy::excessive_precision)]

use marlin_model::gguf::GgufFile;
use marlin_model::Tokenizer;
use marlin_quant::ggml::{self, GgmlType};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The default model, which `marlin pull` downloads; its absence is a failure, not a skip, so a
/// machine without it cannot report these tests as passing.
fn default_model() -> PathBuf {
    let home = match std::env::var_os("MARLIN_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/marlin"),
    };
    let path = home.join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "run `marlin pull` first (default model not found at {})",
        path.display()
    );
    path
}

fn fixture(relative: &str) -> PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo");
    Path::new(&manifest)
        .join("../../tests/fixtures")
        .join(relative)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id array")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn reads_the_default_model() {
    let file = GgufFile::open(&default_model()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    for t in file.tensors() {
        assert_eq!(file.tensor_bytes(t).len(), t.n_bytes(), "{}", t.name);
    }

    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    // Values from the Python `gguf` package (GGUFReader + gguf.quants.dequantize).
    let row_bytes = GgmlType::Q8_0.bytes_for(576).unwrap();
    let bytes = file.tensor_bytes(embd);
    let row0 = ggml::dequantize(embd.ty, &bytes[..row_bytes], 576).unwrap();
    assert_eq!(
        row0[..4],
        [
            -0.10654449462890625,
            0.032978057861328125,
            0.048198699951171875,
            -0.022830963134765625
        ]
    );
    let row5 = ggml::dequantize(embd.ty, &bytes[5 * row_bytes..6 * row_bytes], 576).unwrap();
    assert_eq!(
        row5[100..104],
        [
            -0.39653587341308594,
            -0.031223297119140625,
            0.05307960510253906,
            -0.015611648559570312
        ]
    );

    let q = file.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.dims.as_slice()), (GgmlType::Q4_1, &[576, 576][..]));
    let values = ggml::dequantize(q.ty, file.tensor_bytes(q), 576 * 576).unwrap();
    assert_eq!(
        values[..4],
        [
            -0.0963134765625,
            0.1573486328125,
            -0.0963134765625,
            -0.73046875
        ]
    );
    assert_eq!(
        values[576 * 5 + 100..576 * 5 + 104],
        [-0.296875, -0.703125, 0.71875, 0.515625]
    );
}

/// tokenization.json holds transformers' ids for the same GGUF. transformers does not know the
/// `smollm` pre-tokenizer and falls back to plain GPT-2 splitting; we split digits first as
/// SmolLM2's own tokenizer.json and llama.cpp do. The fixture also records ids under that
/// pipeline, and flags the cases (non-ASCII numerals) where the two differ.
#[test]
fn smollm2_tokenizer_matches_transformers() {
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&default_model()).unwrap()).unwrap();
    let fixture = read_json(&fixture("smollm2/tokenization.json"));
    let add_bos = fixture["tokenizer_added_bos"].as_bool().unwrap();
    assert_eq!(tokenizer.add_bos(), add_bos);
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_ids(), [2, 0]);
    assert_eq!(tokenizer.special_token(1), Some("<|im_start|>"));
    assert!((0..17).all(|id| tokenizer.is_special(id)) && !tokenizer.is_special(17));

    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut differing = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids_digits_bytelevel_no_special_tokens"]);
        if case["digits_split_pretokenizer_agrees"].as_bool().unwrap() {
            assert_eq!(ids(&case["ids_no_special_tokens"]), expected, "{name}");
        } else {
            differing += 1;
        }
        assert_eq!(tokenizer.encode(text, false).unwrap(), expected, "{name}");
        let mut with_special = expected.clone();
        if add_bos {
            with_special.insert(0, 1);
        }
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            with_special,
            "{name}"
        );
        if case["digits_split_pretokenizer_agrees"].as_bool().unwrap() {
            assert_eq!(with_special, ids(&case["ids_add_special_tokens"]), "{name}");
        }
        let decoded = tokenizer.decode(&expected, false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{name}");
        if case["roundtrip_exact"].as_bool().unwrap() {
            assert_eq!(decoded, text, "{name}");
        }
        let skipped = tokenizer.decode(&expected, true).unwrap();
        assert_eq!(
            skipped,
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}"
        );
    }
    assert!(differing <= 1, "{differing} cases split differently");

    for chat in fixture["chat"].as_array().unwrap() {
        let name = chat["name"].as_str().unwrap();
        let rendered = chat["rendered"].as_str().unwrap();
        let expected = ids(&chat["ids"]);
        assert_eq!(
            tokenizer.encode(rendered, false).unwrap(),
            expected,
            "{name}"
        );
        assert_eq!(
            tokenizer.decode(&expected, false).unwrap(),
            chat["decoded"].as_str().unwrap(),
            "{name}"
        );
    }
}

/// Ids from transformers' AutoTokenizer on the same folder.
#[test]
fn loads_a_tokenizer_json() {
    let path = fixture("tiny-llama/tokenizer.json");
    let mut tokenizer = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tokenizer.vocab_size(), 320);
    assert_eq!(tokenizer.bos_id(), None);
    assert!(!tokenizer.add_bos());
    let cases: [(&str, &[u32]); 3] = [
        (
            "Hello world! 123",
            &[42, 71, 266, 81, 269, 290, 78, 70, 3, 223, 19, 20, 21],
        ),
        (
            "<|im_start|>user\nhi<|im_end|>",
            &[1, 87, 85, 274, 201, 74, 75, 2],
        ),
        (
            "héllo 日本",
            &[74, 130, 105, 266, 81, 223, 165, 248, 101, 165, 253, 108],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(tokenizer.encode(text, true).unwrap(), expected, "{text}");
        assert_eq!(tokenizer.decode(expected, false).unwrap(), text);
    }
    assert_eq!(tokenizer.decode(&[1, 74, 75, 2], true).unwrap(), "hi");

    let reference = read_json(&fixture("tiny-llama/reference.json"));
    let chat = &reference["chat"];
    let expected = ids(&chat["ids"]);
    let rendered = chat["rendered"].as_str().unwrap();
    assert_eq!(tokenizer.encode(rendered, false).unwrap(), expected);

    // tokenizer_config.json names `<|endoftext|>` as BOS and `<|im_end|>` as EOS.
    tokenizer.configure(Some("<|endoftext|>"), Some("<|im_end|>"), Some(true));
    assert_eq!(tokenizer.bos_id(), Some(0));
    assert_eq!(tokenizer.eos_ids(), [2, 0]);
    assert_eq!(tokenizer.encode("hi", true).unwrap(), [0, 74, 75]);
    assert_eq!(
        tokenizer.encode("<|endoftext|>hi", true).unwrap(),
        [0, 74, 75]
    );
    assert_eq!(tokenizer.encode("hi", false).unwrap(), [74, 75]);
    assert!(tokenizer.set_bos_token("<nope>").is_err());

    let err = Tokenizer::from_file(&fixture("tiny-llama/missing.json")).unwrap_err();
    assert!(matches!(err, marlin_model::ModelError::Io { .. }), "{err}");
}
