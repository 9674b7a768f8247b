"""Reranker (paper §3.4): list construction, loss wiring, the public Reranker, export, E+R evaluation."""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from mmembed.datamodules.reranker import RerankerCollate, sample_example
from PIL import Image

from mmembed.backbone.rerank_inputs import RerankInputBuilder
from mmembed.data.schema import Sample, Side
from mmembed.data.shards import DecodedSample
from mmembed.types import Item
from tests import test_eval_runners as runners_tests
from tests.conftest import make_image
from tests.test_eval_runners import OracleReranker, TableEncoder

mmeb_data = runners_tests.mmeb_data  # the runner tests' MMEB fixture (hand-designed embeddings)

INSTR = "Find me an everyday image that matches the given query."


@pytest.fixture(scope="module")
def tiny_backbone():
    from mmembed.backbone import build_backbone

    return build_backbone("tiny", finetune={"mode": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})


@pytest.fixture(scope="module")
def builder():
    from mmembed.backbone import build_input_builder

    return build_input_builder("tiny", 2)


# ------------------------------------------------------------------------------------------ list construction
def test_positive_position_is_uniform_and_lists_are_well_formed():
    rng = random.Random(0)
    negatives = [f"n{i}" for i in range(8)]
    positives = ["p0", "x1", "x2"]
    by_m: dict[int, Counter] = {}
    n = 6000
    for _ in range(n):
        ex = sample_example(rng, positives, negatives, 2, 5)
        assert ex.positive in positives and ex.negative in negatives
        cands = ex.candidates
        assert 3 <= len(cands) <= 6
        assert [c in positives for c in cands].count(True) == 1 and cands[ex.target] in positives
        assert len(set(cands)) == len(cands)  # negatives drawn without replacement
        by_m.setdefault(len(cands) - 1, Counter())[ex.target] += 1
    assert sorted(by_m) == [2, 3, 4, 5]  # M uniform in [2, 5]: every value occurs
    for m, counts in by_m.items():
        total = sum(counts.values())
        assert abs(total - n / 4) < 0.1 * n / 4
        expected = total / (m + 1)
        chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(m + 1))
        # Critical chi-square values at p = 0.001 for m degrees of freedom.
        assert chi2 < {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[m], (m, counts)
    # Too few negatives for a list: pointwise only.
    short = sample_example(random.Random(1), positives, ["n0"], 2, 5)
    assert short.candidates is None and short.negative == "n0"


def _decoded(i: int, negatives: list[Side], extra: list[Side] | None = None) -> DecodedSample:
    s = Sample(id=f"toy/{i}", dataset="toy", task="t2t", meta_task="retrieval",
               query=Side(text=f"query {i}", instruction="Retrieve relevant texts."),
               positive=Side(text=f"answer {i}", id=f"toy/p{i}"), negatives=negatives,
               extra_positives=extra or [])
    return DecodedSample(s, {})


def test_collate_never_uses_a_positive_as_negative(builder):
    # Sample 0 lists its own positive and its extra positive among its negatives (a curation slip); sample 1's
    # positive IS sample 0's extra positive (same id), so the in-batch fill must not offer it to sample 0 either.
    s0 = _decoded(0, [Side(text="answer 0", id="toy/p0"), Side(text="x", id="toy/p1"), Side(text="bad", id="toy/n0")],
                  extra=[Side(text="also answer 0", id="toy/p1")])
    s1 = _decoded(1, [Side(text=f"wrong {j}", id=f"toy/n1_{j}") for j in range(6)])
    s2 = _decoded(2, [])
    collate = RerankerCollate(RerankInputBuilder(builder), 2, 5, fill_in_batch=True)
    pools = collate.pools([s0, s1, s2])
    banned = {0: {"toy/p0", "toy/p1"}, 1: {"toy/p1"}, 2: {"toy/p2"}}
    for i, (positives, negatives) in enumerate(pools):
        assert {pid for pid, _ in positives} == banned[i]
        ids = [nid for nid, _ in negatives]
        assert not banned[i] & set(ids) and len(ids) == len(set(ids))
    assert [nid for nid, _ in pools[0][1]] == ["toy/n0", "toy/p2"]  # own negative, then in-batch fill
    assert len(pools[1][1]) == 6  # own (judge) negatives are all kept; the list draws M of them
    assert [nid for nid, _ in pools[2][1]] == ["toy/p0", "toy/p1"]  # the fallback: other samples' positives

    batch = collate({"dataset": "toy", "samples": [s0, s1, s2], "skipped": {}, "dropped": {}})
    assert batch["point"]["input_ids"].shape[0] == 6 and batch["point_labels"].tolist() == [1, 0] * 3
    assert batch["list"]["input_ids"].shape[0] == 3
    assert ((batch["list_size"] >= 3) & (batch["list_size"] <= 6)).all()
    assert (batch["list_target"] < batch["list_size"]).all()
    no_fill = RerankerCollate(RerankInputBuilder(builder), 2, 5, fill_in_batch=False)
    batch = no_fill({"dataset": "toy", "samples": [s0, s1, s2], "skipped": {}, "dropped": {}})
    assert batch["skipped"] == {"rerank_no_negative": 1, "rerank_short_list": 1}  # s2 none, s0 only one left
    assert batch["point"]["input_ids"].shape[0] == 4 and batch["list"]["input_ids"].shape[0] == 1


def test_bad_list_settings_fail_with_the_fix():
    from mmembed.datamodules.reranker import check_settings

    with pytest.raises(ValueError, match="min_negatives <= max_negatives <= 8"):
        check_settings(2, 9, True, True)
    with pytest.raises(ValueError, match="enable one or both"):
        check_settings(2, 5, False, False)


# --------------------------------------------------------------------------------------------------- prompts
def test_prompts_follow_the_paper_and_tile_each_image_by_kind(builder):
    ri = RerankInputBuilder(builder)
    q = Item(text="a red circle", instruction=INSTR)
    doc = Item(image=make_image(200, 300), text="page", kind="document", instruction="Represent the page.")
    text, images = ri.pointwise_prompt(q, doc)
    assert "respond with 'No'.\nQuery: " + INSTR + " a red circle\nCandidate: " in text
    assert "Represent the page." not in text  # candidate instructions only steer the embedder
    assert text.endswith("<|im_start|>assistant\n")
    text, _ = ri.listwise_prompt(q, [Item(text="a"), Item(text="b")])
    assert "Candidates: (1) a (2) b<|im_end|>" in text
    # A natural image (1 tile) and a document (2 tiles + thumbnail here) in one prompt keep their own tiling.
    nat = Item(image=make_image(96, 96), text="scene")
    enc = builder.encode_prompt(*ri.pointwise_prompt(Item(image=make_image(), instruction=INSTR), doc))
    assert enc["num_tiles"] == 1 + builder.num_tiles(doc) == 4
    # Same kinds: identical to one stock processor call on the whole prompt.
    text, images = ri.pointwise_prompt(Item(image=make_image(), text="q", instruction=INSTR), nat)
    one_call = builder.processor(text=[text], images=[im for im, _ in images], return_tensors="pt",
                                 **builder._image_kwargs("natural"))
    enc = builder.encode_prompt(text, images)
    assert enc["input_ids"] == one_call["input_ids"][0].tolist()
    torch.testing.assert_close(enc["pixel_values"], one_call["pixel_values"])
    assert len({ri.yes_id, ri.no_id}) == 2 and len(set(ri.index_ids)) == 9


# ---------------------------------------------------------------------------------------------- loss wiring
def test_module_loss_matches_hand_computation(tiny_backbone, builder):
    from mmembed.modules import RerankerModule

    module = RerankerModule(tiny_backbone, point_weight=0.5, list_weight=2.0)
    samples = [_decoded(i, [Side(text=f"wrong {i} {j}", id=f"n{i}{j}") for j in range(5)]) for i in range(3)]
    batch = RerankerCollate(module.rerank_inputs, 2, 5, seed=3)({"dataset": "toy", "samples": samples,
                                                                  "skipped": {}, "dropped": {}})
    out = module(batch)
    ri = module.rerank_inputs
    with torch.no_grad():
        # Reference: the stock generative forward's full logits, read at the last real token of each row.
        full = tiny_backbone(**batch["point"]).logits
        last = batch["point"]["attention_mask"].sum(1) - 1  # right padding
        ans = full[torch.arange(full.shape[0]), last]
        labels = batch["point_labels"]
        logp = F.log_softmax(ans[:, [ri.no_id, ri.yes_id]], -1)
        point = -logp[torch.arange(len(labels)), labels].sum() / 3  # eq. 5: both pairs summed, mean over queries
        full = tiny_backbone(**batch["list"]).logits
        ans = full[torch.arange(full.shape[0]), batch["list"]["attention_mask"].sum(1) - 1]
        terms = []
        for r, (k, size) in enumerate(zip(batch["list_target"].tolist(), batch["list_size"].tolist())):
            terms.append(-F.log_softmax(ans[r, ri.index_ids[:size]], -1)[k])  # eq. 6 over "1".."M+1"
        listwise = torch.stack(terms).mean()
    torch.testing.assert_close(out.point_loss.detach(), point, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.list_loss.detach(), listwise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), 0.5 * point + 2.0 * listwise, rtol=1e-5, atol=1e-5)
    assert 0.0 <= float(out.point_acc) <= 1.0 and 0.0 <= float(out.list_acc) <= 1.0
    out.loss.backward()  # gradients reach the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora" in n)
    module.zero_grad()


