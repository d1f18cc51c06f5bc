//! Calibration for data-aware quantizers (GPTQ): runs calibration windows through the model one
//! decoder layer at a time and accumulates, per linear input site, the Hessian `2 XᵀX / n` of that
//! site's inputs. Projections that read the same input share one site (q/k/v; gate/up); o and down
//! have their own.
//!
//! Layers are processed in order and each sees the already-quantized earlier layers. Each
//! window's hidden state at the input of the current layer is kept in memory (windows × tokens ×
//! hidden f32: 38 MB for 16384 tokens of a 576-wide model), so a layer costs two passes of that one
//! layer over the windows, not a run of every layer below it: layer i's Hessians are gathered, the
//! caller quantizes layer i and hands back its new weights, which are swapped into the model
//! (`Engine::set_weight`), and layer i is run again to give layer i+1 its inputs. Within a layer
//! all sites are gathered in one pass, so o and down see layer i's *original* q/k/v and gate/up
//! (the quantized ones only reach layer i+1), as the reference GPTQ does without
//! `true-sequential`.

use crate::{Engine, EngineError, Result};
use marlin_kernels::HostWeight;
use marlin_model::llama::MatmulObserver;
use marlin_quant::gptq::Hessian;

/// One linear input site of a layer: the projections that read it and its accumulated Hessian.
pub struct Site {
    /// Hugging Face names of the projections sharing this input, e.g. q/k/v.
    pub weights: Vec<String>,
    pub hessian: Hessian,
}

/// A `MatmulObserver` that accumulates `XᵀX` for every input site of one layer.
pub struct LayerObserver {
    layer: usize,
    pub sites: Vec<Site>,
}

impl LayerObserver {
    pub fn new(layer: usize) -> Self {
        Self {
            layer,
            sites: Vec::new(),
        }
    }
}

impl MatmulObserver for LayerObserver {
    fn last_layer(&self) -> usize {
        self.layer
    }

    fn observe(
        &mut self,
        layer: usize,
        weights: &[String],
        input: &[f32],
        rows: usize,
        cols: usize,
    ) {
        if layer != self.layer {
            return;
        }
        let site = match self.sites.iter().position(|s| s.weights == weights) {
            Some(i) => &mut self.sites[i],
            None => {
                self.sites.push(Site {
                    weights: weights.to_vec(),
                    hessian: Hessian::new(cols),
                });
                self.sites.last_mut().expect("just pushed")
            }
        };
        site.hessian.add(&input[..rows * cols], rows);
    }
}

/// Cuts calibration tokens into windows of at most `window` tokens, using at most `max_tokens`;
/// a last window shorter than a quarter of `window` is dropped (too little context to matter).
pub fn windows(tokens: &[u32], window: usize, max_tokens: usize) -> Vec<Vec<u32>> {
    let tokens = &tokens[..tokens.len().min(max_tokens)];
    tokens
        .chunks(window.max(1))
        .filter(|w| w.len() == window || (w.len() >= window / 4 && w.len() >= 2))
        .map(<[u32]>::to_vec)
        .collect()
}

/// Gathers every layer's Hessians in order over `windows`. For each layer, `quantize` receives
/// the layer index and its sites and returns replacement weights (by Hugging Face name), which
/// are installed before the layer's outputs are computed for the next one. `progress(layer)` is
/// called after each.
pub fn calibrate_layers<E: From<EngineError>>(
    engine: &mut Engine,
    windows: &[Vec<u32>],
    mut quantize: impl FnMut(usize, Vec<Site>) -> std::result::Result<Vec<(String, HostWeight)>, E>,
    mut progress: impl FnMut(usize),
) -> std::result::Result<(), E> {
    if windows.is_empty() {
        return Err(EngineError::Eval(
            "no calibration windows: the calibration text is too short".into(),
        )
        .into());
    }
    let layers = engine.runner().config().num_layers;
    let mut hidden = windows
        .iter()
        .map(|w| engine.embed_window(w))
        .collect::<Result<Vec<_>>>()?;
    for layer in 0..layers {
        let mut observer = LayerObserver::new(layer);
        let outputs = windows
            .iter()
            .zip(&hidden)
            .map(|(w, h)| engine.forward_layer(w, layer, h, Some(&mut observer)))
            .collect::<Result<Vec<_>>>()?;
        let replacements = quantize(layer, observer.sites)?;
        if replacements.is_empty() {
            // Nothing changed: the observed pass already gave the next layer's inputs.
            hidden = outputs;
        } else {
            for (name, weight) in &replacements {
                engine.set_weight(name, weight)?;
            }
            for (w, h) in windows.iter().zip(&mut hidden) {
                *h = engine.forward_layer(w, layer, h, None)?;
            }
        }
        progress(layer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_and_drop_short_tails() {
        let t: Vec<u32> = (0..1100).collect();
        let w = windows(&t, 512, 16384);
        assert_eq!(w.len(), 2);
        assert_eq!(w[1][0], 512);
        let w = windows(&t, 512, 1000);
        assert_eq!(w.len(), 2);
        assert_eq!(w[1].len(), 488);
    }

    #[test]
    fn observer_keeps_one_hessian_per_site_of_its_layer() {
        let mut o = LayerObserver::new(1);
        let qkv = vec!["a".to_string(), "b".to_string()];
        let x = vec![1.0f32; 2 * 3];
        o.observe(0, &qkv, &x, 2, 3);
        o.observe(1, &qkv, &x, 2, 3);
        o.observe(1, &qkv, &x, 2, 3);
        o.observe(1, &["c".to_string()], &x, 2, 3);
        assert_eq!(o.sites.len(), 2);
        assert_eq!(o.sites[0].hessian.samples, 4);
        assert_eq!(o.sites[0].hessian.matrix()[0], 2.0);
    }
}
