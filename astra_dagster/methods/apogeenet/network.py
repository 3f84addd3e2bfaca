"""The 1-D convolutional network in numpy (forward and backward passes written out: convolutions
as matrix products of shifted slices) and its Adam optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from astra_dagster.methods.apogeenet.flags import ApogeeNetError

#: Default architecture: (kernel size, output channels) per conv block, then the dense width.
DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((7, 8), (5, 16), (5, 16), (5, 32), (3, 32))
DEFAULT_HIDDEN = 128

# ----------------------------------------------------------------------------- the network


def _pad_flat(h: np.ndarray, k: int) -> np.ndarray:
    """(B, L, C) → (B·(L+k−1), C): each row 'same'-padded with zeros, rows stacked contiguously.

    A convolution is then k matrix products of contiguous row slices of this array (shift j
    reads rows j … j+M−1), which is several times faster than copying an im2col window matrix
    whose innermost axis has only C floats (measured). Output rows that straddle two spectra
    are computed and thrown away ((k−1)/L extra work).
    """
    B, L, C = h.shape
    pad = k // 2
    xp = np.zeros((B, L + k - 1, C), dtype=h.dtype)
    xp[:, pad: pad + L, :] = h
    return xp.reshape(B * (L + k - 1), C)


def _conv(xf: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``xf`` (from :func:`_pad_flat`) convolved with ``w`` (k·C, c), ordering j·C + c_in:
    (B·(L+k−1), c) with the last k−1 rows zero; the valid outputs of spectrum b are rows
    b·(L+k−1) … b·(L+k−1)+L−1."""
    n_rows, C = xf.shape
    m = n_rows - (k - 1)
    y = np.zeros((n_rows, w.shape[1]), dtype=xf.dtype)
    if C < 4:
        # one or two input channels: k products with a C-wide inner dimension are outer
        # products (slow); a (m, k·C) window matrix is cheap to build here
        cols = np.empty((m, k * C), dtype=xf.dtype)
        for j in range(k):
            cols[:, j * C: (j + 1) * C] = xf[j: j + m]
        y[:m] = cols @ w
        return y
    tmp = np.empty((m, w.shape[1]), dtype=xf.dtype)  # one buffer for the k products
    for j in range(k):
        np.matmul(xf[j: j + m], w[j * C: (j + 1) * C], out=tmp)
        y[:m] += tmp
    return y


