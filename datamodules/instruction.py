"""Stage 1 data (paper §3.3, eq. 4): LLaVA-style conversations for next-token restoration training.

Input: a JSON list of records ``{"id", "image": "rel/path.png" | [paths] | absent, "conversations": [{"from":
"human" | "gpt" | "system", "value": "<image>\\n..."}, ...]}`` plus an image root. Each record is rendered with the
tokenizer's chat template (human -> user, gpt -> assistant), ``<image>`` becomes the processor's image token and
the stock InternVL processor expands it into ``<img><IMG_CONTEXT>...</img>`` with dynamic tiling (``max_tiles``).

Labels train only the assistant replies and their end-of-turn token; the system/user turns, the assistant header
(``<|im_start|>assistant\\n``), every image token and the padding are ``-100``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from mmembed.datamodules.common import EpochSeededLoader, add_counts, resolve_world
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmembed.backbone.inputs import InputBuilder, tiling_kwargs
from mmembed.data.images import open_image
from mmembed.data.skips import SkipCounter, SkipSample
from mmembed.types import text_problem

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


class ConversationEncoder:
    """One LLaVA record -> ``input_ids``, ``labels``, ``pixel_values``; raises ``SkipSample`` for a bad record.

    Skip reasons (the shard reader's vocabulary): ``missing_member`` for an image file that does not exist,
    ``corrupt_image`` / ``decompression_bomb`` / ``unsupported_mode`` for one that cannot be used, ``bad_json`` for
    a record that does not fit the format (no conversation, unknown role, no assistant reply, ``<image>`` count
    different from the number of images) or that does not fit ``max_length`` with its images and a reply.

    Args:
        processor: The image-only InternVL processor (``mmembed.backbone.load_processor``); its tokenizer must use a
            ChatML template (``<|im_start|>role\\n...<|im_end|>``), as InternVL3 does.
        image_root: Image paths in records are relative to this folder.
        max_tiles: Tile cap of InternVL's dynamic tiling (a thumbnail is added when tiles > 1).
        max_length: Longer sequences are cut; a record whose images or first reply do not fit is skipped.
    """

    def __init__(self, processor: Any, image_root: str | Path, max_tiles: int = 4, max_length: int = 2048) -> None:
        self.tiling = tiling_kwargs(max_tiles)  # validates max_tiles
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_root = Path(image_root)
        self.max_tiles = max_tiles
        self.max_length = max_length
        tok = self.tokenizer
        ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        if tok.chat_template is None or tok.unk_token_id in ids or None in ids:
            raise ValueError("InstructionDataModule needs a tokenizer with a ChatML chat template "
                             "(<|im_start|>/<|im_end|> tokens), as InternVL3's")
        self.im_start_id, self.im_end_id = ids
        image_tokens = [processor.image_token, getattr(tok, "start_image_token", "<img>"),
                        getattr(tok, "end_image_token", "</img>")]
        self.image_token_ids = set(tok.convert_tokens_to_ids(image_tokens))
        self.img_end_id = tok.convert_tokens_to_ids(image_tokens[2])
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.im_end_id

    # ------------------------------------------------------------------------------------------------ record
    def messages(self, record: Mapping[str, Any], n_images: int) -> list[dict[str, str]]:
        """Chat messages with ``<image>`` replaced by the processor's image token (raises ``SkipSample``)."""
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise SkipSample("bad_json", "no conversations list")
        messages = []
        for turn in conv:
            if not isinstance(turn, Mapping) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise SkipSample("bad_json", f"bad turn {str(turn)[:80]!r}")
            problem = text_problem(turn["value"])  # the same text rule as every other sample and Item
            if problem:
                raise SkipSample("bad_text", f"turn {problem}")
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise SkipSample("bad_json", "no assistant reply")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders == 0 and n_images:
            # LLaVA convention: an image without a placeholder goes before the first user message.
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise SkipSample("bad_json", "image given but no user turn to attach it to")
            first["content"] = IMAGE_PLACEHOLDER * n_images + "\n" + first["content"]
            placeholders = n_images
        if placeholders != n_images:
            raise SkipSample("bad_json", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s)")
        for m in messages:
            m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, self.processor.image_token)
        return messages

    def images(self, record: Mapping[str, Any]) -> list:
        """The record's images, loaded as RGB (raises ``SkipSample``)."""
        spec = record.get("image")
        paths = [] if spec is None else [spec] if isinstance(spec, str) else spec
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise SkipSample("bad_json", f"image must be a path or a list of paths, got {spec!r}")
        out = []
        for rel in paths:
            path = self.image_root / rel
            if not path.is_file():
                raise SkipSample("missing_member", f"image file not found: {path}")
            out.append(open_image(path))
        return out

    def labels(self, ids: Sequence[int]) -> list[int]:
        """``ids`` with everything but assistant replies (and their ``<|im_end|>``) set to -100."""
        labels = [IGNORE_INDEX] * len(ids)
        for s, tok in enumerate(ids):
            if tok != self.im_start_id:
                continue
            # The role header runs from <|im_start|> to the first newline; decode token by token to find it.
            k, header = s + 1, ""
            while k < len(ids) and "\n" not in header and ids[k] not in (self.im_end_id, self.im_start_id):
                header += self.tokenizer.decode([ids[k]])
                k += 1
            if header.split("\n", 1)[0].strip() != "assistant":
                continue
            end = k
            while end < len(ids) and ids[end] != self.im_end_id:
                end += 1
            for t in range(k, min(end + 1, len(ids))):
                if ids[t] not in self.image_token_ids:
                    labels[t] = ids[t]
        return labels

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise SkipSample("bad_json", f"record is a {type(record).__name__}, not an object")
        images = self.images(record)
        text = self.tokenizer.apply_chat_template(self.messages(record, len(images)), tokenize=False)
        out = self.processor(text=[text], images=images or None, return_tensors="pt", **self.tiling)
        ids = out["input_ids"][0].tolist()
        labels = self.labels(ids)
        if len(ids) > self.max_length:
            if self.img_end_id in ids[self.max_length:]:
                raise SkipSample("bad_json", f"{len(ids)} tokens: an image block does not fit max_length")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise SkipSample("bad_json", f"no assistant token within max_length={self.max_length}")
        pixel_values = out.get("pixel_values")
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values,
                "num_tiles": 0 if pixel_values is None else int(pixel_values.shape[0])}


