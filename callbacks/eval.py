"""Lightning callbacks that run the MMEB / VisDoc / cross-modal runners during training and log the scores.

When: every ``every_n_train_steps`` optimizer steps (``on_train_batch_end``), every ``every_n_epochs`` epochs
(``on_train_epoch_end``), before training (``eval_at_start``, ``on_train_start``; not again when resuming) and after
it (``eval_at_end``, ``on_train_end``; skipped when the last step was just evaluated). The model is the
LightningModule's own backbone, seen through ``pl_module.embedder() -> mmembed.Embedder``
(``mmembed.modules.base.BackboneModule`` provides it); ``Embedder.encode`` runs in eval mode under ``no_grad`` and
restores training mode afterwards.

Where the numbers go, for a result with keys ``val/mmeb/<subset>``, ``val/mmeb/<meta_task>``, ``val/mmeb/ind|ood``,
``val/mmeb/overall`` (VisDoc: ``val/visdoc/<set>``, ``val/visdoc/<collection>``, ``val/visdoc/overall``), x100:

* every logger of the trainer, through ``logger.log_metrics(values, step=trainer.global_step)``. Not ``self.log``:
  Lightning forbids it in ``on_train_start`` / ``on_train_end`` and would only forward step-level values on
  ``log_every_n_steps`` boundaries;
* ``trainer.callback_metrics``, which is where ``ModelCheckpoint(monitor="val/mmeb/overall")`` and ``EarlyStopping``
  look. Lightning runs checkpoint callbacks after all others, so a checkpoint taken at the same step (or epoch end)
  sees the fresh value. If the trainer also has a validation loop, ModelCheckpoint saves at validation end, which
  comes *before* ``on_train_epoch_end``: pass ``save_on_train_epoch_end=True`` to it, or evaluate by steps;
* files: per evaluation ``<out_dir>/step{N:07d}-{when}/<benchmark>/`` (run + qrels files, metrics.json, bar chart),
  also uploaded as artifacts of the run when a logger is an ``MLFlowLogger``.

Two-stage retrieval (paper §5.2, Tables 3/4/7): with ``reranker=`` set, every evaluation runs the benchmark twice,
embedder alone (E: keys ``val/<benchmark>/...``, files in ``.../<benchmark>/E``) and with the embedder's top
``rerank_k`` re-ordered by the reranker (E+R: keys ``val/<benchmark>_er/...``, files in ``.../<benchmark>/E+R``),
embedding every item once. ``reranker="module"`` evaluates the reranker being trained (``pl_module.reranker()``,
``RerankerModule``) behind a fixed first stage given by ``embedder=`` (a folder or preset, loaded once; its
embeddings are computed once for the whole training run).

Distributed training (DDP): every rank embeds a share of each set (``shard=True``, the default;
``mmembed.eval.distributed.ShardedEncoder``: batch ``b`` on rank ``b % N``, rows all-gathered, the same batches as
one process, so the same numbers), every rank scores, and rank 0 alone writes the files, uploads and logs. Ranks call
the backbone directly, outside the DDP wrapper, so the only collectives are the encoder's gathers. Rank 0's numbers
are then broadcast, so every rank's ``callback_metrics`` holds the same values (ModelCheckpoint decides identically on
all ranks). ``shard=False``: rank 0 evaluates alone while the others wait in that broadcast. Sharded strategies
(FSDP, DeepSpeed ZeRO-3) need every rank in each forward and are not supported; they evaluate on rank 0 only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mmembed.eval.results import BenchmarkResult, CachedEncoder, SupportsRerank


class BenchmarkEvalCallback(L.Callback):
    """Shared scheduling, logging and artifact handling; subclasses say which runner to call.

    Args:
        every_n_train_steps: Evaluate every N optimizer steps (``None`` / 0: never by steps).
        every_n_epochs: Evaluate every N epochs (``None`` / 0: never by epochs).
        eval_at_start: Evaluate once before the first training step (the "before" score).
        eval_at_end: Evaluate once when training ends (the "after" score).
        out_dir: Root for evaluation files (default ``<trainer.default_root_dir>/eval``).
        batch_size: Encoding batch size.
        max_queries: Only the first N queries of every set (quick checks during training).
        run_depth: Candidates per query kept in the run files.
        reranker: Also report E+R (see :func:`mmembed.eval.results.rerank_topk`): a ``SupportsRerank`` object, a
            reranker folder / preset (loaded on first use), or ``"module"`` for ``pl_module.reranker()``.
            ``None`` = embedder only.
        rerank_k: Reranker shortlist size.
        rerank_mode: ``pointwise`` (paper) or ``listwise`` for a reranker loaded here or taken from the module.
        embedder: Fixed first stage (folder or preset) instead of the module's own ``embedder()``; needed when the
            module trains a reranker.
        er_prefix: Key prefix of the E+R numbers (default ``val/<benchmark>_er``).
        prefix: Metric key prefix (default ``val/<benchmark>``).
        log_artifacts: Upload the files to MLflow when a logger is an ``MLFlowLogger``.
        shard: Under DDP, share the embedding out over all ranks (default) instead of evaluating on rank 0 alone.
    """

    benchmark = "benchmark"

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        eval_at_start: bool = False,
        eval_at_end: bool = True,
        out_dir: str | Path | None = None,
        batch_size: int = 16,
        max_queries: int | None = None,
        run_depth: int | None = 100,
        reranker: SupportsRerank | str | None = None,
        rerank_k: int = 5,
        prefix: str | None = None,
        log_artifacts: bool = True,
        rerank_mode: str = "pointwise",
        embedder: str | Path | None = None,
        er_prefix: str | None = None,
        shard: bool = True,
    ) -> None:
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs or 0
        self.eval_at_start = eval_at_start
        self.eval_at_end = eval_at_end
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.batch_size = batch_size
        self.max_queries = max_queries
        self.run_depth = run_depth
        self.reranker = reranker
        self.rerank_k = rerank_k
        self.seconds = 0.0  # wall time spent evaluating (tasks.fit subtracts it: time/train_s)
        self.prefix = prefix or f"val/{self.benchmark}"
        self.er_prefix = er_prefix or f"val/{self.benchmark}_er"
        self.log_artifacts = log_artifacts
        self.rerank_mode = rerank_mode
        self.embedder_source = embedder
        self.shard = shard
        self._fixed_embedder: CachedEncoder | None = None
        self._loaded_reranker: SupportsRerank | None = None
        self.history: list[dict[str, Any]] = []  # {"when", "step", "epoch", "metrics"} per evaluation, all ranks
        self.results: list[BenchmarkResult] = []  # full results, rank 0 only
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------------ subclass
    def evaluate(self, embedder: Any, out_dir: Path | None, extra: dict[str, Any],
                 reranker: SupportsRerank | None = None) -> BenchmarkResult:
        """Run the benchmark on ``embedder`` (E, or E+R with ``reranker``), writing files under ``out_dir``."""
        return self.runner()(embedder, out_dir=out_dir, reranker=reranker, rerank_k=self.rerank_k,
                             **self.runner_kwargs(), batch_size=self.batch_size, run_depth=self.run_depth,
                             max_queries=self.max_queries, show_progress=False, extra=extra)

    def runner(self):
        """The runner function (``evaluate_mmeb`` / ``evaluate_visdoc``)."""
        raise NotImplementedError

    def runner_kwargs(self) -> dict[str, Any]:
        """The runner's data arguments."""
        raise NotImplementedError

    def first_stage(self, pl_module: L.LightningModule, sharded: bool = False) -> Any:
        """The embedder to evaluate: the fixed one (loaded once, embeddings cached) or the module's own; wrapped in
        a ``ShardedEncoder`` when every rank takes part."""
        from mmembed.eval.distributed import ShardedEncoder

        if self.embedder_source is None:
            return ShardedEncoder(pl_module.embedder()) if sharded else pl_module.embedder()
        if self._fixed_embedder is None:
            from mmembed.embedder import Embedder

            fixed = Embedder.from_pretrained(self.embedder_source, device=pl_module.device)
            # Every rank holds the same cache (same items, same gathered rows), so they agree on what to embed.
            self._fixed_embedder = CachedEncoder(ShardedEncoder(fixed) if sharded else fixed)
        return self._fixed_embedder

    def sharded(self, trainer: L.Trainer) -> bool:
        """Whether every rank takes part in this evaluation (DDP with ``shard=True`` and more than one process)."""
        from lightning.pytorch.strategies import DDPStrategy

        return self.shard and trainer.world_size > 1 and isinstance(trainer.strategy, DDPStrategy)

    def second_stage(self, pl_module: L.LightningModule) -> SupportsRerank | None:
        """The reranker of E+R, or ``None``."""
        if self.reranker is None or isinstance(self.reranker, SupportsRerank):
            return self.reranker
        if self.reranker == "module":
            return pl_module.reranker(mode=self.rerank_mode)
        if self._loaded_reranker is None:
            from mmembed.reranker import Reranker

            self._loaded_reranker = Reranker.from_pretrained(self.reranker, mode=self.rerank_mode,
                                                             device=pl_module.device)
        return self._loaded_reranker

    # ---------------------------------------------------------------------------------------------- lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reranker == "module" and not callable(getattr(pl_module, "reranker", None)):
            raise TypeError(f"{type(self).__name__}(reranker='module') needs {type(pl_module).__name__}.reranker(); "
                            "train a mmembed.modules.RerankerModule or pass a reranker folder")
        if self.embedder_source is None and not callable(getattr(pl_module, "embedder", None)):
            raise TypeError(f"{type(self).__name__} needs {type(pl_module).__name__}.embedder() -> mmembed.Embedder; "
                            "subclass mmembed.modules.base.BackboneModule or add the method")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint already has its "before" score (restored in ``history``).
        if self.eval_at_start and trainer.global_step == 0:
            self.run(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global step: evaluate once per step.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and trainer.global_step != self._last_step):
            self.run(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_at_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module, "end")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------------------------------------- core
    def output_root(self, trainer: L.Trainer) -> Path:
        return self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir) / "eval"

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict[str, float]:
        """Evaluate now (rank 0, or all ranks sharing the embedding under DDP), share the numbers with every rank,
        log them; returns the logged values."""
        t0 = time.perf_counter()
        step, epoch = trainer.global_step, trainer.current_epoch
        self._last_step = step
        values: dict[str, float] | None = None
        sharded = self.sharded(trainer)
        if sharded or trainer.is_global_zero:
            # Only rank 0 writes files; the other ranks compute the same result in memory.
            root = self.output_root(trainer) / f"step{step:07d}-{when}" / self.benchmark
            out = root if trainer.is_global_zero else None
            extra = {"when": when, "global_step": step, "epoch": epoch}
            if sharded:
                extra["devices"] = trainer.world_size
            reranker = self.second_stage(pl_module)
            # The trainer's precision context (e.g. bf16 autocast) makes eval cost what a training forward costs.
            with trainer.strategy.precision_plugin.forward_context():
                embedder = self.first_stage(pl_module, sharded)
                if reranker is None:
                    results = [(self.evaluate(embedder, out, extra), self.prefix, "")]
                else:
                    cached = embedder if isinstance(embedder, CachedEncoder) else CachedEncoder(embedder)
                    e = self.evaluate(cached, out and out / "E", extra)
                    er = self.evaluate(cached, out and out / "E+R", extra, reranker=reranker)
                    results = [(e, self.prefix, "/E"), (er, self.er_prefix, "/E+R")]
        if trainer.is_global_zero:
            values = {}
            for result, prefix, sub in results:
                values.update(result.flat(prefix))
                self.results.append(result)
                self._upload(trainer, result, f"eval/step{step:07d}-{when}/{self.benchmark}{sub}")
                rank_zero_info(f"[{self.benchmark}{sub}] step {step} ({when}): {result.overall_line()}")
        values = trainer.strategy.broadcast(values, src=0)  # the other ranks wait here for rank 0
        self.publish(trainer, values, step)
        self.history.append({"when": when, "step": step, "epoch": epoch, "metrics": values})
        self.seconds += time.perf_counter() - t0
        return values

    @staticmethod
    def publish(trainer: L.Trainer, values: Mapping[str, float], step: int) -> None:
        """Make ``values`` visible to monitoring callbacks and send them to every logger."""
        device = trainer.strategy.root_device
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value, device=device)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(values), step=step)

    def _upload(self, trainer: L.Trainer, result: BenchmarkResult, artifact_path: str) -> None:
        if not self.log_artifacts or result.out_dir is None:
            return
        from mmembed.tracking import log_artifacts

        log_artifacts(trainer.loggers, result.out_dir, artifact_path)


