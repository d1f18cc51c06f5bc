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
    /// 16-byte chunks per lane per strip (4 k-tiles for int4, 2 for int8).
    pub chunks: usize,
    pub groups: usize,
    /// Codes, `strips * chunks * 32 * 4` words.
    pub words: Vec<u32>,
    /// f16 bits, `groups x strips * 16` (feature-major within a group).
    pub scales: Vec<u16>,
    pub offsets: Option<Vec<u16>>,
}

/// Whether the decode kernel takes this tensor as it is (int4/int8 without act-order).
pub(crate) fn supported(t: &QuantTensor) -> bool {
    matches!(t.format, QuantFormat::Int { bits: 4 | 8, .. }) && t.perm.is_none()
}

pub(crate) fn relay(t: &QuantTensor) -> Relaid {
    let (bits, asym) = (t.format.bits(), t.format.is_asym());
    let (n, k) = (t.rows, t.cols);
    let tpu = if bits == 4 { 4 } else { 2 };
    let chunks = k.div_ceil(16).div_ceil(tpu);
    let strips = n.div_ceil(16);
    let np = strips * 16;
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
            for kt in 0..chunks * tpu {
                for lane in 0..32 {
                    let (g, tq) = (lane / 4, lane % 4);
                    let base = ((kt / tpu) * 32 + lane) * 4;
                    for j in 0..4 {
                        for h in 0..2 {
                            let row = s * 16 + g + (j & 1) * 8;
                            let col = kt * 16 + 2 * tq + (j >> 1) * 8 + h;
                            let code = if row < n && col < k {
                                get_code(&t.codes[row * rb..(row + 1) * rb], bits, col) as u32
                            } else {
                                pad
                            };
                            if bits == 4 {
                                words[base + kt % 4] |= code << (4 * (j + 4 * h));
                            } else {
                                let byte = (j & 1) * 2 + h;
                                words[base + (kt % 2) * 2 + (j >> 1)] |= code << (8 * byte);
                            }
                        }
                    }
                }
            }
        });
    let f16s = |bytes: &[u8]| -> Vec<u16> {
        let mut out = vec![0u16; groups * np];
        for r in 0..n {
            for gi in 0..groups {
                let i = r * groups + gi;
                out[gi * np + r] = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
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
        scales: f16s(&t.scales),
        offsets: t.offsets.as_deref().map(f16s),
    }
}
