//! Int4/int8 weights re-laid for the tensor-core decode kernel (`qgemv.cu` says the layout).

use marlin_quant::packed::get_code;
use marlin_quant::{QuantFormat, QuantTensor};
use rayon::prelude::*;

/// The host side of a re-laid weight.
pub(crate) struct Relaid {
    pub bits: usize,
    pub asym: bool,
    /// 16-feature strips.
    pub strips: usize,
    /// Chunks of 64 (int4) or 32 (int8) columns: one 16-byte word per lane per strip.
    pub chunks: usize,
    pub groups: usize,
    /// Codes, `strips * chunks * 32 * 4` words.
    pub words: Vec<u32>,
    /// f16 pairs, `strips x groups x 8` (see `qgemv.cu`).
    pub scales: Vec<u32>,
    pub offsets: Option<Vec<u32>>,
}

/// Whether the decode kernel takes this tensor as it is (int4/int8 without act-order).
pub(crate) fn supported(t: &QuantTensor) -> bool {
    matches!(t.format, QuantFormat::Int { bits: 4 | 8, .. }) && t.perm.is_none()
}

pub(crate) fn relay(t: &QuantTensor) -> Relaid {
    let (bits, asym) = (t.format.bits(), t.format.is_asym());
    let (n, k) = (t.rows, t.cols);
    let tpu = if bits == 4 { 4 } else { 2 };
    let chunks = k.div_ceil(16 * tpu);
    let strips = n.div_ceil(16);
    let groups = t.groups_per_row();
    let rb = t.row_bytes();
    // Padding codes are worth zero (symmetric) or meet zero activations (columns past k).
    let pad = if asym { 0u32 } else { 1 << (bits - 1) };
    let mut words = vec![0u32; strips * chunks * 32 * 4];
    // Strips are independent: re-laying a Llama-3-8B takes seconds on one core, so use them all.
    words
        .par_chunks_mut(chunks * 32 * 4)
        .enumerate()
        .for_each(|(s, words)| {
            for c in 0..chunks {
                for lane in 0..32 {
                    let (g, tq) = (lane / 4, lane % 4);
                    let base = (c * 32 + lane) * 4;
                    for i in 0..tpu {
                        for j in 0..4 {
                            for h in 0..2 {
                                let row = s * 16 + g + (j & 1) * 8;
                                let col = c * 16 * tpu + 4 * tpu * tq + 4 * i + 2 * (j >> 1) + h;
                                let code = if row < n && col < k {
                                    get_code(&t.codes[row * rb..(row + 1) * rb], bits, col) as u32
                                } else {
                                    pad
                                };
                                if bits == 4 {
                                    words[base + i] |= code << (4 * (j + 4 * h));
                                } else {
                                    let byte = (j & 1) * 2 + h;
                                    words[base + 2 * i + (j >> 1)] |= code << (8 * byte);
                                }
                            }
                        }
                    }
                }
            }
        });
    // Per (strip, group), word g = the f16 values of features g (low half) and g + 8.
    let pairs = |bytes: &[u8]| -> Vec<u32> {
        let f16 = |r: usize, gi: usize| -> u32 {
            if r >= n {
                return 0;
            }
            let i = r * groups + gi;
            u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32
        };
        let mut out = vec![0u32; strips * groups * 8];
        for s in 0..strips {
            for gi in 0..groups {
                for g in 0..8 {
                    let r = s * 16 + g;
                    out[(s * groups + gi) * 8 + g] = f16(r, gi) | f16(r + 8, gi) << 16;
                }
            }
        }
        out
    };
    Relaid {
        bits,
        asym,
        strips,
        chunks,
        groups,
        words,
        scales: pairs(&t.scales),
        offsets: t.offsets.as_deref().map(pairs),
    }
}
