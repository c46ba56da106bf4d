"""Certifying a risk bound from a sample: exact binomial p-values and Learn-then-Test with fixed-sequence testing.

A setting's loss on one input is 0 or 1 (for exits: the early prediction differs from the full-depth one, or is wrong
where full depth is right); its risk is the expected loss on new inputs. Given `k` losses on `n` calibration inputs,
the null hypothesis "risk > epsilon" is rejected when `P(Binomial(n, epsilon) <= k) <= delta`. Testing the
settings in a sequence fixed before seeing the data and stopping at the first one not rejected controls the
family-wise error at `delta` (Angelopoulos et al., *Learn then Test*, 2021): with probability at least `1 - delta`
over the calibration sample, every setting rejected has risk at most `epsilon` on new inputs exchangeable with it.
"""

from __future__ import annotations

import math

import numpy as np


def _check_level(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}={value!r}` must be a probability strictly between 0 and 1.")


def binomial_cdf(counts: np.ndarray | int, n: int, p: float) -> np.ndarray:
    """`P(Binomial(n, p) <= k)` for every `k` in `counts`, exact in float64 (summed in log space).

    Args:
        counts: observed numbers of losses, each in `[0, n]`.
        n: number of trials.
        p: success probability in `[0, 1]`.

    Returns:
        An array shaped like `counts`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if p <= 0.0:
        return np.ones(counts.shape)
    if p >= 1.0:
        return (counts >= n).astype(np.float64)
    j = np.arange(n + 1, dtype=np.float64)
    log_choose = np.array([math.lgamma(n + 1)]) - _lgamma(j + 1) - _lgamma(n - j + 1)
    log_pmf = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
    cdf = np.exp(np.minimum(np.logaddexp.accumulate(log_pmf), 0.0))
    return cdf[np.clip(counts, 0, n)]


def _lgamma(values: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(value) for value in values.tolist()])


def binomial_p_values(counts: np.ndarray | int, n: int, epsilon: float) -> np.ndarray:
    """Exact p-values of "risk > epsilon" given `counts` losses in `n` samples: `P(Binomial(n, epsilon) <= k)`."""
    _check_level("epsilon", epsilon)
    return binomial_cdf(counts, n, epsilon)


def clopper_pearson_upper(count: int, n: int, delta: float) -> float:
    """The one-sided `1 - delta` Clopper-Pearson upper bound of a risk with `count` losses in `n` samples.

    The largest risk `r` with `P(Binomial(n, r) <= count) >= delta` (bisection to 1e-9); 1.0 when `count == n`.
    """
    _check_level("delta", delta)
    if count >= n:
        return 1.0
    low, high = count / n, 1.0
    while high - low > 1e-9:
        middle = (low + high) / 2
        if binomial_cdf(count, n, middle) >= delta:
            low = middle
        else:
            high = middle
    return high


def minimum_samples(epsilon: float, delta: float) -> int:
    """The fewest samples that can certify any risk `<= epsilon` with confidence `1 - delta`.

    Even a setting with no loss at all is certified only when `(1 - epsilon) ** n <= delta`, i.e.
    `n >= ln(1 / delta) / -ln(1 - epsilon)` (about `ln(1 / delta) / epsilon`).
    """
    _check_level("epsilon", epsilon)
    _check_level("delta", delta)
    return math.ceil(math.log(delta) / math.log1p(-epsilon) - 1e-9)


def fixed_sequence_test(p_values: np.ndarray, delta: float) -> np.ndarray:
    """How many leading hypotheses are rejected when tested in order at level `delta`, stopping at the first kept.

    Args:
        p_values: `(..., num_settings)` p-values in the fixed testing order (most conservative setting first);
            leading dimensions are independent tests (e.g. calibration draws).
        delta: the family-wise error level.

    Returns:
        `(...)` integer counts: settings `0 .. count - 1` are certified.
    """
    _check_level("delta", delta)
    rejected = np.asarray(p_values) <= delta
    return np.cumprod(rejected, axis=-1).sum(axis=-1)