class _Network:
    """Parameters and forward/backward passes of the conv stack + dense head."""

    def __init__(self, n_in: int, blocks: Sequence[tuple[int, int]], hidden: int, n_out: int,
                 rng: np.random.Generator | None = None) -> None:
        self.blocks = tuple((int(k), int(c)) for k, c in blocks)
        self.hidden = int(hidden)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        length = self.n_in
        for _ in self.blocks:
            if length % 2:
                raise ApogeeNetError(f"input length {self.n_in} is not divisible by 2^{len(self.blocks)}")
            length //= 2
        self.n_flat = length * self.blocks[-1][1]
        self.params: dict[str, np.ndarray] = {}
        if rng is not None:
            c_in = 1
            for i, (k, c) in enumerate(self.blocks):
                self.params[f"conv{i}_w"] = (rng.standard_normal((c_in * k, c)) * math.sqrt(2.0 / (c_in * k)))
                self.params[f"conv{i}_b"] = np.zeros(c)
                c_in = c
            self.params["dense_w"] = rng.standard_normal((self.n_flat, self.hidden)) * math.sqrt(2.0 / self.n_flat)
            self.params["dense_b"] = np.zeros(self.hidden)
            self.params["out_w"] = rng.standard_normal((self.hidden, self.n_out)) * math.sqrt(1.0 / self.hidden)
            self.params["out_b"] = np.zeros(self.n_out)
            self.params = {k: v.astype(np.float32) for k, v in self.params.items()}

    def n_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def forward(self, x: np.ndarray, keep: bool = False) -> tuple[np.ndarray, list[Any]]:
        """Outputs (B, n_out) for inputs (B, n_in); with ``keep`` the activations for backward."""
        h = np.asarray(x)[:, :, None]
        cache: list[Any] = []
        for i, (k, c) in enumerate(self.blocks):
            B, L, _ = h.shape
            xf = _pad_flat(h, k)
            y = _conv(xf, self.params[f"conv{i}_w"], k).reshape(B, L + k - 1, c)
            # max-pool before bias + ReLU (both monotone, so the order does not matter): half the work
            even, odd = y[:, 0:L:2, :], y[:, 1:L:2, :]
            pooled = np.maximum(even, odd)
            pooled += self.params[f"conv{i}_b"]
            if keep:
                positive = pooled > 0
                pooled *= positive
                cache.append((xf, h.shape, positive, even >= odd))
            else:
                np.maximum(pooled, 0.0, out=pooled)
            h = pooled
        flat = h.reshape(h.shape[0], -1)
        a = flat @ self.params["dense_w"]
        a += self.params["dense_b"]
        np.maximum(a, 0.0, out=a)
        out = a @ self.params["out_w"] + self.params["out_b"]
        if keep:
            cache.append((flat, a, h.shape))
        return out, cache

    def backward(self, dout: np.ndarray, cache: list[Any], input_grad: bool = False) -> dict[str, np.ndarray]:
        """Gradients of the loss for ∂loss/∂out = ``dout`` (with ``input_grad`` also of the
        input, key ``"x"``)."""
        grads: dict[str, np.ndarray] = {}
        flat, a, hshape = cache[-1]
        grads["out_w"] = a.T @ dout
        grads["out_b"] = dout.sum(axis=0)
        da = dout @ self.params["out_w"].T
        da *= a > 0
        grads["dense_w"] = flat.T @ da
        grads["dense_b"] = da.sum(axis=0)
        dh = (da @ self.params["dense_w"].T).reshape(hshape)
        for i in range(len(self.blocks) - 1, -1, -1):
            k, c = self.blocks[i]
            xf, in_shape, positive, first = cache[i]
            B, L, C = in_shape
            dh = dh * positive
            grads[f"conv{i}_b"] = dh.sum(axis=(0, 1))
            # route the pooled gradient to the winning position; padding rows stay zero
            dy = np.zeros((B, L + k - 1, c), dtype=dh.dtype)
            dy[:, 0:L:2, :] = dh * first
            dy[:, 1:L:2, :] = dh * ~first
            dyf = dy.reshape(B * (L + k - 1), c)
            m = dyf.shape[0] - (k - 1)
            w = self.params[f"conv{i}_w"]
            gw = np.empty_like(w)
            for j in range(k):
                gw[j * C: (j + 1) * C] = xf[j: j + m].T @ dyf[:m]
            grads[f"conv{i}_w"] = gw
            if i == 0 and not input_grad:
                break
            dxf = np.zeros_like(xf)
            for j in range(k):
                dxf[j: j + m] += dyf[:m] @ w[j * C: (j + 1) * C].T
            pad = k // 2
            dh = dxf.reshape(B, L + k - 1, C)[:, pad: pad + L, :]
        if input_grad:
            grads["x"] = dh[:, :, 0]
        return grads

    def predict(self, x: np.ndarray, batch: int = 8) -> np.ndarray:
        """Forward pass in chunks (no activations kept)."""
        out = np.empty((x.shape[0], self.n_out), dtype=np.float32)
        for s in range(0, x.shape[0], batch):
            out[s: s + batch] = self.forward(x[s: s + batch])[0]
        return out


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float = 0.0,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1 = 1.0 - self.b1**self.t
        c2 = 1.0 - self.b2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            update = (m / c1) / (np.sqrt(v / c2) + self.eps)
            if self.wd and k.endswith("_w"):  # decoupled weight decay (AdamW), weights only
                update = update + self.wd * params[k]
            params[k] -= (lr * update).astype(np.float32)