class InstructionDataset(Dataset):
    """Map-style dataset of encoded conversations; a bad record is counted and replaced by the next good one.

    Replacing (rather than returning nothing) keeps every batch full and every rank's batch count equal. Each item
    carries ``skipped``: the skips this process counted since its previous item, so counts made in DataLoader
    workers reach the main process inside batches.

    Args:
        records: The LLaVA records.
        encoder: Turns a record into model inputs.
        max_retries: Consecutive bad records tolerated before raising.
        name: Skip-counter name shown in log lines.
    """

    def __init__(self, records: Sequence[Any], encoder: ConversationEncoder, max_retries: int = 16,
                 name: str = "instruct") -> None:
        self.records = records
        self.encoder = encoder
        self.max_retries = max_retries
        self.counter = SkipCounter(name)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(self.max_retries + 1):
            i = (index + k) % len(self.records)
            try:
                item = self.encoder(self.records[i])
            except SkipSample as skip:
                if self.counter.strict:
                    raise
                rid = self.records[i].get("id", i) if isinstance(self.records[i], Mapping) else i
                self.counter.add(skip.reason, where=f"record {rid}", detail=skip.detail)
                continue
            item["skipped"] = self.counter.take_new()
            return item
        raise RuntimeError(f"{self.max_retries + 1} consecutive bad records from index {index}; see the skip log")


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequence indices into rows of at most ``max_length`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return [sorted(r) for r in rows]


class InstructionCollate:
    """Pads (or packs) encoded conversations into a batch.

    Unpacked: ``input_ids``, ``attention_mask``, ``labels`` right-padded to the longest sequence.

    Packed: the batch's conversations are packed first-fit-decreasing into as few rows of at most ``max_length``
    tokens as possible. Each row gets ``position_ids`` restarting at 0 for every conversation (and for the padding
    tail) and **no** ``attention_mask``: transformers then derives a block-diagonal causal mask from the
    position_ids (``find_packed_sequence_indices``, sdpa/eager/flash alike), so no conversation attends to another
    and the logits equal those of the conversations run alone. The number of conversations per step stays
    ``batch_size``; packing removes padding, so raise ``batch_size`` to fill memory.

    Both: ``pixel_values`` in the order their image tokens appear in the flattened batch, ``num_tiles`` per
    conversation, ``skipped`` summed over items.
    """

    def __init__(self, pad_id: int, max_length: int, pack: bool = False) -> None:
        self.pad_id = pad_id
        self.max_length = max_length
        self.pack = pack

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skipped: dict[str, int] = {}
        for it in items:
            add_counts(skipped, it.get("skipped"))
        rows = pack_rows([len(it["input_ids"]) for it in items], self.max_length) if self.pack else [
            [i] for i in range(len(items))]
        width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        pixel_values, order = [], []
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                ids, n = items[i]["input_ids"], len(items[i]["input_ids"])
                input_ids[r, pos : pos + n] = torch.tensor(ids)
                labels[r, pos : pos + n] = torch.tensor(items[i]["labels"])
                position_ids[r, pos : pos + n] = torch.arange(n)
                attention_mask[r, pos : pos + n] = 1
                if items[i]["pixel_values"] is not None:
                    pixel_values.append(items[i]["pixel_values"])
                order.append(i)
                pos += n
            position_ids[r, pos:] = torch.arange(width - pos)  # the padding tail is its own "sequence"
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels,
                                 "num_tiles": torch.tensor([items[i]["num_tiles"] for i in order]),
                                 "skipped": skipped}
        if self.pack:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


def load_records(path: str | Path) -> list[Any]:
    """Read a LLaVA-style JSON list (or JSON-lines) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


class InstructionDataModule(L.LightningDataModule):
    """LLaVA-style conversations -> next-token batches for stage 1 (``RestorationModule``).

    Batches: ``input_ids``, ``labels`` (-100 except assistant replies and their ``<|im_end|>``), ``attention_mask``
    (unpacked) or ``position_ids`` (packed, see :class:`InstructionCollate`), ``pixel_values``, ``num_tiles``,
    ``skipped``. **Packing needs the module to pass ``position_ids`` to the model and no attention mask**: without
    them the stock forward would let packed conversations attend to each other.

    Ranks are handled here with an explicit ``DistributedSampler`` (the contrastive stage runs the Trainer with
    ``use_distributed_sampler=False``, so Lightning would not add one; with it on, Lightning keeps ours). Bad records
    are counted and replaced (:class:`InstructionDataset`); :meth:`on_before_batch_transfer` adds each batch's counts
    to :attr:`skip_counts` (:meth:`record_skips` outside Lightning).

    Args:
        data_path: LLaVA JSON (list) or JSON-lines file, or a list of them (mixed into one dataset; image paths are
            relative to ``image_root``, default the first file's folder).
        image_root: Folder the records' image paths are relative to; default: the JSON file's folder.
        batch_size: Conversations per batch (per rank).
        max_tiles: InternVL tile cap per image (paper stage 1: 4).
        max_length: Token cap per sequence (and per packed row).
        pack: Pack each batch's conversations into fewer rows.
        num_workers: DataLoader workers.
        seed: Shuffling seed (the sampler adds the epoch).
        val_path: Optional validation JSON (same image root rules).
        val_image_root: Image root for ``val_path``; default its folder.
        input_builder: The backbone's ``InputBuilder`` (``backbone.input_builder``); its processor (tokens per tile
            = the backbone's compression) renders the conversations. The launcher passes it in.
        rank: Override the rank (with ``world_size``); default from the Trainer / torch.distributed / env.
        world_size: Override the world size.
        pin_memory: Passed to the DataLoader.
    """

    def __init__(
        self,
        data_path: str | list[str],
        image_root: str | None = None,
        batch_size: int = 4,
        max_tiles: int = 4,
        max_length: int = 2048,
        pack: bool = False,
        num_workers: int = 2,
        seed: int = 0,
        val_path: str | None = None,
        val_image_root: str | None = None,
        input_builder: InputBuilder | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["input_builder"])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data_path, self.image_root = data_path, image_root
        self.val_path, self.val_image_root = val_path, val_image_root
        self.batch_size, self.max_tiles, self.max_length, self.pack = batch_size, max_tiles, max_length, pack
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.processor = input_builder.processor if input_builder is not None else None
        self._rank_override = (rank, world_size)
        self.rank, self.world_size = 0, 1
        self.train_dataset: InstructionDataset | None = None
        self.val_dataset: InstructionDataset | None = None
        self.skip_counts = SkipCounter("instruct")
        self.val_skip_counts = SkipCounter("instruct-val")

    def _dataset(self, path: str | Sequence[str], image_root: str | None, name: str) -> InstructionDataset:
        paths = [path] if isinstance(path, str | Path) else list(path)
        if not paths:
            raise ValueError("data_path is an empty list; give at least one LLaVA-style JSON file")
        root = image_root if image_root is not None else str(Path(paths[0]).parent)
        encoder = ConversationEncoder(self.processor, root, self.max_tiles, self.max_length)
        records = [r for p in paths for r in load_records(p)]  # several files: one mixed, shuffled dataset
        return InstructionDataset(records, encoder, name=name)

    def setup(self, stage: str | None = None) -> None:
        # The rank is re-resolved on every call (a setup() by hand before Trainer.fit must not freeze rank 0 of 1).
        self.rank, self.world_size = resolve_world(self.trainer, *self._rank_override)
        if self.train_dataset is not None:
            return
        if self.processor is None:
            raise ValueError("InstructionDataModule needs input_builder=backbone.input_builder (the processor that "
                             "matches the backbone's compression); the launcher (mmembed.launch.tasks.fit) passes it")
        self.train_dataset = self._dataset(self.data_path, self.image_root, "instruct")
        if len(self.train_dataset) < self.world_size * self.batch_size:
            raise ValueError(f"{self.data_path}: {len(self.train_dataset)} records cannot fill one batch of "
                             f"{self.batch_size} on each of {self.world_size} rank(s)")
        if self.val_path is not None:
            self.val_dataset = self._dataset(self.val_path, self.val_image_root, "instruct-val")

    def collate(self) -> InstructionCollate:
        assert self.train_dataset is not None, "call setup() first"
        return InstructionCollate(self.train_dataset.encoder.pad_id, self.max_length, self.pack)

    def _loader(self, dataset: InstructionDataset, train: bool) -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=train,
                                     seed=self.seed, drop_last=train)
        # Worker seeds from (seed, rank, epoch), not from the global RNG: an epoch-end resume stays exact.
        return EpochSeededLoader(dataset, sampler=sampler, seed=self.seed, rank=self.rank,
                                 batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate(),
                                 drop_last=train, pin_memory=self.pin_memory, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)

    def record_skips(self, batch: Mapping[str, Any], split: str = "train") -> None:
        """Add a batch's ``skipped`` counts to :attr:`skip_counts` (or :attr:`val_skip_counts`)."""
        (self.val_skip_counts if split == "val" else self.skip_counts).merge(batch.get("skipped") or {})

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook (main process, every batch): record the counts that travelled in the batch."""
        if isinstance(batch, Mapping) and "skipped" in batch:
            trainer = self.trainer
            self.record_skips(batch, "train" if trainer is None or trainer.training else "val")
        return batch
