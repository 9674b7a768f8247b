"""The stage graph: keyed folders, skip-complete, resume after a kill, one build under concurrency, hook points,
the chain of weights between stages, and (slow) the whole pipeline through experiments/run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmembed.pipeline import COMPLETE, Pipeline, StageStore, fingerprint, read_complete, register_stage, stage_key
from mmembed.pipeline.graph import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
# One thread: on this shared 2-core machine two OpenMP threads per process are ~15x slower (spinning, oversubscribed).
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------- store
def test_key_is_stable_and_sensitive():
    a = stage_key({"lr": 1e-3, "data": {"n": 2}}, {"model": "abc"})
    assert a == stage_key({"data": {"n": 2}, "lr": 1e-3}, {"model": "abc"})  # key order does not matter
    assert a != stage_key({"lr": 2e-3, "data": {"n": 2}}, {"model": "abc"})
    assert a != stage_key({"lr": 1e-3, "data": {"n": 2}}, {"model": "abd"})


def test_complete_stage_is_reused_and_says_so(tmp_path):
    lines, calls = [], []
    store = StageStore(tmp_path, log=lines.append)

    def build(ctx):
        calls.append(ctx.folder)
        (ctx.folder / "model").mkdir()
        return {"outputs": {"model": "model"}, "metrics": {"after": {"m": 1.0}}}

    first = store.run("warmup", {"lr": 1}, build)
    second = store.run("warmup", {"lr": 1}, build)
    third = store.run("warmup", {"lr": 2}, build)
    assert len(calls) == 2 and not first.reused and second.reused and third.folder != first.folder
    assert second.output("model") == first.folder / "model" and second.metrics == {"after": {"m": 1.0}}
    assert any("reusing complete stage" in line and "warmup" in line for line in lines)
    # an input produced by a stage is identified by that stage's key
    assert fingerprint(first.output("model")) == f"{first.key}:model"


def test_failed_stage_is_not_marked_complete(tmp_path):
    store = StageStore(tmp_path, log=lambda _: None)

    def boom(ctx):
        (ctx.folder / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        store.run("hnm", {"a": 1}, boom)
    folder = store.folder("hnm", stage_key({"a": 1}))
    assert (folder / "partial").is_file() and not (folder / COMPLETE).exists() and read_complete(folder) is None


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)


def _lightning_stage(fail_at: int | None, steps: int, seen: list):
    """A real Lightning fit with a last.ckpt every step; raises after step ``fail_at`` (a kill mid-stage)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Tiny()

        def training_step(self, batch, _):
            return self.net.w(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Kill(L.Callback):
        def on_train_start(self, trainer, *args):
            seen.append(("start", trainer.global_step))

        def on_train_batch_end(self, trainer, *args):
            if fail_at is not None and trainer.global_step == fail_at:
                raise RuntimeError("killed mid-stage")

    def build(ctx):
        seen.append(ctx.resume_from)
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(8, 4))
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=ctx.folder / "checkpoints", save_last=True,
                                                   every_n_train_steps=1)
        trainer = L.Trainer(max_steps=steps, callbacks=[ckpt, Kill()], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=ctx.folder)
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=2),
                    ckpt_path=str(ctx.resume_from) if ctx.resume_from else None)
        return {"metrics": {"global_step": trainer.global_step}}

    return build


def test_killed_stage_resumes_from_its_last_checkpoint(tmp_path):
    store, seen = StageStore(tmp_path, log=lambda _: None), []
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        store.run("warmup", {"x": 1}, _lightning_stage(fail_at=3, steps=6, seen=seen))
    folder = store.folder("warmup", stage_key({"x": 1}))
    # Lightning runs checkpoint callbacks last, so the kill at step 3 left the checkpoint of step 2
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (folder / COMPLETE).exists()
    result = store.run("warmup", {"x": 1}, _lightning_stage(fail_at=None, steps=6, seen=seen))
    # the second attempt was told where to resume and continued from step 2, not from scratch
    assert seen == [None, ("start", 0), folder / "checkpoints" / "last.ckpt", ("start", 2)]
    assert result.metrics["global_step"] == 6 and (folder / COMPLETE).is_file()


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mmembed.pipeline import StageStore
    root, counter = Path(sys.argv[1]), Path(sys.argv[2])
    def build(ctx):
        with counter.open("a") as f:
            f.write("built\\n")
        time.sleep(1.5)
        return {"outputs": {"model": "m"}}
    r = StageStore(root).run("warmup", {"shared": True}, build)
    print("RESULT", r.folder, r.reused)
