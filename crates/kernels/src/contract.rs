//! What each op asks of its buffers, checked alike by every backend before it touches one: the
//! error names the op and the buffer, and says how many elements it holds and needs.

use crate::{check, Result, StepBatch};

/// A buffer of `have` elements where the op reads or writes `need`.
pub(crate) fn len_check(op: &str, what: &str, have: usize, need: usize) -> Result<()> {
    check(have >= need, op, || {
        format!("{what} holds {have} elements, needs {need}")
    })
}

pub(crate) fn rms_norm(x: usize, weight: usize, out: usize, rows: usize, dim: usize) -> Result<()> {
    len_check("rms_norm", "x", x, rows * dim)?;
    len_check("rms_norm", "weight", weight, dim)?;
    len_check("rms_norm", "out", out, rows * dim)
}

/// `table` holds a row of `head_dim` for every position up to the batch's last.
pub(crate) fn rope(
    x: usize,
    table: usize,
    batch: &StepBatch,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    check(head_dim.is_multiple_of(2), "rope", || {
        format!("odd head_dim {head_dim}")
    })?;
    len_check("rope", "x", x, batch.num_tokens() * heads * head_dim)?;
    let max_pos = batch.positions.iter().max().map_or(0, |&p| p as usize);
    len_check("rope", "table", table, (max_pos + 1) * head_dim)
}

/// `rows` rows of `k` in x, of `n` in out (`matmul`, and each weight of `matmul_many`).
pub(crate) fn matmul(
    op: &str,
    x: usize,
    out: usize,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    len_check(op, "x", x, rows * k)?;
    len_check(op, "out", out, rows * n)
}

/// A key and a value row of `slot_width` for each of the batch's tokens.
pub(crate) fn write_kv(k: usize, v: usize, tokens: usize, slot_width: usize) -> Result<()> {
    len_check("write_kv", "k", k, tokens * slot_width)?;
    len_check("write_kv", "v", v, tokens * slot_width)
}

pub(crate) fn silu_mul(gate: usize, up: usize, out: usize, len: usize) -> Result<()> {
    len_check("silu_mul", "gate", gate, len)?;
    len_check("silu_mul", "up", up, len)?;
    len_check("silu_mul", "out", out, len)
}

pub(crate) fn add(x: usize, y: usize, len: usize) -> Result<()> {
    len_check("add", "x", x, len)?;
    len_check("add", "y", y, len)
}

/// x holds the batch's token rows; out, its logit rows, each of which names one of them.
pub(crate) fn gather_logit_rows(x: usize, out: usize, batch: &StepBatch, dim: usize) -> Result<()> {
    let (n, rows) = (batch.num_tokens(), &batch.logit_rows);
    len_check("gather_logit_rows", "x", x, n * dim)?;
    len_check("gather_logit_rows", "out", out, rows.len() * dim)?;
    match rows.iter().find(|&&r| r as usize >= n) {
        Some(&r) => check(false, "gather_logit_rows", || {
            format!("row {r} of {n} tokens")
        }),
        None => Ok(()),
    }
}
