"""Judge relevance questions of the synthetic world: answers follow the ground truth, records are valid stage-1
conversations, and the prompt trained is the prompt the kit's judge renders."""

from __future__ import annotations

import json
import random

from mmembed.data.synth.judge_questions import make_judge_questions, write_judge_questions
from mmembed.data.synth.tasks import BY_NAME
from mmembed.data.synth.world import SizeConfig
from mmembed.judge.evaluate import load_pairs


def test_answers_follow_the_accepts_provides_rule():
    ds = BY_NAME["synth_ret_t2i"]  # captions: another scene may fit a query's caption (a false negative)
    qs = make_judge_questions(random.Random(0), 32, side=64, datasets=(ds,))
    assert {q.relation for q in qs} == {"positive", "false_negative", "negative"}
    for q in qs:
        assert q.relevant == (q.relation != "negative") and q.dataset == "synth_ret_t2i"
        assert q.instruction == "Determine whether the given query text is relevant to the given image."
        assert q.q_image is None and q.t_image is not None and q.q_text


def test_written_records_are_stage1_conversations_and_match_the_judge_prompt(tmp_path, kit_judge_tiny):
    cfg = SizeConfig(0, 0, 0, 0, 0, instruct=12, maxcount=1, image_side=64)
    counts = write_judge_questions("questions", tmp_path, 0, cfg)
    assert counts["train"]["questions"] == 12 and counts["heldout"]["questions"] == 8
    records = json.loads((tmp_path / "instruct" / "judge.json").read_text())
    held = json.loads((tmp_path / "instruct" / "judge_heldout.json").read_text())
    assert {r["id"] for r in records}.isdisjoint({r["conversations"][0]["value"] for r in held})

    from mmembed.datamodules.instruction import ConversationEncoder

    enc = ConversationEncoder(kit_judge_tiny.processor, tmp_path / "instruct", max_tiles=1)
    pairs, infos = load_pairs(tmp_path / "instruct" / "judge.json")
    for record, pair, info in zip(records, pairs, infos):
        out = enc(record)
        answer = [t for t in out["labels"] if t != -100]
        want = kit_judge_tiny.yes_ids if info["answer"] == "yes" else kit_judge_tiny.no_ids
        assert answer[0] in want  # the first supervised token is the token the judge reads
        prompt = kit_judge_tiny.render(pair)[0]
        n_prompt = len(kit_judge_tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        text_ids = enc.tokenizer(enc.tokenizer.apply_chat_template(enc.messages(record, len(record.get("image", []))),
                                                                   tokenize=False), add_special_tokens=False)
        assert text_ids["input_ids"][:n_prompt] == kit_judge_tiny.tokenizer(prompt, add_special_tokens=False)[
            "input_ids"]


def test_eval_cli_judge_scores_heldout_questions(tmp_path, capsys):
    """``mmembed-eval judge`` on the world's held-out questions writes the metrics evaluate_judge computes."""
    from mmembed.eval import cli as eval_cli

    cfg = SizeConfig(0, 0, 0, 0, 0, instruct=12, maxcount=1, image_side=64)
    write_judge_questions("questions", tmp_path, 0, cfg)
    held = tmp_path / "instruct" / "judge_heldout.json"
    assert eval_cli.main(["judge", "--judge", "tiny", "--data", str(held), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    answers = [r["judge"]["answer"] for r in json.loads(held.read_text())]
    assert metrics["pairs"] == len(answers) == 8
    assert metrics["true_yes_rate"] == round(answers.count("yes") / len(answers), 4)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["judge"] == "tiny"
    assert "accuracy" in capsys.readouterr().out
    missing = ["judge", "--judge", "tiny", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")]
    assert eval_cli.main(missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge_heldout.json" in err[0]


def _judge_synth():
    """experiments/judge_synth.py as a module (a script, not a package member)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "judge_synth.py"
    spec = importlib.util.spec_from_file_location("judge_synth", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_synth_script_trains_and_scores(tmp_path):
    """experiments/judge_synth.py end to end at toy size: questions over one dataset, 2 steps, the curve recorded."""
    module = _judge_synth()
    result = module.main(["--out", str(tmp_path), "--instruct", "8", "--steps", "2", "--batch-size", "4",
                          "--judge-only", "--datasets", "synth_cls_color", "--eval-every", "1", "--threads", "1"])
    assert result["train_records"] == 8 and [c["step"] for c in result["curve"]] == [1, 2]
    assert result["after"]["pairs"] == 8 and set(result["after"]["accuracy_by_dataset"]) == {"synth_cls_color"}
    assert (tmp_path / "stage1_judge" / "config.json").is_file()


def test_judge_synth_text_probe_questions_and_small_preset(tmp_path):
    """--text-probe: text-only colour-match questions in the judgment template, answered from the colours; trains the
    `small` preset (the judge-sized shape) for 2 steps through the same path."""
    import json

    from mmembed.prompts.judge import JUDGE_TAIL

    module = _judge_synth()
    train = module.build_text_probe(tmp_path / "p", 40, seed=3)
    records = json.loads(train.read_text())
    assert len(records) == 40 and len(json.loads((train.parent / "judge_heldout.json").read_text())) == 10
    for r in records:
        j = r["judge"]
        colour = j["query"]["text"].split()[1]
        assert (j["answer"] == "yes") == (colour == j["target"]["text"])
        assert r["conversations"][1]["value"] == " " + j["answer"] and "image" not in r
        assert r["conversations"][0]["value"].endswith(JUDGE_TAIL) and "<image>" not in r["conversations"][0]["value"]
    assert 8 < sum(r["judge"]["answer"] == "yes" for r in records) < 32  # both answers, about half each
    result = module.main(["--out", str(tmp_path / "run"), "--text-probe", "--preset", "small", "--instruct", "8",
                          "--steps", "2", "--batch-size", "4", "--threads", "1"])
    assert result["train_records"] == 8 and result["after"]["pairs"] == 8
    assert set(result["after"]["accuracy_by_dataset"]) == {"text_probe"}
