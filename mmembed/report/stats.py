"""Seed statistics for the reproduction report: mean ± sample std per cell, and claim verdicts against noise.

A claim "A better than B" meets three tests, each a 95% two-sided interval for the difference A − B (``scipy.stats``):

* **paired by seed** (primary): the arms of every table share their start per seed (Tables 8-10 fine-tune the same
  seed's stage-2 model; Table 7's consecutive rows are stages of the same seed's pipeline), so the per-seed
  differences are tested with ``scipy.stats.ttest_rel`` and its t interval (k − 1 degrees of freedom);
* **paired query bootstrap** (primary, with the seed test, where eval files exist; ``mmembed.report.bootstrap``):
  the same eval queries resampled for both arms, the 2.5-97.5% percentile interval;
* **Welch** (secondary, unpaired): ``scipy.stats.ttest_ind(equal_var=False)`` and its interval.

Each test gives one of five symmetric labels, oriented by the claimed direction: *holds beyond noise* (the interval
lies on the claimed side of 0), *contradicted beyond noise* (it lies on the other side), *within noise (right sign)* /
*within noise (wrong sign)* (it holds 0; the point estimate's sign), or *not testable* (identical arms, fewer than two
seeds for a seed test, or a side not run). The primary verdict is the paired seed test's label, made conservative by
the query bootstrap when there is one: beyond noise (either way) only when both tests say so, else within noise with
the sign of the paired seed mean. Seed noise and query noise are separate: the seed test keeps the eval queries fixed,
the bootstrap keeps the trained models fixed, so an effect is beyond noise only when it clears both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

BEYOND = "holds beyond noise"
WITHIN_RIGHT = "within noise (right sign)"
WITHIN_WRONG = "within noise (wrong sign)"
CONTRADICTED = "contradicted beyond noise"
NOT_TESTABLE = "not testable"
LABELS = (BEYOND, WITHIN_RIGHT, WITHIN_WRONG, CONTRADICTED, NOT_TESTABLE)  # the headline counts, in this order
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Cell:
    """The values of one table cell, one per seed.

    Attributes:
        values: ``{seed: value}`` of the runs that finished with a finite value.
        runs: ``{seed: run id}`` of those runs (for the per-query bootstrap; may be empty).
    """

    values: Mapping[str, float] = field(default_factory=dict)
    runs: Mapping[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values.values()) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (``ddof=1``); NaN with fewer than two seeds."""
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values.values()) / (self.n - 1))

    def fmt(self, digits: int = 2) -> str:
        """``mean ± std (n=N)``; ``mean (n=1)``; ``—`` without values."""
        if not self.n:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def combine(a: Cell, b: Cell, how: str = "mean") -> Cell:
    """Per-seed combination of two cells over their common seeds (``how="mean"``: Table 8/10's "Avg.")."""
    if how != "mean":
        raise ValueError(f"unknown combination {how!r}")
    seeds = [s for s in a.values if s in b.values]
    return Cell({s: (a.values[s] + b.values[s]) / 2 for s in seeds},
                {s: a.runs[s] for s in seeds if s in a.runs and a.runs[s] == b.runs.get(s)})


def label(diff: float, low: float, high: float, lower_is_better: bool = False, tie_is_right: bool = False) -> str:
    """The symmetric label of a difference ``A − B`` with its interval ``[low, high]``, for the claim "A better".

    Args:
        diff: The point estimate of ``A − B``.
        low: Lower end of its interval.
        high: Upper end of its interval.
        lower_is_better: The metric is a cost: "better" means a negative difference.
        tie_is_right: A zero difference has the claimed sign (claims "A not worse than B").
    """
    sign = -1.0 if lower_is_better else 1.0
    d, lo, hi = sign * diff, *sorted((sign * low, sign * high))
    if lo > 0:
        return BEYOND
    if hi < 0:
        return CONTRADICTED
    return WITHIN_RIGHT if d > 0 or (d == 0 and tie_is_right) else WITHIN_WRONG


@dataclass(frozen=True)
class Test:
    """One test of a claim: the difference ``A − B``, its 95% interval, the label, and why when not testable.

    Attributes:
        name: ``"paired t"``, ``"Welch t"`` or ``"query bootstrap"``.
        diff: Point estimate of ``A − B`` (NaN when not testable for lack of data).
        low: Lower end of the interval.
        high: Upper end of the interval.
        n: Seeds behind it (pairs for the paired tests; ``n_A + n_B`` for Welch).
        label: One of :data:`LABELS`.
        why: Why it is not testable ("" otherwise).
    """

    name: str
    diff: float
    low: float
    high: float
    n: int
    label: str
    why: str = ""

    def fmt(self) -> str:
        """``+1.00 [+0.78, +1.35] (k=3): holds beyond noise``; ``not testable (one seed)``."""
        if self.label == NOT_TESTABLE:
            return f"{NOT_TESTABLE} ({self.why})"
        what = "k" if self.name != "Welch t" else "n"
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}] ({what}={self.n}): {self.label}"


def _untestable(name: str, why: str, n: int = 0, diff: float = math.nan) -> Test:
    return Test(name, diff, math.nan, math.nan, n, NOT_TESTABLE, why)


def _interval(result: object) -> tuple[float, float]:
    ci = result.confidence_interval(confidence_level=CONFIDENCE)  # type: ignore[attr-defined]
    return float(ci.low), float(ci.high)


