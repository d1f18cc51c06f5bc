//! Packed weights re-laid for the tensor-core decode kernel (`qgemv.cu` says the layout).

use marlin_quant::packed::get_code;
use marlin_quant::{QuantFormat, QuantTensor};
use rayon::prelude::*;

/// The host side of a re-laid weight.
pub(crate) struct Relaid {
    /// 16-feature strips.
    pub strips: usize,
    /// Chunks of 16 `tile_span` columns: one 16-byte word per lane per strip.
    pub chunks: usize,
    pub groups: usize,
    /// Codes, `strips * chunks * 32 * 4` words.
    pub words: Vec<u32>,
    /// int3: the codes' third bits, `strips * chunks * 32 * 2` words (8 bytes a lane).
    pub planes: Option<Vec<u32>>,
    /// Per (strip, group) 8 words, word g holding the f16 scales of features g (low half) and
    /// g + 8. The E8M0 / E4M3 byte scales (mxfp4 / nvfp4) go per (strip, pair of groups): word g
    /// holds features g and g + 8 of the even group in bytes 0 and 1, of the odd group in 2 and 3.
    pub scales: Vec<u32>,
    pub offsets: Option<Vec<u32>>,
}

/// k-tiles of 16 columns a lane's 16-byte word holds: 8 codes a tile.
pub(crate) fn tile_span(format: QuantFormat) -> usize {
    match format.bits() {
        8 => 2,
        4 => 4,
        _ => 8,
    }
}

/// Whether the decode kernel takes this tensor: each lane's run of 4 `tile_span` columns must lie
/// in one group (2- and 3-bit runs are 32 columns, so groups of 16 do not fit; the CLI's groups
/// are 32, 64, 128 or whole rows).
pub(crate) fn supported(t: &QuantTensor) -> bool {
    t.groups_per_row() == 1 || t.group.is_multiple_of(4 * tile_span(t.format))
}

/// The kernels' name for a format (`qgemv_{tag}_*`, `dequant_{tag}`, `embedding_{tag}`).
pub(crate) fn tag(format: QuantFormat) -> String {
    match format {
        QuantFormat::Int { bits, asym } => format!("int{bits}{}", if asym { "a" } else { "" }),
        other => other.to_string(),
    }
}

/// Where code h of register j of tile i of a lane's chunk sits: (word of the lane's four, bit).
/// int3 puts its low two bits here (as int2) and its third bit in the plane (`plane_bit`).
fn place(format: QuantFormat, i: usize, j: usize, h: usize) -> (usize, usize) {
    match (format, format.bits()) {
        (QuantFormat::Fp8, _) => (2 * i + (j >> 1), 8 * (2 * h + 1 - (j & 1))),
        (_, 8) => (2 * i + (j >> 1), 8 * (2 * (j & 1) + h)),
        (_, 4) => (i, 4 * (j + 4 * h)),
        _ => (i >> 1, 2 * (j + 4 * (i & 1)) + 16 * h),
    }
}

/// int3's third bit of the same code: (word of the lane's two plane words, bit).
fn plane_bit(i: usize, j: usize, h: usize) -> (usize, usize) {
    (i >> 2, j + 4 * (i & 3) + 16 * h)
}

pub(crate) fn relay(t: &QuantTensor) -> Relaid {
    let (format, bits) = (t.format, t.format.bits());
    let (n, k) = (t.rows, t.cols);
    let tpu = tile_span(format);
    let chunks = k.div_ceil(16 * tpu);
    let strips = n.div_ceil(16);
    let groups = t.groups_per_row();
    let rb = t.row_bytes();
    // Padding codes are worth zero (symmetric integers, floats) or meet zero activations
    // (columns past k).
    let pad = match format {
        QuantFormat::Int { asym: false, .. } => 1u32 << (bits - 1),
        _ => 0,
    };
    let code = |row: usize, col: usize| -> u32 {
        if row < n && col < k {
            get_code(&t.codes[row * rb..(row + 1) * rb], bits, col) as u32
        } else {
            pad
        }
    };
    let lane_words = chunks * 32;
    let mut words = vec![0u32; strips * lane_words * 4];
    let mut planes = (bits == 3).then(|| vec![0u32; strips * lane_words * 2]);
    // Strips are independent: re-laying a Llama-3-8B takes seconds on one core, so use them all.
    let fill = |s: usize, words: &mut [u32], mut planes: Option<&mut [u32]>| {
        for c in 0..chunks {
            for lane in 0..32 {
                let (g, tq) = (lane / 4, lane % 4);
                let at = c * 32 + lane;
                for i in 0..tpu {
                    for j in 0..4 {
                        for h in 0..2 {
                            let row = s * 16 + g + (j & 1) * 8;
                            let col = c * 16 * tpu + 4 * tpu * tq + 4 * i + 2 * (j >> 1) + h;
                            let v = code(row, col);
                            let (w, bit) = place(format, i, j, h);
                            match planes.as_deref_mut() {
                                Some(p) => {
                                    words[at * 4 + w] |= (v & 3) << bit;
                                    let (w, bit) = plane_bit(i, j, h);
                                    p[at * 2 + w] |= (v >> 2) << bit;
                                }
                                None => words[at * 4 + w] |= v << bit,
                            }
                        }
                    }
                }
            }
        }
    };
    match &mut planes {
        Some(p) => words
            .par_chunks_mut(lane_words * 4)
            .zip(p.par_chunks_mut(lane_words * 2))
            .enumerate()
            .for_each(|(s, (w, p))| fill(s, w, Some(p))),
        None => words
            .par_chunks_mut(lane_words * 4)
            .enumerate()
            .for_each(|(s, w)| fill(s, w, None)),
    }
    // Per (strip, group) or (strip, pair of groups), word g = the scales of features g and g + 8,
    // `width` bytes each.
    let pairs = |bytes: &[u8], width: usize| -> Vec<u32> {
        let value = |r: usize, gi: usize| -> u32 {
            if r >= n || gi >= groups {
                return 0;
            }
            let i = (r * groups + gi) * width;
            if width == 2 {
                u16::from_le_bytes([bytes[i], bytes[i + 1]]) as u32
            } else {
                bytes[i] as u32
            }
        };
        // A word holds 4 bytes: two features of `2 / width` groups.
        let per_word = 2 / width;
        let slots = groups.div_ceil(per_word);
        let mut out = vec![0u32; strips * slots * 8];
        for s in 0..strips {
            for slot in 0..slots {
                for g in 0..8 {
                    let r = s * 16 + g;
                    out[(s * slots + slot) * 8 + g] = (0..per_word)
                        .map(|p| {
                            let gi = slot * per_word + p;
                            (value(r, gi) | value(r + 8, gi) << (8 * width)) << (16 * p)
                        })
                        .fold(0, |a, b| a | b);
                }
            }
        }
        out
    };
    Relaid {
        strips,
        chunks,
        groups,
        words,
        planes,
        scales: pairs(&t.scales, format.scale_bytes()),
        offsets: t.offsets.as_deref().map(|o| pairs(o, 2)),
    }
}
