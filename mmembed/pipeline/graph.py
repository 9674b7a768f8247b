"""The paper's stage graph (§3.3-3.4): a registry of stage functions and a runner that builds what a target needs.

Stages and what they consume (``requires`` must exist; ``uses`` is taken when it ran, and its absence is noted)::

    stage1    generative restoration (next-token, full fine-tuning)          <- base preset / folder
    warmup    stage 2, in-batch negatives only                               <- stage1
    mine      global hard-negative mining with the warm-up embedder          <- warmup
    hnm       stage 2, hard-negative round                                   <- warmup (weights), mine (shards)
    judge     MLLM-as-a-judge curation of the retrieved top-K                <- hnm (retriever)
    stage3    contrastive training on judge-curated data                     <- hnm (weights), judge (shards)
    reranker  pointwise + listwise reranker       <- stage1 or an embedder (pipeline.reranker_init), uses judge
    eval      final evaluation: embedder alone (E) and with the reranker (E+R) <- uses everything above

Each stage is a function registered with :func:`register_stage`; it receives the run's :class:`Pipeline` and the
:class:`~mmembed.pipeline.store.StageResult` of each dependency, and returns its own result (normally through
``pipeline.store.run(...)``, which makes it keyed, atomic, resumable and locked) or ``None`` when it cannot run
(its note says why). A stage whose ``available`` check returns a reason is skipped with that reason printed, and
so is everything that *requires* it.

The paper's stages are an explicit table, ``mmembed.launch.stages.STAGES``, handed to :class:`Pipeline` (``stages=``);
importing nothing registers anything. :func:`register_stage` and :data:`REGISTRY` remain for graphs assembled by
decoration (the default table of a :class:`Pipeline` built without ``stages``). This module knows nothing about
Hydra.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmembed.pipeline.store import StageResult, StageStore

PAPER_STAGES = ("stage1", "warmup", "mine", "hnm", "judge", "stage3", "reranker", "eval")


@dataclass(frozen=True)
class StageDef:
    """A registered stage.

    Attributes:
        name: Stage name.
        fn: ``fn(pipeline, deps) -> StageResult | None``.
        requires: Stages that must have run (skipped if one was skipped).
        uses: Stages consumed when present.
        available: ``() -> None`` when the stage can run, else a one-line reason (e.g. a missing package).
    """

    name: str
    fn: Callable[[Pipeline, Mapping[str, StageResult]], StageResult | None]
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    available: Callable[[], str | None] | None = None


REGISTRY: dict[str, StageDef] = {}


def register_stage(name: str, requires: tuple[str, ...] = (), uses: tuple[str, ...] = (),
                   available: Callable[[], str | None] | None = None):
    """Decorator: register ``fn`` as the implementation of stage ``name`` (a later registration replaces it)."""

    def deco(fn):
        REGISTRY[name] = StageDef(name, fn, tuple(requires), tuple(uses), available)
        return fn

    return deco


@dataclass
class Pipeline:
    """One run of the graph.

    Attributes:
        store: Where stage folders live.
        settings: Whatever the stage functions need (e.g. the composed Hydra config); opaque here.
        stages: The stage table, by name (default: :data:`REGISTRY`).
        disabled: Stages not to run in this pipeline (skipped with a note, like unavailable ones).
        results: Completed stages of this run, by name (``None`` for skipped ones).
        notes: Why each skipped stage was skipped.
        log: Progress output.
    """

    store: StageStore
    settings: Any = None
    stages: Mapping[str, StageDef] | None = None
    disabled: tuple[str, ...] = ()
    results: dict[str, StageResult | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def skip(self, name: str, reason: str) -> None:
        self.results[name] = None
        self.notes[name] = reason
        self.log(f"[pipeline] {name}: skipped ({reason})")

    def build(self, name: str) -> StageResult | None:
        """The result of stage ``name``, building (or reusing) it and its prerequisites first."""
        if name in self.results:
            return self.results[name]
        table = REGISTRY if self.stages is None else self.stages
        if name not in table:
            raise KeyError(f"no stage {name!r} is registered (registered: {sorted(table)})")
        stage = table[name]
        if name in self.disabled:
            self.skip(name, "disabled in this pipeline")
            return None
        reason = stage.available() if stage.available else None
        if reason:
            self.skip(name, reason)
            return None
        deps: dict[str, StageResult] = {}
        for dep in stage.requires:
            result = self.build(dep)
            if result is None:
                self.skip(name, f"needs {dep}, which was skipped")
                return None
            deps[dep] = result
        for dep in stage.uses:
            if dep in table:
                result = self.build(dep)
                if result is not None:
                    deps[dep] = result
        result = stage.fn(self, deps)
        if result is None and name not in self.notes:
            self.notes[name] = "its function returned nothing"
        self.results[name] = result
        return result

    def run(self, targets: tuple[str, ...] | list[str] = PAPER_STAGES) -> dict[str, StageResult | None]:
        """Build every target in order; returns the results of this run (skipped stages map to None)."""
        for t in targets:
            self.build(t)
        return dict(self.results)
