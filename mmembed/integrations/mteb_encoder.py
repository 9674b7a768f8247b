"""The kit's embedder as an mteb v2 encoder (``AbsEncoder``), with the paper's per-task instructions.

    import mteb
    from mmembed.integrations.mteb_encoder import MMEmbedEncoder

    model = MMEmbedEncoder("out/embedder")            # an exported folder (or a preset, or an Embedder)
    tasks = mteb.get_tasks(tasks=["VidoreDocVQARetrieval"])
    mteb.evaluate(model, tasks, cache=None)

Instructions, per call (``task_metadata``, ``prompt_type``), first match wins:

1. ``instructions={task name: (query instruction, document instruction)}`` given to the constructor;
2. ViDoRe-style visual-document tasks (mteb type ``DocumentUnderstanding``, or a name starting ``Vidore``): the
   paper's T->VD pair (Table 11, the one ``mmembed-eval visdoc`` uses), and document images get the document tiling;
3. otherwise: queries take the task's own mteb prompt (``AbsEncoder.get_instruction``); documents take the paper's
   target instruction for what they contain ("Represent the given image." / "... text." / "... image with related
   text information.").

``encode`` returns float32 L2-normalised numpy rows (mteb scores them with cosine similarity). Requires the
``mteb`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from mmembed.data.evalsets import VISDOC_QUERY_INSTRUCTION, VISDOC_TARGET_INSTRUCTION
from mmembed.embedder import Embedder
from mmembed.types import Item

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader

#: The paper's target instructions (Table 11) by what a document holds.
DOCUMENT_INSTRUCTIONS = {
    "image": "Represent the given image.",
    "text": "Represent the given text.",
    "image+text": "Represent the given image with related text information.",
}


def is_visual_document_task(task_metadata: TaskMetadata) -> bool:
    """ViDoRe-style page retrieval: mteb's ``DocumentUnderstanding`` type or a ``Vidore*`` task name."""
    return task_metadata.type == "DocumentUnderstanding" or task_metadata.name.lower().startswith("vidore")


class MMEmbedEncoder(AbsEncoder):
    """An mteb ``EncoderProtocol`` over :class:`mmembed.Embedder` (see the module docstring for instructions).

    Args:
        model: An ``Embedder``, or a preset name / local folder for ``Embedder.from_pretrained``.
        instructions: ``{mteb task name: (query instruction | None, document instruction | None)}`` overrides.
        batch_size: Default encoding batch size (mteb's ``encode_kwargs["batch_size"]`` wins).
        name: The name mteb records in its results (default: the folder or preset name).
        **from_pretrained: Passed to ``Embedder.from_pretrained`` (``vtc_factor``, ``device``, ...).
    """

    def __init__(self, model: Embedder | str | Path,
                 instructions: dict[str, tuple[str | None, str | None]] | None = None, batch_size: int = 16,
                 name: str | None = None, **from_pretrained: Any) -> None:
        self.model = model if isinstance(model, Embedder) else Embedder.from_pretrained(model, **from_pretrained)
        self.instructions = dict(instructions or {})
        self.batch_size = batch_size
        label = name or (Path(model).name if not isinstance(model, Embedder) else "embedder")
        n_params = sum(p.numel() for p in self.model.module.parameters())
        self.mteb_model_meta = ModelMeta(
            loader=None, name=f"mmembed/{label}", revision=None, release_date=None, languages=None,
            n_parameters=n_params, memory_usage_mb=None, max_tokens=None, embed_dim=self.model.embed_dim,
            license=None, open_weights=True, public_training_code=None, public_training_data=None,
            framework=["PyTorch"], similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
            training_datasets=None, modalities=["text", "image"],
        )

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None, holds: str) -> str | None:
        """The instruction for one side of a task (rules in the module docstring); ``holds``: text / image / both."""
        is_document = prompt_type == PromptType.document
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name][1 if is_document else 0]
        if is_visual_document_task(task_metadata):
            return VISDOC_TARGET_INSTRUCTION if is_document else VISDOC_QUERY_INSTRUCTION
        if is_document:
            return DOCUMENT_INSTRUCTIONS[holds]
        return self.get_instruction(task_metadata, prompt_type) or None

    def encode(self, inputs: DataLoader, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """Embed mteb's batches (``text`` and / or ``image`` columns) with the query or candidate template.

        Batch by batch, so a large image corpus is never decoded all at once; within a batch the kit's length
        sorting applies.
        """
        is_document = prompt_type == PromptType.document
        kind = "document" if is_document and is_visual_document_task(task_metadata) else "natural"
        instructions: dict[str, str | None] = {}  # by what an item holds: one lookup per task side and content
        chunks = []
        for batch in inputs:
            n = len(batch["text"] if "text" in batch else batch["image"])
            texts = batch["text"] if "text" in batch else [None] * n
            images = batch["image"] if "image" in batch else [None] * n
            items = []
            for text, image in zip(texts, images):
                holds = "image+text" if text and image is not None else "image" if image is not None else "text"
                if holds not in instructions:
                    instructions[holds] = self.instruction_for(task_metadata, prompt_type, holds)
                items.append(Item(text=text or None, image=image, instruction=instructions[holds], kind=kind))
            chunks.append(self.model.encode(items, role="candidate" if is_document else "query",
                                            batch_size=kwargs.get("batch_size", self.batch_size),
                                            show_progress_bar=False, convert_to_numpy=True))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.embed_dim), dtype=np.float32)


