"""MMEB / VisDoc runners: metric arithmetic against hand-computed values, E+R reranking, files, CLI.

The arithmetic tests feed the runners a scoring double (``TableEncoder``): an ``encode``-compatible object that
returns hand-designed embeddings, so every rank, hence every metric, is known in advance. The real-model tests run
the tiny seeded ``Embedder`` and check the files (run files re-scored by the TREC reader give the same numbers).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mmembed.eval import suites, trec
from mmembed.eval.mmeb import evaluate_mmeb
from mmembed.eval.results import SupportsRerank, load_metrics
from mmembed.eval.visdoc import evaluate_visdoc
from mmembed.types import Item
from tests.conftest import make_image

# --------------------------------------------------------------------------------------------------- doubles


def key_of(item: Item) -> str:
    """Identity of an item for the doubles: image file stem and/or text."""
    image = Path(str(item.image)).stem if item.image is not None else ""
    return f"{image}|{item.text or ''}"


class TableEncoder:
    """``encode`` that looks each item up in a table of hand-designed vectors (L2-normalised like Embedder's)."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[tuple[str, list[str]]] = []

    def encode(self, items, role="query", batch_size=16, show_progress=None):
        keys = [key_of(it) for it in items]
        self.calls.append((role, keys))
        return F.normalize(torch.tensor([self.table[k] for k in keys], dtype=torch.float32), dim=-1)


class OracleReranker:
    """Scores a shortlisted candidate by its known relevance to the query (the perfect second stage)."""

    def __init__(self, relevance: dict[str, dict[str, float]]) -> None:
        self.relevance = relevance
        self.calls = 0

    def rerank(self, query, candidates):
        self.calls += 1
        return [self.relevance.get(key_of(query), {}).get(key_of(c), 0.0) for c in candidates]


# ---------------------------------------------------------------------------------------------- MMEB data
LABELS = ["cat", "dog", "car", "bus"]


def onehot(i: int, n: int = 4) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


def save_png(path: Path, color: str, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(32, 32, color, seed).save(path)
    return path.name


def write_mmeb_subset(folder: Path, name: str, rows: list[dict]) -> Path:
    """Rows: {"qry_text", "qry_img", "tgt_text": [...], "tgt_img": [...]} (images as file names under images/)."""
    cols = {
        "qry_inst": ["<|image_1|>\nRepresent the image." if r.get("qry_img") else "Find the image." for r in rows],
        "qry_text": [r.get("qry_text", "") for r in rows],
        "qry_img_path": [r.get("qry_img", "") for r in rows],
        "tgt_inst": ["Represent the given text." for _ in rows],
        "tgt_text": [r["tgt_text"] for r in rows],
        "tgt_img_path": [r.get("tgt_img", [""] * len(r["tgt_text"])) for r in rows],
    }
    schema = pa.schema([(k, pa.string()) for k in ("qry_inst", "qry_text", "qry_img_path", "tgt_inst")]
                       + [("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    pq.write_table(pa.table(cols, schema=schema), path)
    return path


@pytest.fixture
def mmeb_data(tmp_path):
    """Three subsets named like public ones (so the public lists group them) and the table of their embeddings.

    ImageNet_1K (classification, IND): 4 rows, query images q0..q3, the same 4 labels as candidates.
        Designed ranks of the ground truth: 1, 1, 1, 3 (row 3 ranks dog > car > cat)  -> P@1 = 3/4.
    GQA (vqa, OOD): 2 rows, image + question, answers as candidates. Ranks 1, 2      -> P@1 = 1/2.
    MSCOCO_t2i (retrieval, IND): 3 rows, text query, image candidates; row 2 lists its ground truth twice.
        Ranks 1, 1, 2                                                                -> P@1 = 2/3.
    """
    root = tmp_path / "mmeb"
    img = root / "images"
    for i in range(4):
        save_png(img / f"q{i}.png", "red", i)
    for i in range(3):
        save_png(img / f"p{i}.png", "blue", i)
    table = {
        # ImageNet_1K: labels are one-hot; a query's vector puts its weight on the labels in the designed order.
        **{f"|{lab}": onehot(i) for i, lab in enumerate(LABELS)},
        "q0|": [0.9, 0.3, 0.2, 0.1],  # cat first
        "q1|": [0.1, 0.8, 0.3, 0.2],  # dog first
        "q2|": [0.1, 0.2, 0.9, 0.3],  # car first
        "q3|": [0.3, 0.9, 0.5, 0.1],  # dog > car > cat > bus
        # GQA: answers "red", "blue" in dims 0, 1
        "|red": onehot(0),
        "|blue": onehot(1),
        "q0|what color?": [0.9, 0.1, 0.0, 0.0],  # red first: GT red -> hit
        "q1|which color?": [0.9, 0.2, 0.0, 0.0],  # red first: GT blue -> miss (rank 2)
        # MSCOCO_t2i: images p0..p2 one-hot
        "p0|": onehot(0),
        "p1|": onehot(1),
        "p2|": onehot(2),
        "|a photo zero": [0.9, 0.1, 0.1, 0.0],
        "|a photo one": [0.1, 0.9, 0.1, 0.0],
        "|a photo two": [0.1, 0.9, 0.5, 0.0],  # GT p2 ranks 2nd behind p1
    }
    write_mmeb_subset(root, "ImageNet_1K", [
        {"qry_img": "q0.png", "tgt_text": ["cat", "dog", "car", "bus"]},
        {"qry_img": "q1.png", "tgt_text": ["dog", "cat", "car", "bus"]},
        {"qry_img": "q2.png", "tgt_text": ["car", "bus", "dog", "cat"]},
        {"qry_img": "q3.png", "tgt_text": ["cat", "bus", "dog", "car"]},
    ])
    write_mmeb_subset(root, "GQA", [
        {"qry_img": "q0.png", "qry_text": "what color?", "tgt_text": ["red", "blue"]},
        {"qry_img": "q1.png", "qry_text": "which color?", "tgt_text": ["blue", "red"]},
    ])
    write_mmeb_subset(root, "MSCOCO_t2i", [
        {"qry_text": "a photo zero", "tgt_text": ["", "", ""], "tgt_img": ["p0.png", "p1.png", "p2.png"]},
        {"qry_text": "a photo one", "tgt_text": ["", "", ""], "tgt_img": ["p1.png", "p0.png", "p2.png"]},
        {"qry_text": "a photo two", "tgt_text": ["", "", "", ""], "tgt_img": ["p2.png", "p0.png", "p2.png", "p1.png"]},
    ])
    return root, table


def test_mmeb_metrics_match_hand_computed(mmeb_data, tmp_path):
    root, table = mmeb_data
    enc = TableEncoder(table)
    res = evaluate_mmeb(enc, root, out_dir=tmp_path / "out", batch_size=2)
    assert res.mode == "E" and res.metric == "precision@1"
    scores = {n: s.score for n, s in res.sets.items()}
    assert scores == pytest.approx({"GQA": 50.0, "ImageNet_1K": 75.0, "MSCOCO_t2i": 200 / 3})
    # Grouping from the public lists (no subsets.json here): the training repo's spelling ImageNet_1K is found.
    assert res.sets["ImageNet_1K"].group == "classification" and res.sets["ImageNet_1K"].split == "ind"
    assert res.sets["GQA"].group == "vqa" and res.sets["GQA"].split == "ood"
    assert res.meta_tasks == pytest.approx({"vqa": 50.0, "classification": 75.0, "retrieval": 200 / 3})
    assert res.ind == pytest.approx((75.0 + 200 / 3) / 2)
    assert res.ood == pytest.approx(50.0)
    assert res.overall == pytest.approx((75.0 + 50.0 + 200 / 3) / 3)  # mean over subsets, not over meta-tasks
    # Each unique input embedded once per subset: ImageNet_1K has 4 query images and 4 labels.
    # Each unique input embedded once per subset (folder order: GQA, ImageNet_1K, MSCOCO_t2i): ImageNet_1K lists
    # 16 label candidates over its rows, 4 distinct.
    assert [role for role, _ in enc.calls] == ["query", "candidate"] * 3
    assert sorted(enc.calls[2][1]) == ["q0|", "q1|", "q2|", "q3|"]
    assert sorted(enc.calls[3][1]) == sorted(f"|{x}" for x in LABELS)
    assert res.sets["MSCOCO_t2i"].num_candidates == 3 and res.sets["ImageNet_1K"].num_queries == 4
    # recall@5 is 100 everywhere (every candidate list is shorter than 5).
    assert all(s.metrics["recall@5"] == pytest.approx(100.0) for s in res.sets.values())
    flat = res.flat()
    assert flat["val/mmeb/ImageNet_1K"] == pytest.approx(75.0) and flat["val/mmeb/vqa"] == pytest.approx(50.0)
    assert flat["val/mmeb/overall"] == pytest.approx(res.overall) and flat["val/mmeb/ood"] == pytest.approx(50.0)
    # standard errors: binomial per subset (p, n), combined as independent over the subset count
    ses = {n: 100 * math.sqrt(p * (1 - p) / q) for n, p, q in (("GQA", 0.5, 2), ("ImageNet_1K", 0.75, 4),
                                                                    ("MSCOCO_t2i", 2 / 3, 3))}
    assert {n: s.stderr for n, s in res.sets.items()} == pytest.approx(ses)
    assert res.overall_stderr == pytest.approx(math.sqrt(sum(v * v for v in ses.values())) / 3)
    assert "±" in res.overall_line() and load_metrics(res.metrics_file)["overall_stderr"] == pytest.approx(
        res.overall_stderr)


def test_mmeb_grouping_from_subsets_json_and_overrides(mmeb_data, tmp_path):
    root, table = mmeb_data
    (root / "subsets.json").write_text(json.dumps({
        "ImageNet_1K": {"meta_task": "classification", "split": "IND"},
        "MSCOCO_t2i": {"meta_task": "retrieval", "split": "OOD"},
    }))
    res = evaluate_mmeb(TableEncoder(table), root, ind_ood={"ImageNet_1K": "ood"})
    assert list(res.sets) == ["ImageNet_1K", "MSCOCO_t2i"]  # subsets.json decides what a folder holds
    assert res.sets["MSCOCO_t2i"].split == "ood" and res.sets["ImageNet_1K"].split == "ood"
    assert res.splits == pytest.approx({"ood": (75.0 + 200 / 3) / 2}) and res.ind is None
    assert res.out_dir is None and res.metrics_file is None  # no out_dir: nothing written


def test_mmeb_max_queries_keeps_first_rows(mmeb_data):
    root, table = mmeb_data
    enc = TableEncoder(table)
    res = evaluate_mmeb(enc, {"ImageNet_1K": root / "ImageNet_1K.parquet"}, max_queries=2)
    assert res.sets["ImageNet_1K"].score == pytest.approx(100.0)  # rows 0 and 1 are hits
    assert sorted(enc.calls[0][1]) == ["q0|", "q1|"]  # the queries of dropped rows are not embedded


def test_mmeb_e_plus_r_reorders_the_shortlist(mmeb_data):
    root, table = mmeb_data
    subsets = {"ImageNet_1K": root / "ImageNet_1K.parquet"}
    truth = {"q0|": "|cat", "q1|": "|dog", "q2|": "|car", "q3|": "|cat"}
    oracle = OracleReranker({q: {c: 1.0} for q, c in truth.items()})
    e = evaluate_mmeb(TableEncoder(table), subsets)
    # Row 3's ground truth is 3rd by embedding: a shortlist of 2 cannot rescue it, one of 3 (or 5) can.
    r2 = evaluate_mmeb(TableEncoder(table), subsets, reranker=oracle, rerank_k=2)
    r5 = evaluate_mmeb(TableEncoder(table), subsets, reranker=oracle, rerank_k=5)
    assert isinstance(oracle, SupportsRerank) and (e.mode, r2.mode) == ("E", "E+R")
    assert e.overall == pytest.approx(75.0) and r2.overall == pytest.approx(75.0) and r5.overall == pytest.approx(100.0)
    assert oracle.calls == 8  # once per row per reranked run

    class Inverted(OracleReranker):  # a reranker that prefers wrong answers makes every hit in the shortlist a miss
        def rerank(self, query, candidates):
            return [-s for s in super().rerank(query, candidates)]

    bad = evaluate_mmeb(TableEncoder(table), subsets, reranker=Inverted(oracle.relevance), rerank_k=2)
    assert bad.overall == pytest.approx(0.0)


# -------------------------------------------------------------------------------------------- VisDoc data
def png_bytes(color: str, seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(32, 32, color, seed).save(buf, format="PNG")
    return buf.getvalue()


def write_beir(folder: Path, pages: list[str], queries: dict[str, str], qrels: list[tuple[str, str, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    corpus = {"corpus-id": pages, "image": [{"bytes": png_bytes("green", i), "path": f"{p}.png"}
                                            for i, p in enumerate(pages)]}
    pq.write_table(pa.table(corpus, schema=pa.schema([("corpus-id", pa.string()), ("image", image_type)])),
                   folder / "corpus.parquet")
    pq.write_table(pa.table({"query-id": list(queries), "query": list(queries.values())}), folder / "queries.parquet")
    q, c, s = zip(*qrels)
    pq.write_table(pa.table({"query-id": list(q), "corpus-id": list(c), "score": pa.array(s, pa.int64())}),
                   folder / "qrels.parquet")
    return folder


@pytest.fixture
def visdoc_data(tmp_path):
    """One set named like ViDoRe's tatdqa. Pages p0..p5 are one-hot; a query's vector is its designed scores.

    q0: relevant p0 (1), ranked 1st                          -> NDCG@5 = 1,      recall@5 = 1
    q1: relevant p1 (2), p2 (1); ranking p2, p3, p1, p0, ... -> DCG = 1/log2(2) + 2/log2(4) = 2,
        IDCG = 2/log2(2) + 1/log2(3) = 2.6309                 -> NDCG@5 = 0.76019, recall@5 = 1
    q2: relevant p5 (1), ranked 6th                          -> NDCG@5 = 0,      recall@5 = 0
    q3: no judgment                                          -> not counted
    """
    pages = [f"p{i}" for i in range(6)]
    queries = {"q0": "query zero", "q1": "query one", "q2": "query two", "q3": "query three"}
    qrels = [("q0", "p0", 1), ("q1", "p1", 2), ("q1", "p2", 1), ("q2", "p5", 1)]
    folder = write_beir(tmp_path / "visdoc" / "ViDoRe_tatdqa", pages, queries, qrels)
    table = {f"{p}|": [1.0 if j == i else 0.0 for j in range(6)] for i, p in enumerate(pages)}
    table.update({
        "|query zero": [0.9, 0.5, 0.4, 0.3, 0.2, 0.1],
        "|query one": [0.2, 0.3, 0.9, 0.5, 0.1, 0.05],
        "|query two": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        "|query three": [1, 1, 1, 1, 1, 1],
    })
    return folder, table, qrels


NDCG_Q1 = 2 / (2 + 1 / math.log2(3))


def test_visdoc_metrics_match_hand_computed(visdoc_data, tmp_path):
    folder, table, _ = visdoc_data
    res = evaluate_visdoc(TableEncoder(table), {"ViDoRe_tatdqa": folder}, tmp_path / "out", k=5, chunk_size=2)
    s = res.sets["ViDoRe_tatdqa"]
    assert s.num_queries == 3 and s.num_candidates == 6  # the unjudged query is left out
    assert s.score == pytest.approx(100 * (1 + NDCG_Q1 + 0) / 3, abs=1e-4)
    assert s.metrics["recall@5"] == pytest.approx(200 / 3)
    per_query = torch.tensor([1.0, NDCG_Q1, 0.0])
    assert s.stderr == pytest.approx(100 * per_query.std().item() / math.sqrt(3), abs=1e-4)  # sample SD / sqrt(n)
    assert "stderr" not in s.metrics
    assert (s.group, s.split) == ("vidore_v1", "ind")
    assert res.collections == pytest.approx({"ViDoRe v1": s.score})
    assert res.overall == pytest.approx(s.score)
    # The run file (chunked scoring) re-scored by the TREC reader gives the same NDCG@5.
    run = trec.read_run(res.out_dir / s.run_file)
    qrels = trec.read_qrels(res.out_dir / s.qrels_file)
    assert list(run["q1"]) == ["p2", "p3", "p1", "p0", "p4", "p5"]
    assert 100 * trec.evaluate_run(run, qrels, ks=(5,))["ndcg@5"] == pytest.approx(s.score, abs=1e-4)


def test_visdoc_e_plus_r_with_oracle(visdoc_data):
    folder, table, qrels = visdoc_data
    relevance: dict[str, dict[str, float]] = {}
    for q, p, rel in qrels:
        relevance.setdefault(f"|query {['zero', 'one', 'two'][int(q[1])]}", {})[f"{p}|"] = float(rel)
    res = evaluate_visdoc(TableEncoder(table), folder, k=5, reranker=OracleReranker(relevance), rerank_k=5)
    # q1's shortlist holds both relevant pages -> ideal order; q2's relevant page is 6th -> out of reach.
    assert res.mode == "E+R"
    assert res.sets["ViDoRe_tatdqa"].score == pytest.approx(100 * 2 / 3, abs=1e-4)


def test_benchmark_lists():
    counts = {task: len(names) for task, names in suites.MMEB_META_TASKS.items()}
    assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert len(suites.MMEB_OOD) == 16 and suites.MMEB_OOD <= set(suites.MMEB_SUBSETS)
    assert [len(v) for v in suites.VISDOC_GROUPS.values()] == [10, 4, 6, 4]
    assert suites.canonical_name("ImageNet_1K") == "ImageNet-1K"
    assert suites.canonical_name("biomedical_lectures_v2") == "ViDoRe_biomedical_lectures_v2_multilingual"
    assert suites.canonical_name("arxivqa") is None  # ViDoRe or VisRAG? ambiguous, so not guessed
    assert suites.visdoc_info("MMLongBench-doc") == suites.SetInfo("ood", "ood")
    assert suites.mmeb_info("synth_cls_shape") is None


# ------------------------------------------------------------------------------------------- real model
def test_real_embedder_run_files_rescore_to_the_same_numbers(tiny_embedder, mmeb_data, visdoc_data, tmp_path):
    root, _ = mmeb_data
    out = tmp_path / "real"
    m = evaluate_mmeb(tiny_embedder, {"GQA": root / "GQA.parquet", "MSCOCO_t2i": root / "MSCOCO_t2i.parquet"},
                      out_dir=out / "mmeb", batch_size=4)
    folder, _, _ = visdoc_data
    v = evaluate_visdoc(tiny_embedder, {"ViDoRe_tatdqa": folder}, out / "visdoc", k=5, batch_size=4)
    for res, key in ((m, "ndcg@1"), (v, "ndcg@5")):
        for s in res.sets.values():
            run = trec.read_run(res.out_dir / s.run_file)
            qrels = trec.read_qrels(res.out_dir / s.qrels_file)
            assert set(run) == set(qrels) and len(run) == s.num_queries
            # MMEB: one relevant candidate per query, so NDCG@1 of the run is its Precision@1.
            assert 100 * trec.evaluate_run(run, qrels, ks=(1, 5))[key] == pytest.approx(s.score, abs=1e-4)
        saved = load_metrics(res.out_dir)
        assert set(saved) >= {"benchmark", "metric", "mode", "scale", "overall", "splits", "groups", "sets", "extra"}
        assert saved["overall"] == pytest.approx(res.overall) and saved["scale"] == 100.0
        assert res.plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert {p.name for p in res.artifacts()} >= {"metrics.json", "scores.png"}
    assert set(load_metrics(m.metrics_file)["sets"]["GQA"]) >= {"score", "group", "split", "run_file", "qrels_file"}


def test_cli_prints_table_and_writes_metrics(mmeb_data, tmp_path, capsys):
    from mmembed.eval.cli import main

    root, _ = mmeb_data
    (root / "subsets.json").write_text(json.dumps({"GQA": {"meta_task": "vqa", "split": "OOD"}}))
    args = ["mmeb", "--model", "tiny", "--data", str(root), "--out", str(tmp_path / "cli"), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "GQA" in printed and "overall" in printed
    assert load_metrics(tmp_path / "cli")["sets"]["GQA"]["num_queries"] == 2
