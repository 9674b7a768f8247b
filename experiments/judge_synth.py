"""Does the kit's stage-1 model learn to judge? Train stage 1 on the synthetic world's conversations plus its judge
relevance questions, then measure the judge on held-out questions against the ground truth.

Steps: (1) write stage-1 conversations and judge questions (:mod:`mmembed.data.synth.judge_questions`) into
``--out/world/instruct`` (only these units of the world, so it is quick); (2) score the held-out questions with the
untrained model; (3) train stage 1 (``RestorationModule`` + ``InstructionDataModule``, full fine-tuning) on the
conversations and the training questions, save it to ``--out/stage1_judge``; (4) score the held-out questions again.
Prints both metric sets and writes ``--out/judge_metrics.json``.

Run from the repository root::

    python experiments/judge_synth.py --out outputs/judge_synth --instruct 600 --steps 400
"""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_data(out: Path, n: int, seed: int, side: int, judge_only: bool = False,
               datasets: list[str] | None = None) -> Path:
    """Stage-1 conversations + judge questions under ``out/world/instruct``; returns the merged training file.

    ``judge_only``: train on the judge questions alone; ``datasets``: questions over these training datasets only.
    """
    from mmembed.data.synth.judge_questions import write_judge_questions
    from mmembed.data.synth.tasks import DATASETS
    from mmembed.data.synth.world import SizeConfig, write_instruct

    chosen = None
    if datasets:
        known = {d.name: d for d in DATASETS if not d.ood}
        unknown = sorted(set(datasets) - set(known))
        if unknown:
            raise SystemExit(f"--datasets: unknown {unknown}; choose from {sorted(known)}")
        chosen = tuple(known[name] for name in datasets)
    world = out / "world"
    cfg = SizeConfig(0, 0, 0, 0, 0, instruct=n, maxcount=1, image_side=side)
    if not (world / "instruct" / "judge_heldout.json").is_file():
        if not judge_only:
            write_instruct("llava", world, seed, cfg)
        write_judge_questions("questions", world, seed, cfg, datasets=chosen)
    folder = world / "instruct"
    merged = [] if judge_only else json.loads((folder / "llava.json").read_text())
    merged += json.loads((folder / "judge.json").read_text())
    path = folder / "stage1_with_judge.json"
    path.write_text(json.dumps(merged) + "\n")
    return path


def build_text_probe(out: Path, n: int, seed: int) -> Path:
    """Text-only judge questions in the same judgment template: "Query: a <colour> object" vs "Target: <colour>",
    yes when the colours match (half the time). No image, so it asks only whether the language model can learn a
    comparison through the template -- the step the image questions need after perception. Returns the training file.
    """
    from mmembed.data.synth.scenes import COLORS
    from mmembed.prompts.judge import TASK_FALLBACK, judgment_body

    folder = out / "text_probe"
    folder.mkdir(parents=True, exist_ok=True)
    instruction = TASK_FALLBACK["t2t"]
    colours = sorted(COLORS)
    for split, count in (("train", n), ("heldout", max(8, n // 4))):
        rng = random.Random(f"{seed}/text-probe-{split}")
        records = []
        for i in range(count):
            q = rng.choice(colours)
            t = q if rng.random() < 0.5 else rng.choice([c for c in colours if c != q])
            answer = "yes" if q == t else "no"
            query, target = {"text": f"a {q} object", "image": None}, {"text": t, "image": None}
            body = judgment_body(instruction, query["text"], False, t, False)
            records.append({"id": f"text_probe_{split}_{i:06d}",
                            "conversations": [{"from": "human", "value": body}, {"from": "gpt", "value": f" {answer}"}],
                            "judge": {"dataset": "text_probe", "instruction": instruction,
                                      "relation": "positive" if q == t else "negative", "answer": answer,
                                      "query": query, "target": target}})
        name = "judge.json" if split == "train" else "judge_heldout.json"
        (folder / name).write_text(json.dumps(records) + "\n")
    return folder / "judge.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/judge_synth")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--instruct", type=int, default=600, help="stage-1 conversations (and as many judge questions)")
    p.add_argument("--image-side", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--judge-only", action="store_true", help="train on the judge questions alone (no conversations)")
    p.add_argument("--datasets", default=None, help="comma-separated training datasets to ask about (default: all)")
    p.add_argument("--eval-every", type=int, default=0, help="also score the held-out questions every N steps")
    p.add_argument("--text-probe", action="store_true",
                   help="text-only colour-match questions in the judgment template instead of the world's (no images)")
    args = p.parse_args(argv)

    import lightning as L
    import torch
    from mmembed.datamodules.instruction import InstructionDataModule

    from mmembed.backbone.model import build_backbone, load_processor
    from mmembed.judge import Judge
    from mmembed.judge.evaluate import evaluate_judge
    from mmembed.modules import RestorationModule

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.text_probe:
        train_file = build_text_probe(out, args.instruct, args.seed)
    else:
        train_file = build_data(out, args.instruct, args.seed, args.image_side, args.judge_only,
                                args.datasets.split(",") if args.datasets else None)
    heldout = train_file.parent / "judge_heldout.json"
    backbone = build_backbone(args.preset, finetune={"mode": "full"}, seed=args.seed)
    processor, _ = load_processor(args.preset, backbone.vtc_factor)

    def score_heldout(show_progress: bool | None = None) -> dict:
        """The held-out metrics of the model as it is now (scored in eval mode; the previous mode restored)."""
        was_training = backbone.training
        backbone.eval()
        metrics = evaluate_judge(Judge(backbone.hf_model, processor), heldout, show_progress=show_progress)
        backbone.train(was_training)
        return metrics

    before = score_heldout()
    print("held-out judge metrics, untrained:", json.dumps(before))

    L.seed_everything(args.seed, workers=True)
    backbone.train()
    module = RestorationModule(backbone, optimizer=partial(torch.optim.AdamW, lr=args.lr))
    # max_tiles=1: the judge prompts its processor with one tile per image, so train the same way.
    data = InstructionDataModule(str(train_file), batch_size=args.batch_size, max_tiles=1, num_workers=0,
                                 input_builder=backbone.input_builder, seed=args.seed)
    curve: list[dict] = []

    class HeldOutCurve(L.Callback):  # the held-out metrics every --eval-every optimizer steps
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if args.eval_every and step % args.eval_every == 0 and (not curve or curve[-1]["step"] != step):
                m = score_heldout(show_progress=False)
                curve.append({"step": step, **{k: m[k] for k in ("accuracy", "yes_rate", "auc")}})
                print(f"step {step}: held-out {json.dumps(curve[-1])}", flush=True)

    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=10, callbacks=[HeldOutCurve()])
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - t_fit
    from mmembed.backbone.model import build_input_builder
    from mmembed.embedder import Embedder

    saved = Embedder(backbone.eval(), build_input_builder(args.preset)).save_pretrained(out / "stage1_judge")
    print(f"stage-1 model saved to {saved} (load it with Judge.from_pretrained)")
    after = score_heldout()
    print("held-out judge metrics, after stage 1:", json.dumps(after))
    result = {"args": vars(args), "train_records": len(json.loads(train_file.read_text())), "before": before,
              "after": after, "curve": curve,
              "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "fit_s": round(fit_s, 1), "total_s": round(time.perf_counter() - t0, 1)}
    (out / "judge_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
