"""The mteb v2 wrapper: mteb's own retrieval evaluation on a local synthetic ViDoRe set equals mmembed-eval visdoc."""

from __future__ import annotations

import pytest

from mmembed.data.synth.world import SIZES, write_visdoc
from mmembed.eval.visdoc import evaluate_visdoc

mteb = pytest.importorskip("mteb")


@pytest.fixture(scope="module")
def vidore_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_visdoc("synth_vidore", root, seed=0, cfg=SIZES["ci"])
    return root / "eval" / "visdoc" / "synth_vidore"


def test_mteb_retrieval_gives_the_kits_ndcg_at_5(tiny_embedder, vidore_set):
    from mmembed.integrations.mteb_encoder import MMEmbedEncoder, beir_retrieval_task

    task = beir_retrieval_task(vidore_set, name="SynthVidore")
    result = mteb.evaluate(MMEmbedEncoder(tiny_embedder), task, cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    kit = evaluate_visdoc(tiny_embedder, {"synth_vidore": vidore_set}).sets["synth_vidore"]
    assert kit.num_queries == 12 and kit.num_candidates == 15
    # mteb rounds its scores to 5 decimals; the kit reports x100
    assert scores["ndcg_at_5"] == pytest.approx(kit.metrics["ndcg@5"] / 100, abs=1e-4)
    assert scores["recall_at_5"] == pytest.approx(kit.metrics["recall@5"] / 100, abs=1e-4)
    assert scores["main_score"] == scores["ndcg_at_5"]


def test_mteb_command_prints_the_same_score(tiny_embedder, vidore_set, capsys):
    from mmembed.integrations.mteb_encoder import main

    kit = evaluate_visdoc(tiny_embedder, {"synth_vidore": vidore_set}).sets["synth_vidore"]
    # the same preset and seed as tiny_embedder, loaded by the command
    assert main(["--model", "tiny", "--device", "cpu", "--beir", str(vidore_set)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Localsynth_vidore\ttest"))
    assert float(line.split("ndcg_at_5=")[1]) == pytest.approx(kit.metrics["ndcg@5"] / 100, abs=1e-4)
    assert main(["--model", "tiny", "--device", "cpu"]) == 2  # no tasks: one line on stderr, exit status 2
    assert "no tasks" in capsys.readouterr().err


def test_mteb_instructions_follow_the_paper_tables(tiny_embedder):
    from mmembed.data.evalsets import VISDOC_QUERY_INSTRUCTION, VISDOC_TARGET_INSTRUCTION
    from mmembed.integrations.mteb_encoder import MMEmbedEncoder

    model = MMEmbedEncoder(tiny_embedder, instructions={"VidoreArxivQARetrieval": ("Q?", None)})
    vidore = mteb.get_task("VidoreDocVQARetrieval").metadata  # metadata only: nothing is downloaded
    query, doc = mteb.types.PromptType.query, mteb.types.PromptType.document
    assert model.instruction_for(vidore, query, "text") == VISDOC_QUERY_INSTRUCTION
    assert model.instruction_for(vidore, doc, "image") == VISDOC_TARGET_INSTRUCTION
    arxiv = mteb.get_task("VidoreArxivQARetrieval").metadata
    assert model.instruction_for(arxiv, query, "text") == "Q?" and model.instruction_for(arxiv, doc, "image") is None
    other = mteb.get_task("SciFact").metadata  # a text task: the task's own prompt, the paper's text target
    assert model.instruction_for(other, query, "text") == model.get_instruction(other, query)
    assert model.instruction_for(other, doc, "text") == "Represent the given text."
