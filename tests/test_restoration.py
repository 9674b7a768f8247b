"""Stage 1 (generative restoration): labels, packing, over-fitting, greedy exact match, export and the exp file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from mmembed.datamodules import InstructionDataModule

from mmembed.backbone import build_backbone, build_input_builder
from mmembed.data.synth.instruct import make_conversation, make_instruct
from mmembed.eval.generative import VQAExample, heldout_vqa, normalize_answer, vqa_exact_match

# One thread: on this shared 2-core machine two OpenMP threads per process are ~15x slower (spinning, oversubscribed).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def builder():
    return build_input_builder("tiny", vtc_factor=2)


@pytest.fixture(scope="module")
def processor(builder):
    return builder.processor


def _world_conversations(folder: Path, n: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> Path:
    """The synthetic world's stage-1 records (the layout ``world.write_instruct`` uses), small images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if kinds is None:
        made = make_instruct(rng, n, side=64)
    else:
        made = []
        for i in range(n):
            kind = kinds[i % len(kinds)]
            image, conv = make_conversation(rng, kind, side=64)
            made.append((kind, image, {"id": f"{kind}_{i}", "conversations": conv}))
    records = []
    for i, (_, image, rec) in enumerate(made):
        image.save(folder / f"images/{i}.png")
        records.append({"id": rec["id"], "image": f"images/{i}.png", "conversations": rec["conversations"]})
    (folder / "llava.json").write_text(json.dumps(records))
    return folder / "llava.json"


def test_world_conversations_label_only_assistant_replies(tmp_path, processor, builder):
    path = _world_conversations(tmp_path, 12)
    dm = InstructionDataModule(str(path), batch_size=4, num_workers=0, input_builder=builder, max_tiles=4)
    dm.setup("fit")
    tok = processor.tokenizer
    records = json.loads(path.read_text())
    for i in range(len(records)):
        item = dm.train_dataset[i]
        replies = [t["value"] for t in records[i]["conversations"] if t["from"] == "gpt"]
        trained = [t for t in item["labels"] if t != -100]
        assert tok.decode(trained) == "".join(r + tok.eos_token for r in replies)
        # every labelled position is the token itself (no shift done here: the model shifts)
        assert all(lab in (-100, t) for t, lab in zip(item["input_ids"], item["labels"]))


def test_packed_loss_equals_unpacked_loss(tmp_path, processor, builder):
    path = _world_conversations(tmp_path, 6)
    model = build_backbone("tiny", vtc_factor=2, finetune={"mode": "full"}).eval()
    common = {"batch_size": 6, "num_workers": 0, "input_builder": builder, "max_tiles": 2, "max_length": 4096}
    batches = {}
    for pack in (False, True):
        dm = InstructionDataModule(str(path), pack=pack, **common)
        dm.setup("fit")
        items = [dm.train_dataset[i] for i in range(6)]
        batches[pack] = dm.collate()(items)
    assert batches[True]["input_ids"].shape[0] < batches[False]["input_ids"].shape[0]  # rows were packed
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")
    with torch.no_grad():
        losses = {p: model(**{k: v for k, v in b.items() if k in keys}).loss for p, b in batches.items()}
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)


def test_restoration_module_overfits_a_few_conversations(tmp_path, processor, builder):
    from mmembed.modules import RestorationModule

    torch.manual_seed(0)
    path = _world_conversations(tmp_path, 4, kinds=("classification", "vqa"))
    dm = InstructionDataModule(str(path), batch_size=4, num_workers=0, input_builder=builder, max_tiles=1, pack=True)
    dm.setup("fit")
    batch = dm.collate()([dm.train_dataset[i] for i in range(4)])
    backbone = build_backbone("tiny", vtc_factor=2, finetune={"mode": "full"})
    module = RestorationModule(backbone, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    opt = module.configure_optimizers()
    first = None
    for _ in range(50):
        loss = module._loss(batch)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and float(loss) < 0.1 * first, (first, float(loss))


def test_greedy_exact_match_rises_after_fitting_the_answers(processor):
    torch.manual_seed(0)
    examples = heldout_vqa(4, seed=3, side=64)
    assert len({ex.question for ex in examples}) >= 2 and all(ex.answer for ex in examples)
    model = build_backbone("tiny", vtc_factor=2, finetune={"mode": "full"})
    before = vqa_exact_match(model.hf_model, processor, examples, max_new_tokens=6)
    # fit the examples' own (prompt, answer) pairs: greedy decoding must then reproduce the answers
    tok = processor.tokenizer
    batches = []
    for ex in examples:
        user = [{"role": "user", "content": f"{processor.image_token}\n{ex.question}"}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": ex.answer}], tokenize=False)
        enc = processor(text=[full], images=[ex.image], return_tensors="pt", crop_to_patches=False)
        n_prompt = processor(text=[prompt], images=[ex.image], return_tensors="pt", crop_to_patches=False)[
            "input_ids"].shape[1]
        labels = enc["input_ids"].clone()
        labels[0, :n_prompt] = -100  # train the answer (and its end-of-turn token) only
        batches.append({**{k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}, "labels": labels})
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(45):
        loss = sum(model(**b).loss for b in batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = vqa_exact_match(model.hf_model, processor, examples, max_new_tokens=6)
    assert before == 0.0 and after == 100.0, (before, after)


def test_exact_match_normalisation():
    assert normalize_answer(" Three.") == "three" == normalize_answer("three")
    assert normalize_answer("on the  left") == "on the left"
    assert normalize_answer("on the left!") != normalize_answer("on the right")
    with pytest.raises(ValueError, match="no examples"):
        vqa_exact_match(None, None, [])
    assert isinstance(heldout_vqa(1)[0], VQAExample)


def test_stage1_export_loads_with_build_backbone_and_embedder(tmp_path):
    from mmembed import Embedder, Item
    from mmembed.modules import RestorationModule

    backbone = build_backbone("tiny", vtc_factor=2, finetune={"mode": "full"})
    with torch.no_grad():
        backbone.hf_model.lm_head.weight.add_(0.5)  # a "trained" change that must survive the export
    module = RestorationModule(backbone)
    path = module.embedder().save_pretrained(tmp_path / "stage1")
    again = build_backbone(path)
    for name, value in backbone.hf_model.state_dict().items():
        torch.testing.assert_close(again.hf_model.state_dict()[name], value, msg=name)
    emb = Embedder.from_pretrained(path, device="cpu")
    torch.testing.assert_close(emb.encode([Item(text="a red circle")]),
                               module.embedder().encode([Item(text="a red circle")]))
