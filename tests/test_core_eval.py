"""CORE scoring on tiny bundles built here, with a stub model whose log-probs are known.

The stub tokenizer is one token per character (id = ord(c), BOS = 128). The stub model is a "copy"
model: at every position it puts logit 5 on the current token and 0 elsewhere, so a continuation
token costs little exactly when it repeats the token before it. That makes every answer below
predictable by hand.
"""
import json
import os
import zipfile

import pytest
import torch

from nanochat import core_eval
from nanochat.core_eval import (BundleError, CoreTask, centered, continuation_spans,
                                ensure_eval_bundle, evaluate_core, fewshot_examples, load_bundle,
                                parse_icl_tasks_yaml, render_prompts, score_example)

BOS = 128


class CharTokenizer:
    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        ids = [ord(c) for c in text]
        assert all(i < 128 for i in ids)
        return ([prepend] if prepend is not None else []) + ids


class CopyModel:
    """logits[b, t] = 5 at ids[b, t] (predicts 'the next token repeats this one'), 0 elsewhere."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids):
        self.calls.append(tuple(ids.shape))
        logits = torch.zeros(*ids.shape, 129)
        logits.scatter_(2, ids.unsqueeze(-1), 5.0)
        return logits


def write_bundle(root, tasks, data):
    os.makedirs(os.path.join(root, "eval_data"), exist_ok=True)
    for name, rows in data.items():
        with open(os.path.join(root, "eval_data", name), "w", encoding="utf-8") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(os.path.join(root, "core.json"), "w", encoding="utf-8") as f:
        json.dump({"format": "nanochat-core-v1", "tasks": tasks}, f)
    return str(root)


# Multiple choice: the choice whose continuation repeats characters wins ("aaa" over "abc").
MC = [
    {"query": "Q1:", "choices": ["xaaa", "xabc"], "gold": 0},   # right
    {"query": "Q2:", "choices": ["xabc", "xbbb"], "gold": 1},   # right
    {"query": "Q3:", "choices": ["xccc", "xcde"], "gold": 1},   # wrong (model picks 0)
    {"query": "Q4:", "choices": ["xdef", "xddd", "xdfe"], "gold": 1},  # right
]
# Schema (delimiter ""): contexts end differently, continuation "bbb"; ending in "b" wins.
SCHEMA = [
    {"context_options": ["ca", "cb"], "continuation": "bbb", "gold": 1},  # right
    {"context_options": ["cb", "ca"], "continuation": "bbb", "gold": 1},  # wrong
]
# Language modelling (delimiter ":"): correct iff every continuation token repeats the previous one.
LM = [
    {"context": "ab", "continuation": "::"},     # right (":" then ":" after ":")
    {"context": " gh  ", "continuation": "::"},  # right (context is stripped)
    {"context": "ab", "continuation": ":x"},     # wrong
    {"context": "ab", "continuation": "b"},      # wrong (":" was predicted)
]
TASKS = [
    {"label": "mc", "task_type": "multiple_choice", "dataset_uri": "eval_data/mc.jsonl", "num_fewshot": 2,
     "continuation_delimiter": " ", "random_baseline": 0.5},
    {"label": "schema", "task_type": "schema", "dataset_uri": "eval_data/schema.jsonl", "num_fewshot": 1,
     "continuation_delimiter": "", "random_baseline": 0.5},
    {"label": "lm", "task_type": "language_modeling", "dataset_uri": "eval_data/lm.jsonl", "num_fewshot": 1,
     "continuation_delimiter": ":", "random_baseline": 0.0},
]


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle", TASKS,
                        {"mc.jsonl": MC, "schema.jsonl": SCHEMA, "lm.jsonl": LM})


def test_render_prompts_with_fewshot():
    shots = [{"query": "A?", "choices": ["no", "yes"], "gold": 1}, {"query": "B?", "choices": ["x"], "gold": 0}]
    assert render_prompts({"query": "C?", "choices": ["p", "q"]}, "multiple_choice", " => ", shots) == [
        "A? => yes\n\nB? => x\n\nC? => p", "A? => yes\n\nB? => x\n\nC? => q"]
    shots = [{"context_options": ["k1", "k2"], "continuation": "end", "gold": 1}]
    assert render_prompts({"context_options": ["c1", "c2"], "continuation": "cont"}, "schema", " ", shots) == [
        "k2 end\n\nc1 cont", "k2 end\n\nc2 cont"]
    shots = [{"context": "  ctx0 ", "continuation": "c0"}]
    assert render_prompts({"context": "ctx1 ", "continuation": "c1"}, "language_modeling", " ", shots) == [
        "ctx0 c0\n\nctx1", "ctx0 c0\n\nctx1 c1"]   # [without (trailing space stripped), with]


def test_fewshot_examples_are_fixed_per_index_and_exclude_the_example():
    data = [{"i": i} for i in range(10)]
    for idx in range(10):
        shots = fewshot_examples(data, idx, 3)
        assert len(shots) == 3 and data[idx] not in shots
        assert shots == fewshot_examples(data, idx, 3)
    assert fewshot_examples(data, 0, 0) == []
    assert len(fewshot_examples(data[:2], 0, 5)) == 1  # never more than the other examples


def test_continuation_spans():
    rows, spans = continuation_spans([[128, 1, 2, 3], [128, 1, 2, 4, 5]], "multiple_choice")
    assert spans == [(3, 4), (3, 5)]
    rows, spans = continuation_spans([[128, 7, 1, 2], [128, 8, 9, 1, 2]], "schema")
    assert spans == [(2, 4), (3, 5)]
    rows, spans = continuation_spans([[128, 1, 2], [128, 1, 2, 3, 4]], "language_modeling")
    assert rows == [[128, 1, 2, 3, 4]] and spans == [(3, 5)]


def test_score_example_known_answers():
    tok, model = CharTokenizer(), CopyModel()
    mc = CoreTask("mc", "multiple_choice", "-", 0, " ", 0.5)
    assert [score_example(model, tok, ex, mc, [], "cpu") for ex in MC] == [True, True, False, True]
    sc = CoreTask("s", "schema", "-", 0, "", 0.5)
    assert [score_example(model, tok, ex, sc, [], "cpu") for ex in SCHEMA] == [True, False]
    lm = CoreTask("l", "language_modeling", "-", 0, ":", 0.0)
    assert [score_example(model, tok, ex, lm, [], "cpu") for ex in LM] == [True, True, False, False]
    # Few-shot examples only add context before the scored span: same answers here, longer rows.
    model.calls.clear()
    assert score_example(model, tok, MC[0], mc, MC[1:3], "cpu")
    assert model.calls[-1][1] == len("Q2: xbbb\n\nQ3: xcde\n\nQ1: xaaa") + 1
    # Left-cropping to the context length keeps the scored end.
    assert score_example(model, tok, MC[0], mc, MC[1:3], "cpu", max_seq_len=6)
    assert model.calls[-1][1] == 6


def test_evaluate_core_on_a_tiny_bundle(bundle):
    res = evaluate_core(CopyModel(), CharTokenizer(), bundle, "cpu")
    assert res["accuracy"] == {"mc": 0.75, "schema": 0.5, "lm": 0.5}
    assert res["centered"] == {"mc": pytest.approx(0.5), "schema": pytest.approx(0.0), "lm": pytest.approx(0.5)}
    assert res["core"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert res["examples"] == {"mc": 4, "schema": 2, "lm": 4}
    # max_per_task takes a fixed random subset of each task.
    a = evaluate_core(CopyModel(), CharTokenizer(), bundle, "cpu", max_per_task=2)
    b = evaluate_core(CopyModel(), CharTokenizer(), bundle, "cpu", max_per_task=2)
    assert a["examples"] == {"mc": 2, "schema": 2, "lm": 2} and a["accuracy"] == b["accuracy"]


def test_centering():
    assert centered(0.25, 0.25) == 0.0
    assert centered(1.0, 0.25) == 1.0
    assert centered(0.625, 0.25) == pytest.approx(0.5)
    assert centered(0.0, 0.5) == -1.0


def test_bundle_errors_name_the_file(tmp_path):
    with pytest.raises(BundleError, match="core.json"):
        load_bundle(str(tmp_path))
    bad = [dict(TASKS[0], task_type="essay")]
    root = write_bundle(tmp_path / "b1", bad, {"mc.jsonl": MC})
    with pytest.raises(BundleError, match="essay"):
        load_bundle(root)
    root = write_bundle(tmp_path / "b2", [dict(TASKS[0], dataset_uri="eval_data/missing.jsonl")], {})
    with pytest.raises(BundleError, match="missing.jsonl"):
        load_bundle(root)


CORE_YAML = """\
# a nanochat/DCLM-style task list
icl_tasks:
-
  label: mc
  dataset_uri: mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
