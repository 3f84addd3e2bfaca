"""The polynomial label vector ℓ(l) (all monomials up to an order) and its derivative."""

from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np

from astra_dagster.methods.thecannon.flags import CannonError


def polynomial_terms(n_labels: int, order: int) -> np.ndarray:
    """Exponent matrix (T, K) of the label vector: row 0 is the constant term, then all monomials
    of degree 1..order in lexicographic order (the same order as annieslasso's
    ``PolynomialVectorizer``: ``1, a, b, a², ab, b²`` for two labels, order 2)."""
    if n_labels < 1:
        raise CannonError(f"a Cannon model needs at least one label, got {n_labels}")
    if not 1 <= order <= 4:
        raise CannonError(f"order must be 1..4, got {order}")
    rows = [np.zeros(n_labels, dtype=np.int64)]
    for degree in range(1, order + 1):
        for combo in combinations_with_replacement(range(n_labels), degree):
            row = np.zeros(n_labels, dtype=np.int64)
            for k in combo:
                row[k] += 1
            rows.append(row)
    return np.array(rows)


def _powers(scaled: np.ndarray, order: int) -> np.ndarray:
    """(B, K, order + 1) table of l**e."""
    out = np.empty((*scaled.shape, order + 1))
    out[..., 0] = 1.0
    for e in range(1, order + 1):
        out[..., e] = out[..., e - 1] * scaled
    return out


def label_vector(scaled: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """ℓ for scaled labels (B, K) → (B, T)."""
    pw = _powers(np.atleast_2d(scaled), int(terms.max()))
    k = np.arange(terms.shape[1])
    return np.prod(pw[:, k[None, :], terms], axis=2)


def label_vector_derivative(scaled: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """∂ℓ/∂l for scaled labels (B, K) → (B, T, K)."""
    pw = _powers(np.atleast_2d(scaled), int(terms.max()))
    kk = np.arange(terms.shape[1])
    factors = pw[:, kk[None, :], terms]                               # (B, T, K)
    dfactors = terms * pw[:, kk[None, :], np.maximum(terms - 1, 0)]   # d(l_k^e)/dl_k
    out = np.empty(factors.shape)
    for k in range(terms.shape[1]):
        others = np.prod(np.delete(factors, k, axis=2), axis=2) if terms.shape[1] > 1 else 1.0
        out[:, :, k] = dfactors[:, :, k] * others
    return out
