#!/usr/bin/env python3
"""A straightforward numpy GPTQ (no lazy blocks, no threads), written from the paper and the
reference `gptq.py`, to check crates/quant/src/gptq.rs against.

Writes tests/fixtures/gptq/small.txt: a tiny W, its Hessian, and the codes and dequantized
weights this implementation produces, with and without act-order. Run once:

    python3 scripts/gptq_reference.py

The grid is the reference implementation's min-max quantizer (`Quantizer.find_params` with
`weight=True`, per row): xmin = min(0, min x), xmax = max(0, max x); asymmetric scale
(xmax - xmin) / maxq and zero = round(-xmin / scale); round half to even.

One deliberate difference from gptq.py: a group's parameters are fitted to the *current*
(error-updated) weights of the group. gptq.py fits them to `W[:, i:i+g]`, which inside a lazy
block has not yet received that block's updates; with no lazy blocks here there is no stale copy.
"""

import os
import numpy as np


def fit(x, maxq):
    xmin = min(0.0, float(x.min()))
    xmax = max(0.0, float(x.max()))
    if xmin == 0.0 and xmax == 0.0:
        xmin, xmax = -1.0, 1.0
    scale = np.float32((xmax - xmin) / maxq)
    zero = np.float32(np.round(-xmin / scale))
    return scale, zero


def quantize(v, scale, zero, maxq):
    q = np.clip(np.round(np.float32(v) / scale) + zero, 0, maxq)
    return int(q), np.float32(scale * (np.float32(q) - zero))


def gptq(W, H, bits, group, act_order, damp=0.01):
    W = W.astype(np.float32).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Hinv = np.linalg.inv(L).T @ np.linalg.inv(L)  # cholesky_inverse
    U = np.linalg.cholesky(Hinv).T.astype(np.float32)  # upper: Hinv = U^T U
    codes = np.zeros((rows, cols), dtype=np.int64)
    deq = np.zeros((rows, cols), dtype=np.float32)
    params = [None] * rows
    for i in range(cols):
        for r in range(rows):
            if i % group == 0:
                params[r] = fit(W[r, i : i + group], maxq)
            scale, zero = params[r]
            c, q = quantize(W[r, i], scale, zero, maxq)
            codes[r, i] = c
            deq[r, i] = q
            e = np.float32((W[r, i] - q) / U[i, i])
            W[r, i + 1 :] -= e * U[i, i + 1 :]
    if perm is not None:
        out = np.zeros_like(deq)
        out[:, perm] = deq
        deq = out
    return codes, deq, perm


def main():
    rng = np.random.default_rng(7)
    rows, cols, n = 8, 64, 256
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    X = (rng.standard_normal((n, cols)) @ mix) * rng.uniform(0.2, 3.0, cols)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / n
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gptq")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "small.txt"), "w") as f:
        f.write("# GPTQ reference fixture from scripts/gptq_reference.py\n")
        f.write(f"shape {rows} {cols}\n")
        f.write("W " + " ".join(repr(float(v)) for v in W.ravel()) + "\n")
        f.write("H " + " ".join(repr(float(v)) for v in H.ravel()) + "\n")
        for bits, group, act in [(4, 32, False), (3, 16, True), (2, 64, False)]:
            codes, deq, perm = gptq(W, H, bits, group, act)
            f.write(f"case {bits} {group} {int(act)}\n")
            f.write("codes " + " ".join(str(int(c)) for c in codes.ravel()) + "\n")
            f.write("deq " + " ".join(repr(float(v)) for v in deq.ravel()) + "\n")
            f.write("perm " + (" ".join(str(int(p)) for p in perm) if perm is not None else "-") + "\n")


if __name__ == "__main__":
    main()
