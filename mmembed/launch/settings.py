"""The ``mining:`` and ``judge:`` config groups as dataclasses, and the MLflow settings of a composed config.

The config groups ``experiments/configs/mining/`` and ``experiments/configs/judge/`` point ``_target_`` at
:class:`MiningSettings` and :class:`JudgeSettings`; their keys are the argument names of the library functions they
feed (``mmembed.mining.mine.mine_hard_negatives``, ``mmembed.judge.curate.curate``), so nothing is renamed on the
way. Adding a setting is one field here plus one key in the YAML.

:func:`mlflow_settings` is the one place that derives where a run's MLflow records go from the config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def _arguments(settings: Any, fn: Callable[..., Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``settings`` that are keyword arguments of ``fn`` (inputs and locations excluded)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in asdict(settings).items() if k in params and k not in exclude}


@dataclass
class MiningSettings:
    """Global hard-negative mining (paper §3.3): ``task=mine``, ``task=hnm`` and the pipeline's ``mine`` stage.

    Attributes:
        checkpoint: Embedder folder to mine with (None: the backbone config's model; ``task=hnm`` builds the warm-up).
        shards: Input shards (default: the training shards).
        out_dir: Output folder (``shards/``, ``manifest.jsonl``, ``summary.json``).
        strategy: ``window`` (ranks ``window`` sampled) or ``rule`` (top-``k`` minus the ground truth).
        window: 0-based half-open rank window of the window strategy (paper: ranks 50-100).
        n: Hard negatives per query of the window strategy (interpolates ``hard_negatives``).
        k: Rule strategy: the top-K kept (None: ``n``).
        batch_size: Encoder batch size.
    """

    checkpoint: str | None = None
    shards: Any = None
    out_dir: str = "mined"
    strategy: str = "window"
    window: tuple[int, int] = (50, 100)
    n: int = 2
    k: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.window = tuple(self.window)  # type: ignore[assignment]  (YAML gives a list)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``mine_hard_negatives`` (besides the embedder, shards and out_dir)."""
        from mmembed.mining.mine import mine_hard_negatives

        return _arguments(self, mine_hard_negatives, exclude=("shards", "out_dir"))


@dataclass
class JudgeSettings:
    """Stage-3 retrieve-and-judge curation (paper §3.3, Tables 8, 13, 14): ``task=judge|judge_ft`` and the
    pipeline's ``judge`` stage.

    Attributes:
        checkpoint: Stage-2 embedder folder that retrieves (None: built or reused in the stage store).
        model: Judge model: a local image-text-to-text folder or a kit stage-1 folder (None: the kit's stage 1);
            ``"simulated"``: the simulated expert judge (synthetic world only; ``mmembed.judge.simulated``).
        recall: Simulated expert judge: P(yes) for a planted false negative.
        false_yes_rate: Simulated expert judge: mean P(yes) for a true negative.
        shards: Training shards to curate (default: the training shards).
        out_dir: Output folder.
        cache_dir: Retrieval + judgments cache; share it across sweep points to judge once.
        k: Candidates retrieved per query (ground truth included), each judged.
        max_negatives: Hard negatives kept per query (interpolates ``hard_negatives``).
        strategy: ``judge`` (judge-curated), ``rule`` (top-n retrieved, Table 8's baseline) or ``margin`` (the
            judge-free control: candidates scoring within ``margin`` of the ground truth dropped).
        margin: The margin control's delta, in retrieval-score units.
        skip_datasets: Binary-label datasets not judged.
        batch_size: Judge pairs per forward pass.
        embed_batch_size: Embedder batch size for retrieval.
        reuse_prefix: Share each query's KV-cache prefix across its candidates.
    """

    checkpoint: str | None = None
    model: str | None = None
    recall: float = 0.9
    false_yes_rate: float = 0.05
    shards: Any = None
    out_dir: str = "curated"
    cache_dir: str | None = None
    k: int = 20
    max_negatives: int = 12
    strategy: str = "judge"
    margin: float = 0.01
    skip_datasets: list[str] = field(default_factory=lambda: ["HatefulMemes"])
    batch_size: int = 8
    embed_batch_size: int = 32
    reuse_prefix: bool = True

    #: Fields that name inputs and locations rather than how curation works (left out of a stage's identity).
    LOCATIONS = ("checkpoint", "model", "shards", "out_dir", "cache_dir")

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``mmembed.judge.curate.curate`` (besides the embedder, judge, shards, out_dir)."""
        from mmembed.judge.curate import curate

        return _arguments(self, curate, exclude=("shards", "out_dir"))

    def identity(self) -> dict[str, Any]:
        """The settings that define curation's work (for the stage key): every field but inputs and locations."""
        return {k: v for k, v in asdict(self).items() if k not in self.LOCATIONS}


@dataclass(frozen=True)
class MlflowSettings:
    """Where a run's MLflow records go.

    Attributes:
        experiment_name: MLflow experiment.
        tracking_uri: Store URI as configured (None: the embedded sqlite store under ``output_dir``).
        output_dir: Folder of the default store and of local artifacts.
    """

    experiment_name: str = "mmembed"
    tracking_uri: str | None = None
    output_dir: str = "outputs"

    @property
    def uri(self) -> str:
        """The store URI with the default filled in."""
        from mmembed.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri(self.output_dir)

    def kwargs(self) -> dict[str, Any]:
        """``experiment_name``, ``tracking_uri``, ``output_dir`` as keyword arguments of the tracking functions."""
        return asdict(self)


def mlflow_settings(cfg: Mapping[str, Any]) -> MlflowSettings | None:
    """The MLflow settings of a composed config's ``logger`` (None for no logger or a non-MLflow one)."""
    logger = cfg.get("logger")
    if not logger or not str(logger.get("_target_", "")).endswith("make_mlflow_logger"):
        return None
    uri = logger.get("tracking_uri")
    return MlflowSettings(experiment_name=str(logger.get("experiment_name", "mmembed")),
                          tracking_uri=str(uri) if uri else None, output_dir=str(logger.get("output_dir", "outputs")))
