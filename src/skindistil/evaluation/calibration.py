"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits, p = softmax(z / T)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities softmax(logits / temperature), row-wise. T > 1 softens, T < 1 sharpens;
    the argmax never changes."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-np.mean(logp[np.arange(len(logp)), np.asarray(labels)]))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature in `bounds` that minimises `temperature_nll` on (logits, labels).

    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), hence unimodal
    in log T, so a bounded scalar search on log T finds the global minimum. When the data would
    favour T outside `bounds` (e.g. separable logits drive T to 0), the nearest bound is returned.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits (N, K) and N labels, got {logits.shape} and {labels.shape}")
    low, high = np.log(bounds[0]), np.log(bounds[1])
    result = minimize_scalar(
        lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))