-
  label: schema
  dataset_uri: sub/schema.jsonl
  num_fewshot:
  - 1
  icl_task_type: schema
  continuation_delimiter: ''
- label: lm
  dataset_uri: lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ":"   # a comment
  has_categories: true
"""
META_CSV = "Eval Task,Task Category,Random baseline\nmc,x,50\nschema,x,50.0\nlm,y,0\n"


def write_dclm_bundle(root):
    os.makedirs(os.path.join(root, "eval_data", "sub"))
    for rel, rows in (("mc.jsonl", MC), ("sub/schema.jsonl", SCHEMA), ("lm.jsonl", LM)):
        with open(os.path.join(root, "eval_data", rel), "w", encoding="utf-8") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write(META_CSV)


def test_yaml_parser_and_conversion_of_the_nanochat_bundle(tmp_path):
    raw = parse_icl_tasks_yaml(CORE_YAML)
    assert [t["label"] for t in raw] == ["mc", "schema", "lm"]
    assert raw[0]["num_fewshot"] == [2] and raw[1]["num_fewshot"] == [1]
    assert raw[1]["continuation_delimiter"] == "" and raw[2]["continuation_delimiter"] == ":"
    assert raw[2]["has_categories"] is True
    assert parse_icl_tasks_yaml('icl_tasks:\n  - label: j\n    continuation_delimiter: "\\nAnswer: "\n')[0] == {
        "label": "j", "continuation_delimiter": "\nAnswer: "}
    root = tmp_path / "eval_bundle"
    write_dclm_bundle(root)
    assert ensure_eval_bundle(str(root), download=False) == str(root)   # converts in place
    tasks = load_bundle(str(root))
    assert [(t.label, t.num_fewshot, t.random_baseline, t.dataset_uri) for t in tasks] == [
        ("mc", 2, 0.5, "eval_data/mc.jsonl"), ("schema", 1, 0.5, "eval_data/sub/schema.jsonl"),
        ("lm", 1, 0.0, "eval_data/lm.jsonl")]
    assert tasks[0].continuation_delimiter == " "   # the default
    res = evaluate_core(CopyModel(), CharTokenizer(), str(root), "cpu")
    assert res["accuracy"] == {"mc": 0.75, "schema": 0.5, "lm": 0.5}


def test_download_offline_is_one_line_and_a_local_archive_works(tmp_path):
    lines = []
    assert ensure_eval_bundle(str(tmp_path / "b"), url="http://127.0.0.1:9/eval_bundle.zip", timeout=2,
                              log=lines.append) is None
    assert len(lines) == 1 and "CORE" in lines[0] and "skipped" in lines[0]
    # A zip laid out like nanochat's (eval_bundle/core.yaml ...) is unpacked and converted.
    src = tmp_path / "src" / "eval_bundle"
    write_dclm_bundle(src)
    zpath = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for dirpath, _, files in os.walk(src):
            for name in files:
                full = os.path.join(dirpath, name)
                z.write(full, os.path.relpath(full, src.parent))
    dest = tmp_path / "base" / "eval_bundle"
    dest.parent.mkdir()
    lines.clear()
    assert ensure_eval_bundle(str(dest), url=zpath.as_uri(), log=lines.append) == str(dest)
    assert "downloaded" in lines[0] and len(load_bundle(str(dest))) == 3


def test_default_bundle_dir_follows_the_base_dir(base_dir):
    assert core_eval.default_bundle_dir() == os.path.join(str(base_dir), "eval_bundle")