""")


def test_concurrent_runs_build_a_shared_stage_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "stages"), str(tmp_path / "count")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (tmp_path / "count").read_text().splitlines() == ["built"]
    results = [line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")]
    assert len({r.split()[1] for r in results}) == 1 and sorted(r.split()[2] for r in results) == ["False", "True"]


# ---------------------------------------------------------------------------------------------------- graph
@pytest.fixture
def toy_registry():
    saved = dict(REGISTRY)
    REGISTRY.clear()
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_graph_builds_prerequisites_and_skips_unavailable_hooks(tmp_path, toy_registry):
    order = []

    def stage(name):
        def fn(pipe, deps):
            order.append((name, sorted(deps)))
            return pipe.store.run(name, {"deps": sorted(deps)}, lambda ctx: {"outputs": {"model": "m"}})
        return fn

    register_stage("a")(stage("a"))
    register_stage("b", uses=("a",))(stage("b"))
    register_stage("judge", requires=("b",), available=lambda: "mmembed.judge is not in this checkout yet")(stage("j"))
    register_stage("stage3", requires=("judge",))(stage("stage3"))
    register_stage("reranker", requires=("a",), uses=("judge",))(stage("reranker"))
    lines = []
    pipe = Pipeline(StageStore(tmp_path, log=lines.append), log=lines.append)
    results = pipe.run(["b", "judge", "stage3", "reranker"])
    assert order == [("a", []), ("b", ["a"]), ("reranker", ["a"])]
    assert results["judge"] is None and results["stage3"] is None and results["reranker"] is not None
    assert "not in this checkout" in pipe.notes["judge"] and pipe.notes["stage3"] == "needs judge, which was skipped"
    # disabled stages are skipped and consumers that only *use* them run without
    order.clear()
    pipe = Pipeline(StageStore(tmp_path, log=lines.append), disabled=("a",), log=lines.append)
    assert pipe.build("b") is not None and order == [("b", [])] and "disabled" in pipe.notes["a"]


def test_paper_stages_are_one_explicit_table_without_import_side_effects():
    before = dict(REGISTRY)
    from mmembed.launch.stages import STAGES
    from mmembed.pipeline import PAPER_STAGES

    assert REGISTRY == before  # importing the table registers nothing
    assert tuple(STAGES) == PAPER_STAGES
    assert STAGES["hnm"].requires == ("warmup", "mine") and "stage1" in STAGES["reranker"].uses
    assert STAGES["stage3"].requires == ("hnm", "judge") and STAGES["judge"].uses == ("stage1",)
    # every dependency is a stage of the table, named before its consumer
    for i, d in enumerate(STAGES.values()):
        assert set(d.requires) | set(d.uses) <= set(PAPER_STAGES[:i]), d.name


@pytest.mark.parametrize("init", ["stage1", "hnm", "stage3"])
def test_reranker_starts_from_the_model_pipeline_reranker_init_names(tmp_path, monkeypatch, init):
    from omegaconf import OmegaConf

    from mmembed.launch import stages
    from mmembed.pipeline import Pipeline, StageResult, StageStore

    seen = {}
    monkeypatch.setattr(stages, "train_stage", lambda pipe, name, inputs, set_keys, **kw: seen.update(
        name=name, inputs=inputs, set_keys=set_keys, **kw) or "built")
    cfg = OmegaConf.create({"pipeline": {"reranker_init": init}})
    pipe = Pipeline(StageStore(tmp_path), stages.Settings(cfg=cfg, overrides=[]), stages=stages.STAGES)
    deps = {n: StageResult(n, "k", tmp_path / n, {"model": "embedder", "shards": "shards"})
            for n in ("stage1", "warmup", "mine", "hnm", "judge", "stage3")}
    assert stages.reranker(pipe, deps) == "built"
    assert seen["set_keys"] == {"init_from": tmp_path / init / "embedder"}
    assert seen["train_shards"] == str(tmp_path / "judge" / "shards" / "*.tar")  # judge-curated data either way
    # the chosen start did not run (stage 1 disabled): skipped with the reason, not silently another model
    del deps[init]
    assert stages.reranker(pipe, deps) is None and "pipeline.reranker_init" in pipe.notes["reranker"]
    cfg.pipeline.reranker_init = "judge"
    with pytest.raises(ValueError, match="reranker_init='judge'"):
        stages.reranker(pipe, deps)


# ---------------------------------------------------------------------------------------------------- chain
def test_next_stage_starts_from_the_previous_export_with_a_fresh_adapter(tmp_path):
    """LoRA is merged at the boundary; the next stage's starting weights equal the export, its new adapter is a
    no-op at start (lora_B = 0), so its 'before' evaluation is the previous stage's 'after'."""
    from mmembed import Embedder, Item
    from mmembed.backbone import build_backbone
    from mmembed.modules import ContrastiveModule

    trained = build_backbone("tiny", vtc_factor=2, finetune={"mode": "lora", "lora_r": 4, "lora_alpha": 8})
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter (non-zero update)
    prev = ContrastiveModule(trained)
    export = prev.embedder().save_pretrained(tmp_path / "warmup" / "embedder")
    merged = Embedder.from_pretrained(export, device="cpu").module.hf_model.state_dict()
    base = build_backbone("tiny", vtc_factor=2).hf_model.state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in merged)  # the adapter's update is in the export
    nxt = build_backbone(export, finetune={"mode": "lora", "lora_r": 4, "lora_alpha": 8})
    start = {k.replace(".base_layer", ""): v for k, v in nxt.hf_model.state_dict().items() if "lora_" not in k}
    assert start.keys() == merged.keys()
    for k, v in merged.items():
        assert torch.equal(start[k], v), k
    assert all(float(p.abs().max()) == 0 for n, p in nxt.named_parameters() if "lora_B" in n)
    items = [Item(text="a red circle"), Item(text="three blue squares")]
    torch.testing.assert_close(ContrastiveModule(nxt).embedder().encode(items), prev.embedder().encode(items),
                               atol=1e-5, rtol=1e-5)