def paired_test(a: Cell, b: Cell, lower_is_better: bool = False, tie_is_right: bool = False) -> Test:
    """``scipy.stats.ttest_rel`` over the seeds both cells ran: the paired t interval of the per-seed differences."""
    from scipy import stats

    seeds = [s for s in a.values if s in b.values]
    if len(seeds) < 2:
        return _untestable("paired t", "one seed" if seeds else "no common seed", len(seeds))
    x, y = np.array([a.values[s] for s in seeds]), np.array([b.values[s] for s in seeds])
    if np.array_equal(x, y):
        return _untestable("paired t", "identical arms", len(seeds), 0.0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # constant differences: scipy warns, yet gives [d, d]
        low, high = _interval(stats.ttest_rel(x, y))
    diff = float(np.mean(x - y))
    return Test("paired t", diff, low, high, len(seeds), label(diff, low, high, lower_is_better, tie_is_right))


def welch_test(a: Cell, b: Cell, lower_is_better: bool = False, tie_is_right: bool = False) -> Test:
    """``scipy.stats.ttest_ind(equal_var=False)``: Welch's t interval of the difference of the seed means."""
    from scipy import stats

    if a.n < 2 or b.n < 2:
        return _untestable("Welch t", "one seed on a side" if a.n and b.n else "a side not run", a.n + b.n)
    x, y = np.array(sorted(a.values.values())), np.array(sorted(b.values.values()))
    if np.array_equal(x, y):
        return _untestable("Welch t", "identical arms", a.n + b.n, 0.0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = _interval(stats.ttest_ind(x, y, equal_var=False))
    diff = float(x.mean() - y.mean())
    return Test("Welch t", diff, low, high, a.n + b.n, label(diff, low, high, lower_is_better, tie_is_right))


def bootstrap_test(query: tuple[float, float, float, int], lower_is_better: bool = False,
                   tie_is_right: bool = False) -> Test:
    """The paired query bootstrap's ``(difference, 2.5%, 97.5%, seeds)`` as a :class:`Test`."""
    diff, low, high, k = query
    if diff == 0 and low == 0 and high == 0:  # every query scored the same for both arms
        return _untestable("query bootstrap", "identical rankings", k, 0.0)
    return Test("query bootstrap", diff, low, high, k, label(diff, low, high, lower_is_better, tie_is_right))


def primary(seed: Test, query: Test | None) -> str:
    """The primary verdict: the paired seed test, beyond noise only where the query bootstrap agrees."""
    if seed.label == NOT_TESTABLE or query is None or query.label == NOT_TESTABLE or seed.label == query.label:
        return seed.label
    if seed.label in (BEYOND, WITHIN_RIGHT):
        return WITHIN_RIGHT
    return WITHIN_WRONG


@dataclass(frozen=True)
class Comparison:
    """One claimed ordering ``a`` better than ``b`` on one metric, with its tests and verdict.

    Attributes:
        claim: What the paper claims, in words.
        metric: The metric compared.
        a: The side claimed better.
        b: The other side.
        lower_is_better: True for costs (time, memory): "better" means smaller.
        not_worse: The claim is "``a`` about as good as ``b``" (Table 9's quality): a tie counts as the right sign,
            and only *contradicted beyond noise* refutes it.
        query: ``(difference, 2.5%, 97.5%, seeds)`` of the paired bootstrap over queries
            (``mmembed.report.bootstrap``), when the runs' eval files allowed it.
        paired_design: The arms share their start per seed (every table of the report): the paired seed test is the
            primary verdict; False makes Welch's test the primary one.
    """

    claim: str
    metric: str
    a: Cell
    b: Cell
    lower_is_better: bool = False
    not_worse: bool = False
    query: tuple[float, float, float, int] | None = None
    paired_design: bool = True

    @property
    def diff(self) -> float:
        """``mean(a) - mean(b)``."""
        return self.a.mean - self.b.mean

    @property
    def paired(self) -> Test:
        """The paired-by-seed t test."""
        return paired_test(self.a, self.b, self.lower_is_better, self.not_worse)

    @property
    def welch(self) -> Test:
        """Welch's unpaired t test (secondary)."""
        return welch_test(self.a, self.b, self.lower_is_better, self.not_worse)

    @property
    def query_test(self) -> Test | None:
        """The paired query bootstrap, when computed."""
        return None if self.query is None else bootstrap_test(self.query, self.lower_is_better, self.not_worse)

    @property
    def verdict(self) -> str:
        """The primary verdict, one of :data:`LABELS`."""
        if not self.a.n or not self.b.n:
            return NOT_TESTABLE
        if not self.paired_design:
            return self.welch.label
        return primary(self.paired, self.query_test)

    def row(self) -> dict[str, str]:
        """The claim as a row of the report's claims table."""
        query = self.query_test
        diff = "—" if math.isnan(self.diff) else f"{self.diff:+.2f}"
        verdict = self.verdict
        if not self.a.n or not self.b.n:
            verdict += " (a side not run)"
        return {"claim": self.claim, "metric": self.metric, "A (claimed better)": self.a.fmt(), "B": self.b.fmt(),
                "A − B": diff, "verdict (primary)": f"**{verdict}**",
                "paired by seed, 95% t interval": self.paired.fmt(),
                "queries: paired bootstrap, 95% interval": "—" if query is None else query.fmt(),
                "Welch (secondary), 95% interval": self.welch.fmt()}


def ratio(a: Cell, b: Cell) -> float:
    """``mean(a) / mean(b)`` (NaN when either is missing or ``b`` is 0)."""
    if not a.n or not b.n or b.mean == 0:
        return math.nan
    return a.mean / b.mean
