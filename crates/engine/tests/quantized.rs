//! Quantized checkpoints: pre-quantized GPTQ and AWQ folders (tests/fixtures/quantized, made by
//! scripts/fixtures/make_gptq_awq.py) load packed and give the logits of the same model with the
//! weights dequantized by the published formulas; `marlin quantize`-style folders round-trip.

use marlin_engine::{Engine, Runner};
use marlin_kernels::cpu::{Activations, CpuBackend};
use marlin_kernels::DenseFormat;
use marlin_model::checkpoint::CheckpointSource;
use marlin_model::ModelFiles;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("run through cargo");
    PathBuf::from(manifest)
        .join("../../tests/fixtures/quantized")
        .join(name)
}

/// Logits with f32 activations, so the comparison sees the weight conversion alone.
fn logits(path: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let files = ModelFiles::open(path).unwrap();
    let backend = CpuBackend::with_activations(2, Activations::F32).unwrap();
    let model = files.load(backend, DenseFormat::F32).unwrap();
    let runner = Runner::new(model, 64, 64, 4).unwrap();
    let mut engine = Engine::new(Box::new(runner), files.tokenizer.clone());
    engine.score(tokens).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

const TOKENS: [u32; 12] = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 31, 300];

#[test]
fn gptq_and_awq_checkpoints_match_their_dequantized_weights() {
    // Symmetric GPTQ (act-order) converts exactly: 1e-4. Asymmetric checkpoints carry the
    // offset −s·z rounded to f16 (up to half an f16 ulp of |s·z| per weight, ~1e-4 here), which
    // this random tiny model amplifies to ~3e-3 of its largest logit.
    for (name, bound) in [("gptq-sym-act", 1e-4), ("gptq-asym", 1e-2), ("awq", 1e-2)] {
        let ours = logits(&fixture(name), &TOKENS);
        let oracle = logits(&fixture(&format!("{name}-dequant")), &TOKENS);
        let scale = oracle.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&ours, &oracle);
        eprintln!("{name}: max |logit difference| {d:.2e} (logits up to {scale:.2})");
        let limit = if bound < 1e-3 { bound } else { bound * scale };
        assert!(d < limit, "{name}: {d}");
    }
}

#[test]
fn scattered_g_idx_is_requantized_close_to_the_original() {
    let ours = logits(&fixture("gptq-scattered"), &TOKENS);
    let oracle = logits(&fixture("gptq-scattered-dequant"), &TOKENS);
    let scale = oracle.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&ours, &oracle);
    eprintln!("gptq-scattered: max |logit difference| {d:.2e} (logits up to {scale:.2})");
    assert!(d < 0.05 * scale, "{d}");
}

#[test]
fn imported_tensors_dequantize_to_the_published_formula() {
    // Weight by weight, before any model runs: symmetric GPTQ (with act-order) is exact; the
    // asymmetric ones differ only by the f16 rounding of the offset −s·z.
    for (name, exact) in [("gptq-sym-act", true), ("gptq-asym", false), ("awq", false)] {
        let dir = fixture(name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let scheme = marlin_model::checkpoint::Scheme::from_config(&dir, &json)
            .unwrap()
            .unwrap();
        let source = CheckpointSource::open(&dir, scheme).unwrap();
        let twin = CheckpointSource::open(
            &fixture(&format!("{name}-dequant")),
            marlin_model::checkpoint::Scheme::Marlin,
        )
        .unwrap();
        for layer in 0..2 {
            for (proj, rows, cols) in [
                ("self_attn.q_proj", 64, 64),
                ("self_attn.k_proj", 32, 64),
                ("mlp.gate_proj", 160, 64),
                ("mlp.down_proj", 64, 160),
            ] {
                let weight = format!("model.layers.{layer}.{proj}.weight");
                let t = source.packed(&weight, rows, cols).unwrap().unwrap();
                assert_eq!(t.group, 32);
                assert_eq!(t.perm.is_some(), name == "gptq-sym-act", "{name} {weight}");
                assert_eq!(t.format.is_asym(), name != "gptq-sym-act");
                let expected = marlin_model::weights::TensorSource::require(&twin, &weight)
                    .unwrap()
                    .to_f32()
                    .unwrap();
                let got = t.dequantize();
                for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                    // Half an f16 ulp of the offset −s·z, at most.
                    let (r, j) = (i / cols, i % cols);
                    let stored = t
                        .perm
                        .as_ref()
                        .map_or(j, |p| p.iter().position(|&c| c as usize == j).unwrap());
                    let offset = t.group_offset(r, stored / t.group).abs();
                    let tol = if exact {
                        0.0
                    } else {
                        offset * 2f32.powi(-11) + 1e-7
                    };
                    assert!((a - b).abs() <= tol, "{name} {weight}[{i}]: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn broken_quantization_configs_are_named() {
    let dir = fixture("gptq-asym");
    let path = dir.join("config.json");
    let check = |qc: serde_json::Value, needle: &str| {
        let json = serde_json::json!({ "quantization_config": qc });
        let err = match marlin_model::checkpoint::Scheme::from_config(&path, &json) {
            Err(e) => e.to_string(),
            Ok(s) => panic!("accepted {s:?}"),
        };
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("quantization_config"), "{err}");
    };
    check(serde_json::json!({"bits": 4}), "quant_method");
    check(serde_json::json!({"quant_method": "bnb"}), "bnb");
    check(
        serde_json::json!({"quant_method": "gptq", "bits": 3}),
        "3 bits",
    );
    check(
        serde_json::json!({"quant_method": "marlin", "format": "int4"}),
        "group_size",
    );
}