def _compose(tmp_path, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "configs"), version_base="1.3"):
        return compose("run", overrides=[f"paths.root_dir={tmp_path}", "paths.output_dir=x", *overrides])


def test_stage_exp_files_follow_table_14(tmp_path):
    warm = _compose(tmp_path, ["+exp=stage2_warmup"])
    hnm = _compose(tmp_path, ["+exp=stage2_hnm", "mining.checkpoint=/runs/warmup/embedder"])
    assert warm.trainer.max_epochs == hnm.trainer.max_epochs == 2
    assert warm.data.num_hard_negatives == 0 and hnm.data.num_hard_negatives == 2
    assert hnm.init_from == "/runs/warmup/embedder"  # the HNM round continues from the warm-up model
    s1 = _compose(tmp_path, ["+exp=stage1_restoration"])
    assert s1.backbone.finetune.mode == "full" and s1.data.pack and s1.data.max_tiles == 4
    assert s1.trainer.accumulate_grad_batches > 1 and s1.module._target_.endswith("RestorationModule")
    # the conversations and the judge questions: the stage-1 model is the pipeline's judge
    assert [p.rsplit("/", 1)[1] for p in s1.data.data_path] == ["llava.json", "judge.json"]


# ------------------------------------------------------------------------------------------------ end to end
def _run(tmp_path: Path, args: list[str], run: str = "run", timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMEMBED_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args, f"hydra.run.dir={tmp_path}/{run}",
                        f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-4000:])
    return r


