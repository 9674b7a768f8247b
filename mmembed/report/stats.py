"""Seed statistics for the reproduction report: mean ± sample std per cell, and claim verdicts against seed noise.

The test (stated in the generated report too): a claimed ordering "A > B" *holds beyond noise* when the difference
of the seed means exceeds two standard errors of that difference, Welch's ``sqrt(s_A²/n_A + s_B²/n_B)`` (sample
standard deviations, ``ddof=1``); it *holds, within noise* when the sign is right but the difference is smaller; it
*does not hold* when the sign is wrong (or the means are equal). With fewer than two seeds on a side the noise is
unknown and the verdict says so. Where the same seeds ran on both sides, a paired comparison over the per-seed
differences (mean ± 2 standard errors of the mean difference) is given beside it.

Hand-written rather than ``scipy.stats.ttest_ind``: the rule is a plain two-standard-error threshold, not a p-value,
and it must also report the unknown-noise case rather than return NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

BEYOND = "holds beyond noise"
WITHIN = "holds, within noise"
FAILS = "does not hold"
UNKNOWN = "holds, noise unknown (< 2 seeds)"
NOT_RUN = "not run"


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

    @property
    def var_of_mean(self) -> float:
        """``s² / n``, the squared standard error of the mean (NaN with fewer than two seeds)."""
        return self.std ** 2 / self.n if self.n >= 2 else math.nan

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


def _verdict(diff: float, se: float, sign_ok: bool) -> str:
    if not sign_ok:
        return FAILS
    if math.isnan(se):
        return UNKNOWN
    return BEYOND if abs(diff) > 2 * se else WITHIN


@dataclass(frozen=True)
class Comparison:
    """One claimed ordering ``a`` better than ``b`` on one metric, with its verdict.

    Attributes:
        claim: What the paper claims, in words.
        metric: The metric compared.
        a: The side claimed better.
        b: The other side.
        lower_is_better: True for costs (time, memory): "better" means smaller.
        not_worse: The claim is "``a`` about as good as ``b``" (Table 9's quality): it holds when ``a`` is not worse,
            holds within noise when ``a`` is worse by less than two standard errors, and does not hold otherwise.
        query: ``(difference, 2.5%, 97.5%, seeds)`` of the paired bootstrap over queries
            (``mmembed.report.bootstrap``), when the runs' eval files allowed it.
    """

    claim: str
    metric: str
    a: Cell
    b: Cell
    lower_is_better: bool = False
    not_worse: bool = False
    query: tuple[float, float, float, int] | None = None

    @property
    def diff(self) -> float:
        """``mean(a) - mean(b)``."""
        return self.a.mean - self.b.mean

    @property
    def se(self) -> float:
        """Welch's standard error of the difference of means (NaN when a side has < 2 seeds)."""
        return math.sqrt(self.a.var_of_mean + self.b.var_of_mean)

    def _sign_ok(self, diff: float) -> bool:
        return diff < 0 if self.lower_is_better else diff > 0

    @property
    def verdict(self) -> str:
        if not self.a.n or not self.b.n:
            return NOT_RUN
        return self._judge(self.diff, self.se)

    def _judge(self, diff: float, se: float) -> str:
        if self.not_worse:
            if not self._sign_ok(diff) and diff != 0:
                if math.isnan(se):
                    return "worse, noise unknown (< 2 seeds)"
                return WITHIN if abs(diff) <= 2 * se else FAILS
            return "holds (not worse)"
        return _verdict(diff, se, self._sign_ok(diff))

    @property
    def paired(self) -> tuple[int, float, float] | None:
        """``(k, mean difference, its standard error)`` over the ``k >= 2`` seeds both sides ran; else None."""
        seeds = [s for s in self.a.values if s in self.b.values]
        if len(seeds) < 2:
            return None
        d = Cell({s: self.a.values[s] - self.b.values[s] for s in seeds})
        return len(seeds), d.mean, d.std / math.sqrt(d.n)

    @property
    def paired_verdict(self) -> str | None:
        p = self.paired
        if p is None:
            return None
        _, mean, se = p
        return self._judge(mean, se)

    @property
    def query_verdict(self) -> str | None:
        """The bootstrap's verdict: beyond query noise when the 95% interval lies on the claimed side of 0."""
        if self.query is None:
            return None
        diff, lo, hi, _ = self.query
        if self.not_worse:
            return "holds (not worse)" if diff >= 0 else (WITHIN if hi >= 0 else FAILS)
        if not self._sign_ok(diff):
            return FAILS
        inside = hi < 0 if self.lower_is_better else lo > 0
        return BEYOND if inside else WITHIN

    def row(self) -> dict[str, str]:
        """The claim as a row of the report's claims table."""
        p = self.paired
        paired = "—" if p is None else f"{p[1]:+.2f} ± {2 * p[2]:.2f} (k={p[0]}): {self.paired_verdict}"
        two_se = "—" if math.isnan(self.se) else f"{2 * self.se:.2f}"
        diff = "—" if math.isnan(self.diff) else f"{self.diff:+.2f}"
        query = "—"
        if self.query is not None:
            d, lo, hi, k = self.query
            query = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] (k={k}): {self.query_verdict}"
        return {"claim": self.claim, "metric": self.metric, "A (claimed better)": self.a.fmt(),
                "B": self.b.fmt(), "A − B": diff, "2·SE (Welch)": two_se, "paired by seed (±2·SE)": paired,
                "verdict": f"**{self.verdict}**", "queries: paired bootstrap, 95% CI": query}


def ratio(a: Cell, b: Cell) -> float:
    """``mean(a) / mean(b)`` (NaN when either is missing or ``b`` is 0)."""
    if not a.n or not b.n or b.mean == 0:
        return math.nan
    return a.mean / b.mean