@pytest.mark.slow
def test_a_fixed_batch_is_memorised(builder):
    """Both objectives can be driven to ~0 on one batch (the wiring learns; ~15 s on a quiet 2-core machine)."""
    from mmembed.backbone import build_backbone
    from mmembed.modules import RerankerModule

    torch.manual_seed(0)
    module = RerankerModule(build_backbone("tiny", finetune={"mode": "full"}))
    samples = [_decoded(i, [Side(text=f"wrong {i} {j}", id=f"n{i}{j}") for j in range(3)]) for i in range(4)]
    batch = RerankerCollate(module.rerank_inputs, 2, 3)({"dataset": "toy", "samples": samples, "skipped": {},
                                                         "dropped": {}})
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(45):
        out = module(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    out = module(batch)
    assert float(out.point_loss) < 0.2 and float(out.list_loss) < 0.3
    assert float(out.point_acc) == 1.0 and float(out.list_acc) == 1.0


def _holdout_script():
    """experiments/holdout_shards.py as a module (a script, not a package member)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "holdout_shards.py"
    spec = importlib.util.spec_from_file_location("holdout_shards", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_shards_give_val_accuracies_on_their_own_queries(tmp_path, builder):
    """``experiments/holdout_shards.py`` splits shards by query; ``val_shards`` (data/reranker.yaml, default off) then
    gives pointwise and listwise batches of the held-out queries only, and ``val/point_acc`` / ``val/list_acc`` are
    logged at every ``val_check_interval``."""
    import lightning as L
    from mmembed.datamodules.reranker import RerankerDataModule

    from mmembed.backbone import build_backbone
    from mmembed.data.shards import iter_decoded, write_shards
    from mmembed.modules import RerankerModule

    def samples(n: int):
        for i in range(n):
            s = _decoded(i, [Side(text=f"wrong {i} {j}", id=f"toy/n{i}_{j}") for j in range(3)]).sample
            s.query.image = "query.png"
            yield s, {"query.png": make_image(color=("red", "green")[i % 2])}

    write_shards(samples(24), str(tmp_path / "all" / "toy-%03d.tar"), maxcount=12)  # 2 shards of 12
    _holdout_script().main([str(tmp_path / "all" / "*.tar"), str(tmp_path / "split"), "--every", "4"])
    train_ids = [d.sample.id for d in iter_decoded(str(tmp_path / "split" / "train" / "*.tar"))]
    held = [d.sample.id for d in iter_decoded(str(tmp_path / "split" / "val" / "*.tar"))]
    assert sorted(held) == sorted(f"toy/{i}" for i in (3, 7, 11, 15, 19, 23))  # every 4th query of each shard
    assert len(train_ids) == 18 and not set(train_ids) & set(held)
    assert all(d.images for d in iter_decoded(str(tmp_path / "split" / "val" / "*.tar")))  # files stay together
    torch.manual_seed(0)
    module = RerankerModule(build_backbone("tiny", finetune={"mode": "lora", "lora_r": 4, "lora_alpha": 8}))
    dm = RerankerDataModule(train_shards=str(tmp_path / "split" / "train" / "*.tar"),
                            val_shards=str(tmp_path / "split" / "val" / "*.tar"),
                            batch_size=4, num_workers=0, samples_per_epoch=16, input_builder=module.input_builder)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert sorted(i for b in val for i in b["ids"]) == sorted(held)  # every held-out query once, no training one
    assert all("point" in b and "list" in b for b in val)
    calls = []

    class Seen(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            calls.append(list(batch["ids"]))

    trainer = L.Trainer(max_steps=4, val_check_interval=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, accelerator="cpu", callbacks=[Seen()])
    trainer.fit(module, datamodule=dm)
    assert len(calls) == 2 * len(val)  # two validation passes (steps 2 and 4), each over all held-out batches
    for key in ("val/point_acc", "val/list_acc", "val/point_loss", "val/list_loss"):
        assert 0.0 <= float(trainer.callback_metrics[key]) <= (1.0 if key.endswith("acc") else 10.0)


# ---------------------------------------------------------------------------------------------- the Reranker
def test_reranker_scores_batches_and_implements_the_rerank_hook(tiny_backbone, builder):
    from mmembed import Reranker
    from mmembed.eval.results import SupportsRerank, rerank_topk

    rr = Reranker(tiny_backbone, builder, batch_size=2)
    assert isinstance(rr, SupportsRerank)
    q = Item(text="a red circle", instruction=INSTR)
    cands = [Item(image=make_image(color=c, seed=i)) for i, c in enumerate(["red", "green", "blue"])]
    cands.append(Item(text="a page", image=make_image(200, 300), kind="document"))
    p = rr.score(q, cands)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(rr.score(q, cands, batch_size=4), p, rtol=1e-4, atol=1e-5)  # padding-invariant
    torch.testing.assert_close(rr.score(q, cands[2:3])[0], p[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rr.rerank(q, cands), p)
    listwise = Reranker(tiny_backbone, builder, mode="listwise")
    dist = listwise.rerank(q, cands)
    assert dist.shape == (4,) and float(dist.sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="1..9 candidates"):
        listwise.score_listwise(q, cands * 3)
    with pytest.raises(TypeError, match="candidate 0: input 1 is a int"):
        rr.score(q, [3])
    # The E+R hook: the shortlist (top 3 by embedding) is re-ordered by P(Yes), the tail keeps its order.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    out = rerank_topk(scores, [q], lambda r, j: cands[j], rr, k=3)
    head_order = sorted(range(3), key=lambda j: -float(p[j]))
    assert out[0].argsort(descending=True).tolist() == [*head_order, 3]


def test_save_pretrained_merges_lora_and_stock_transformers_loads_every_weight(tmp_path, builder):
    from transformers import InternVLForConditionalGeneration

    from mmembed import Reranker
    from mmembed.backbone import build_backbone

    backbone = build_backbone("tiny", finetune={"mode": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    with torch.no_grad():
        for n, prm in backbone.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.5)  # a trained adapter: merging must change the weights
    rr = Reranker(backbone, builder)
    q = Item(text="a red circle", instruction=INSTR)
    cands = [Item(image=make_image(color="red")), Item(text="a blue square")]
    before = rr.score(q, cands)
    path = rr.save_pretrained(tmp_path / "rr")
    model, info = InternVLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    merged = copy.deepcopy(backbone.model).merge_and_unload().state_dict()
    loaded_sd = model.state_dict()
    assert set(loaded_sd) == set(merged) and "lm_head.weight" in loaded_sd
    for key, value in merged.items():
        torch.testing.assert_close(loaded_sd[key], value, rtol=0, atol=0, msg=key)
    assert not any("lora" in k for k in loaded_sd)
    loaded = Reranker.from_pretrained(path, device="cpu")
    torch.testing.assert_close(loaded.score(q, cands), before, rtol=1e-4, atol=1e-5)
    assert loaded.module.vtc_factor == 2


# -------------------------------------------------------------------------------------------- E+R evaluation
def test_two_stage_evaluation_embeds_once_and_writes_both_runs(mmeb_data, tmp_path):
    from mmembed.eval.mmeb import evaluate_mmeb
    from mmembed.eval.results import CachedEncoder, evaluate_two_stage

    root, table = mmeb_data
    enc = TableEncoder(table)
    # The oracle knows every row's ground truth: E+R can only fix rows whose answer is in the top 2.
    relevance = {"q3|": {"|cat": 1.0}, "q1|which color?": {"|blue": 1.0}, "|a photo two": {"p2|": 1.0}}
    e, er = evaluate_two_stage(evaluate_mmeb, enc, OracleReranker(relevance), tmp_path / "out", rerank_k=2,
                               subsets=root)
    assert (e.mode, er.mode) == ("E", "E+R")
    assert e.sets["GQA"].score == 50.0 and er.sets["GQA"].score == 100.0
    assert e.sets["MSCOCO_t2i"].score == pytest.approx(200 / 3) and er.sets["MSCOCO_t2i"].score == 100.0
    assert e.sets["ImageNet_1K"].score == 75.0 and er.sets["ImageNet_1K"].score == 75.0  # cat ranked 3rd: not fixed
    assert (tmp_path / "out" / "E" / "metrics.json").is_file() and (tmp_path / "out" / "E+R" / "metrics.json").is_file()
    assert (tmp_path / "out" / "E+R" / er.sets["GQA"].run_file).is_file()
    embedded = [k for _, keys in enc.calls for k in keys]
    assert len(embedded) == len(set(embedded))  # nothing embedded twice across the E and E+R runs
    cached = CachedEncoder(enc)
    a = cached.encode([Item(text="cat"), Item(text="dog"), Item(text="cat")], role="candidate")
    assert len(cached) == 2 and torch.equal(a[0], a[2])
    img = Image.new("RGB", (4, 4))
    assert CachedEncoder.key(Item(image=img), "query") != CachedEncoder.key(Item(image=img.copy()), "query")


def test_eval_cli_reports_e_and_e_plus_r(mmeb_data, tmp_path, capsys, tiny_backbone, builder):
    from mmembed import Reranker
    from mmembed.eval.cli import main
    from mmembed.eval.results import load_metrics

    root, _ = mmeb_data
    folder = Reranker(tiny_backbone, builder).save_pretrained(tmp_path / "rr")
    args = ["mmeb", "--model", "tiny", "--data", str(root), "--out", str(tmp_path / "cli"), "--device", "cpu",
            "--subsets", "GQA", "--reranker", str(folder), "--rerank-top", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "E+R" in printed and "delta" in printed
    e, er = load_metrics(tmp_path / "cli" / "E"), load_metrics(tmp_path / "cli" / "E+R")
    assert (e["mode"], er["mode"]) == ("E", "E+R") and er["extra"]["rerank_top"] == 2
    assert e["sets"]["GQA"]["num_queries"] == er["sets"]["GQA"]["num_queries"] == 2


# ------------------------------------------------------------------------------------------------ +exp=reranker
@pytest.mark.slow
def test_exp_reranker_trains_two_steps_evaluates_e_and_e_plus_r_and_exports(tmp_path):
    """Compose ``+exp=reranker`` (shrunk), train 2 steps with the E vs E+R callback on the reranker being trained."""
    from omegaconf import open_dict

    from mmembed.launch import tasks, validate
    from tests.test_configs import _compose

    cfg = _compose(tmp_path, ["+exp=reranker", "synth.size=ci", "logger=none", "trainer.max_steps=2",
                              "data.samples_per_epoch=8", "data.batch_size=4", "data.num_workers=0",
                              "~callbacks.visdoc", "~callbacks.lr_monitor", "callbacks.mmeb.subsets=[synth_cls_color]",
                              "callbacks.mmeb.max_queries=2", "callbacks.mmeb.eval_at_start=false"])
    assert cfg.module._target_ == "mmembed.modules.RerankerModule" and cfg.module.optimizer.lr == 4e-5
    assert cfg.trainer.max_epochs == 2 and cfg.callbacks.mmeb.reranker == "module"
    assert cfg.callbacks.mmeb.embedder == "tiny"  # eval_embedder defaults to the backbone preset
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    validate(cfg)
    tasks.ensure_synthetic_world(cfg)
    metrics = tasks.train(cfg)
    assert {"train/loss", "train/point_loss", "train/list_loss", "train/point_acc", "train/list_acc"} <= set(metrics)
    assert {"val/mmeb/overall", "val/mmeb_er/overall"} <= set(metrics)
    out = tmp_path / "out"
    assert (out / "eval" / "step0000002-epoch" / "mmeb" / "E+R" / "metrics.json").is_file()
    assert (out / "eval" / "step0000002-epoch" / "mmeb" / "E" / "runs" / "synth_cls_color.run").is_file()
    assert any((out / "checkpoints").glob("best-*.ckpt"))  # monitored on val/mmeb_er/overall
    from mmembed import Reranker

    rr = Reranker.from_pretrained(out / "reranker", device="cpu")
    assert rr.score(Item(text="a red circle", instruction=INSTR), [Item(text="red")]).shape == (1,)


def test_reranker_takes_the_embedders_inputs_and_ranks_like_a_cross_encoder(tiny_backbone, builder, tmp_path):
    from mmembed import Reranker

    rr = Reranker(tiny_backbone, builder, batch_size=2)
    red = make_image(color="red")
    red.save(tmp_path / "red.png")
    docs = ["a red circle", red, {"text": "a green shape", "image": make_image(color="green")}, tmp_path / "red.png"]
    items = [Item(text="a red circle"), Item(image=red), Item(text="a green shape", image=make_image(color="green")),
             Item(image=tmp_path / "red.png")]
    plain = rr.score("red circle", docs)
    torch.testing.assert_close(plain, rr.score(Item(text="red circle"), items))
    torch.testing.assert_close(plain[1], plain[3])  # the PIL image and its saved file are the same candidate
    ranked = rr.rank("red circle", docs, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == sorted(range(4), key=lambda i: (-float(plain[i]), i))
    assert [r["score"] for r in ranked] == sorted((float(s) for s in plain), reverse=True)
    assert all(r["text"] is docs[r["corpus_id"]] for r in ranked)
    top = rr.rank({"text": "red circle", "instruction": INSTR}, docs, top_k=2)
    assert len(top) == 2 and set(top[0]) == {"corpus_id", "score"} and top[0]["score"] >= top[1]["score"]
    with pytest.raises(TypeError, match="candidates must be a list"):
        rr.rank("q", "one string")