@pytest.mark.slow
def test_pipeline_smoke_runs_chains_and_reuses(tmp_path):
    r = _run(tmp_path, ["+exp=pipeline_smoke"])
    summary = json.loads((tmp_path / "run" / "pipeline_summary.json").read_text())
    steps = [row["step"] for row in summary["rows"]]
    assert steps == ["base model", "+ stage 1 restoration", "+ stage 2 warm-up", "+ global HNM",
                     "+ judge curation (stage 3)", "+ reranker (E+R)"]  # the whole chain: Table 7's rows
    assert not summary["skipped"]
    assert "MMEB" in r.stdout and "VISDOC" in r.stdout
    stages = {n: s for n, s in summary["stages"].items() if s}
    done = {n: json.loads((Path(s["folder"]) / COMPLETE).read_text()) for n, s in stages.items() if n != "eval"}
    # each stage started from the previous stage's export: its "before" is the previous "after"
    for prev, nxt in (("stage1", "warmup"), ("warmup", "hnm")):
        assert done[nxt]["metrics"]["before"]["val/mmeb/overall"] == done[prev]["metrics"]["after"]["val/mmeb/overall"]
        cfg = json.loads((Path(stages[nxt]["folder"]) / "stage.json").read_text())["config"]
        assert cfg["init_from"] == str(Path(stages[prev]["folder"]) / "embedder")
    # the E+R row is the final embedder's shortlist reranked (it once silently evaluated E alone)
    for bench in ("mmeb", "visdoc"):
        er = json.loads((tmp_path / "run" / "eval_er" / bench / "metrics.json").read_text())
        assert er["mode"] == "E+R"
    # the judge stage reads the stage-3 exp's judge block (n = 12) and fills the cache task=judge_ft shares
    curation = json.loads((Path(stages["judge"]["folder"]) / "summary.json").read_text())
    assert curation["n"] == 12 and curation["strategy"] == "judge"
    assert (Path(stages["judge"]["folder"]).parent / "judge_cache" / "judgments.jsonl").is_file()
    # MLflow: a parent with one child per stage and the summary as its artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mmembed").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("mmembed.pipeline") == "true"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(x.data.tags.get("mlflow.runName") for x in children) == [
        f"pipeline_smoke/{n}" for n in ("hnm", "reranker", "stage1", "stage3", "warmup")]  # training stages only
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline_summary")}
    assert {"pipeline_summary/summary.csv", "pipeline_summary/summary.png"} <= arts
    # a second run reuses every complete stage
    r2 = _run(tmp_path, ["+exp=pipeline_smoke"], run="run2")
    assert r2.stdout.count("reusing complete stage") == 7  # stage1 warmup mine hnm judge stage3 reranker


def test_slurm_launcher_config_composes_for_multinode(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=[f"paths.root_dir={tmp_path}", "paths.output_dir=x", "hydra/launcher=slurm",
                                        "+exp=ablation_hn16", "trainer=ddp", "trainer.devices=4",
                                        "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert OmegaConf.select(cfg, "hydra.launcher.nodes") == 2 == cfg.trainer.num_nodes
    assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == 4


def test_pipeline_runs_record_where_their_chain_and_reranker_start():
    from omegaconf import OmegaConf

    from mmembed.launch.summary import start_tags

    def cfg(disabled, init=None):
        return OmegaConf.create({"backbone": {"name_or_path": "tiny"}, "pipeline": {
            "stages": ["stage1", "warmup", "eval"], "disabled": disabled, "reranker_init": init}})

    assert start_tags(cfg([])) == {"mmembed.pipeline.start": "stage 1", "mmembed.pipeline.reranker_init": "stage1"}
    assert start_tags(cfg(["stage1"], "hnm")) == {"mmembed.pipeline.start": "backbone tiny",
                                                  "mmembed.pipeline.reranker_init": "hnm"}


def test_a_pipeline_stopping_at_the_warmup_builds_nothing_after_it(tmp_path, monkeypatch):
    """``pipeline.stages=[stage1, warmup, eval]`` (+exp=start_stage1): the final evaluation reads what the run
    built; it once built mining, HNM, the judge, stage 3 and the reranker as its 'uses'."""
    from omegaconf import OmegaConf

    from mmembed.launch import stages
    from mmembed.pipeline import StageResult

    built = []

    def fake(pipe, name, inputs, set_keys, **kw):
        built.append((name, {k: str(v) for k, v in set_keys.items()}))
        return StageResult(name, "k", tmp_path / name, {"model": "embedder"},
                           {"before": {}, "after": {"val/mmeb/overall": float(len(built))}})

    monkeypatch.setattr(stages, "train_stage", fake)
    cfg = OmegaConf.create({"pipeline": {"reranker_init": "stage1"}, "paths": {"output_dir": str(tmp_path)}})
    pipe = Pipeline(StageStore(tmp_path), stages.Settings(cfg=cfg, overrides=[]), stages=stages.STAGES)
    pipe.run(["stage1", "warmup", "eval"])
    assert built == [("stage1", {}), ("warmup", {"init_from": str(tmp_path / "stage1" / "embedder")})]
    rows = pipe.results["eval"].metrics["rows"]
    assert [(r["step"], r.get("val/mmeb/overall")) for r in rows][1:] == [("+ stage 1 restoration", 1.0),
                                                                          ("+ stage 2 warm-up", 2.0)]