class MMEBEvalCallback(BenchmarkEvalCallback):
    """Evaluate on MMEB-format subsets during training (Precision@1 over each query's own candidates).

    Args:
        data: ``{subset: parquet}``, a folder of parquet files (+ ``subsets.json``), or a synthetic-world root.
        image_root: Folder the parquet image paths are relative to (default: ``<data>/images``).
        subsets: Only these subsets.
        version: MMEB parquet columns, ``"v2"`` or ``"v1"``.
        ind_ood: ``{subset: "ind" | "ood"}`` overrides.
        **kwargs: Scheduling and logging options of :class:`BenchmarkEvalCallback`.
    """

    benchmark = "mmeb"

    def __init__(self, data: Mapping[str, str | Path] | str | Path, image_root: str | Path | None = None,
                 subsets: list[str] | None = None, version: str = "v2", ind_ood: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data, self.image_root, self.subsets = data, image_root, subsets
        self.version, self.ind_ood = version, ind_ood

    def runner(self):
        from mmembed.eval.mmeb import evaluate_mmeb

        return evaluate_mmeb

    def runner_kwargs(self) -> dict[str, Any]:
        return dict(subsets=self.data, image_root=self.image_root, version=self.version, ind_ood=self.ind_ood,
                    names=self.subsets)


class VisDocEvalCallback(BenchmarkEvalCallback):
    """Evaluate on BEIR-layout VisDoc sets during training (NDCG@k over the whole corpus).

    Args:
        data: ``{set: folder}``, a folder of set folders (+ ``sets.json``), or a synthetic-world root.
        sets: Only these sets.
        k: NDCG / recall cut-off (paper: 5).
        ind_ood: ``{set: "ind" | "ood"}`` overrides.
        **kwargs: Scheduling and logging options of :class:`BenchmarkEvalCallback`.
    """

    benchmark = "visdoc"

    def __init__(self, data: Mapping[str, str | Path] | str | Path, sets: list[str] | None = None, k: int = 5,
                 ind_ood: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data, self.sets, self.k, self.ind_ood = data, sets, k, ind_ood

    def runner(self):
        from mmembed.eval.visdoc import evaluate_visdoc

        return evaluate_visdoc

    def runner_kwargs(self) -> dict[str, Any]:
        return dict(sets=self.data, k=self.k, ind_ood=self.ind_ood, names=self.sets)


class XModalEvalCallback(BenchmarkEvalCallback):
    """Evaluate on Table 5's cross-modal sets during training (Hit@1 both ways; SugarCrepe accuracy).

    Args:
        data: A folder with ``sets.json`` (see :mod:`mmembed.data.xmodal`) or a synthetic-world root.
        sets: Only these sets.
        **kwargs: Scheduling and logging options of :class:`BenchmarkEvalCallback` (no reranker: Table 5 is E only).
    """

    benchmark = "xmodal"

    def __init__(self, data: str | Path, sets: list[str] | None = None, **kwargs: Any) -> None:
        if kwargs.get("reranker") is not None:
            raise ValueError("XModalEvalCallback evaluates the embedder only (paper Table 5); drop reranker")
        super().__init__(**kwargs)
        self.data, self.sets = data, sets

    def evaluate(self, embedder: Any, out_dir: Path | None, extra: dict[str, Any],
                 reranker: SupportsRerank | None = None) -> BenchmarkResult:
        from mmembed.eval.xmodal import evaluate_xmodal

        return evaluate_xmodal(embedder, self.data, out_dir, batch_size=self.batch_size, names=self.sets,
                               max_queries=self.max_queries, show_progress=False, extra=extra)
