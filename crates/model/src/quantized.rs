//! How a model's matrices become packed weights at load: GGUF's quantized tensors stay packed
//! (converted to Marlin's formats, losslessly where GGML's type allows), and `--quantize`
//! quantizes every linear layer with RTN in memory.
//!
//! The policy travels with each tensor a source lends ([`crate::weights::RawTensor::policy`]), so
//! architectures keep calling `to_host_weight` and never see the choice.

use crate::weights::{RawTensor, TensorSource};
use crate::{ModelError, Result};
use marlin_quant::{DenseFormat, QuantFormat};
use std::path::Path;

/// A quantization recipe: the format and the largest group (`PER_CHANNEL` = 0: one per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeSpec {
    pub format: QuantFormat,
    pub group: usize,
}

impl QuantizeSpec {
    /// The format with its default group.
    pub fn new(format: QuantFormat) -> Self {
        Self {
            format,
            group: format.default_group(),
        }
    }

    /// What the token embedding and a separate lm_head get: int8, groups of 32.
    pub fn embedding() -> Self {
        Self::new(QuantFormat::Int {
            bits: 8,
            asym: false,
        })
    }

    /// The group a row of `cols` uses, or an error naming the recipe.
    pub fn group_for(&self, cols: usize) -> marlin_quant::Result<usize> {
        self.format.resolve_group(self.group, cols)
    }
}

impl std::fmt::Display for QuantizeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.group {
            0 => write!(f, "{} per channel", self.format),
            g => write!(f, "{} g{g}", self.format),
        }
    }
}

/// What the loader does with each matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Precision of unquantized weights (and of GGUF's quantized ones when `keep_packed` is off).
    pub dtype: DenseFormat,
    /// GGUF's quantized tensors run packed (the default); off, they are dequantized to `dtype`.
    pub keep_packed: bool,
    /// Quantize every linear layer on load (RTN).
    pub quantize: Option<QuantizeSpec>,
    /// The recipe for the embedding and lm_head under `quantize` (default int8 g32).
    pub embedding: QuantizeSpec,
}

impl LoadOptions {
    pub fn new(dtype: DenseFormat) -> Self {
        Self {
            dtype,
            keep_packed: true,
            quantize: None,
            embedding: QuantizeSpec::embedding(),
        }
    }
}

/// Per tensor: what `to_host_weight` should do beyond converting to the dtype.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightPolicy {
    /// Convert GGML blocks to a packed tensor instead of dequantizing.
    pub keep_packed: bool,
    /// Quantize with RTN to this recipe.
    pub quantize: Option<QuantizeSpec>,
}

/// Token embedding or output projection (kept at higher precision), by Hugging Face name.
pub fn is_embedding(hf_name: &str) -> bool {
    matches!(hf_name, "model.embed_tokens.weight" | "lm_head.weight")
}

/// A source whose tensors carry `options`' policy.
pub struct PolicySource<'a> {
    pub inner: &'a dyn TensorSource,
    pub options: LoadOptions,
}

impl TensorSource for PolicySource<'_> {
    fn get(&self, hf_name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(mut t) = self.inner.get(hf_name)? else {
            return Ok(None);
        };
        t.policy = WeightPolicy {
            keep_packed: self.options.keep_packed,
            quantize: self.options.quantize.map(|q| {
                if is_embedding(hf_name) {
                    self.options.embedding
                } else {
                    q
                }
            }),
        };
        Ok(Some(t))
    }

    fn packed(
        &self,
        hf_name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<marlin_quant::QuantTensor>> {
        self.inner.packed(hf_name, rows, cols)
    }

    fn location(&self) -> &Path {
        self.inner.location()
    }
}

/// Checks, before any work, that every matrix row length of a model works with the recipe.
pub fn check_recipe(
    path: &Path,
    options: &LoadOptions,
    linear_cols: &[usize],
    embedding_cols: usize,
) -> Result<()> {
    let Some(spec) = options.quantize else {
        return Ok(());
    };
    for &cols in linear_cols {
        spec.group_for(cols)
            .map_err(|e| ModelError::format(path, format!("cannot quantize to {spec}: {e}")))?;
    }
    options.embedding.group_for(embedding_cols).map_err(|e| {
        ModelError::format(
            path,
            format!(
                "cannot quantize the embedding to {}: {e}",
                options.embedding
            ),
        )
    })?;
    Ok(())
}