def beir_retrieval_task(folder: str | Path, name: str | None = None, *, visual_documents: bool = True) -> Any:
    """A local BEIR-layout page-retrieval set (``queries``, ``corpus`` with page images, ``qrels``) as an mteb task.

    The set is read with the kit's own reader (``mmembed.data.evalsets.read_beir_visdoc``: same ids, same queries
    kept, same page images), so mteb's retrieval evaluation and ``mmembed-eval visdoc`` see the same data. The task
    is typed like mteb's ViDoRe tasks (``DocumentUnderstanding``, main score ``ndcg_at_5``) unless
    ``visual_documents=False``.

    Args:
        folder: A BEIR set folder (e.g. ``<synthetic world>/eval/visdoc/synth_vidore``).
        name: Task name (default ``Local<folder name>``).
        visual_documents: Type the task as visual-document retrieval (the paper's T->VD instructions apply).

    Returns:
        An ``mteb.abstasks.retrieval.AbsTaskRetrieval`` instance, ready for ``mteb.evaluate``.
    """
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    from mmembed.data.evalsets import read_beir_visdoc

    folder = Path(folder)
    metadata = TaskMetadata(
        name=name or f"Local{folder.name}", description=f"Local BEIR page retrieval set {folder}",
        dataset={"path": str(folder), "revision": "local"},
        type="DocumentUnderstanding" if visual_documents else "Any2AnyRetrieval", category="t2i",
        eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_5", modalities=["text", "image"],
    )

    class LocalBeirRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            data = read_beir_visdoc(folder)
            queries = Dataset.from_dict({"id": data.query_ids, "text": [q.text for q in data.queries]})
            corpus = Dataset.from_dict({"id": data.corpus_ids, "image": [str(c.image) for c in data.corpus]})
            self.queries = {"test": queries}
            self.corpus = {"test": corpus.cast_column("image", ImageFeature())}
            self.relevant_docs = {"test": data.qrels}
            self.data_loaded = True

    LocalBeirRetrieval.metadata = metadata
    return LocalBeirRetrieval()


def main(argv: list[str] | None = None) -> int:
    """``python -m mmembed.integrations.mteb_encoder``: run mteb's evaluation of a model on mteb tasks or local sets.

    Examples::

        python -m mmembed.integrations.mteb_encoder --model out/embedder --beir data/synth/eval/visdoc/synth_vidore
        python -m mmembed.integrations.mteb_encoder --model out/embedder --benchmark "ViDoRe(v1)" --out results/
    """
    import argparse

    import mteb

    from mmembed.errors import run_cli
    from mmembed.logs import quiet_logs

    parser = argparse.ArgumentParser(prog="python -m mmembed.integrations.mteb_encoder", description=main.__doc__)
    parser.add_argument("--model", required=True, help="exported folder or preset name")
    parser.add_argument("--tasks", nargs="*", default=[], help="mteb task names (their data comes from the hub)")
    parser.add_argument("--benchmark", default=None, help="an mteb benchmark, e.g. ViDoRe(v1)")
    parser.add_argument("--beir", nargs="*", default=[], help="local BEIR page-retrieval folders (no hub needed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="mteb results cache folder (default: no cache)")
    parser.add_argument("--debug", action="store_true", help="full traceback on errors")
    args = parser.parse_args(argv)

    def work() -> int:
        quiet_logs(lightning=False)
        tasks = [beir_retrieval_task(folder) for folder in args.beir]
        if args.tasks:
            tasks += list(mteb.get_tasks(tasks=args.tasks))
        if args.benchmark:
            tasks += list(mteb.get_benchmark(args.benchmark).tasks)
        if not tasks:
            raise ValueError("no tasks: give --beir folders, --tasks names or --benchmark")
        model = MMEmbedEncoder(args.model, batch_size=args.batch_size, device=args.device)
        cache = mteb.ResultCache(args.out) if args.out else None
        result = mteb.evaluate(model, tasks, cache=cache, show_progress_bar=False,
                               encode_kwargs={"batch_size": args.batch_size})
        for task_result in result.task_results:
            for split, rows in task_result.scores.items():
                for row in rows:
                    print(f"{task_result.task_name}\t{split}\t{row['hf_subset']}\tmain_score={row['main_score']:.5f}"
                          f"\tndcg_at_5={row.get('ndcg_at_5', float('nan')):.5f}")
        return 0

    return run_cli(work, prog="python -m mmembed.integrations.mteb_encoder", debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
