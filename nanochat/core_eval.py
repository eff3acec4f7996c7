"""CORE: the DCLM in-context-learning ensemble that nanochat reports for base models.

Each task is scored by accuracy, centred against chance, and CORE is the mean over tasks:

    centered = (accuracy - random_baseline) / (1 - random_baseline),   CORE = mean(centered)

Task types (how one example is judged):

* ``multiple_choice`` {query, choices, gold}: one prompt per choice, ``query + delim + choice``;
  the prompts share a token prefix and the continuation is the rest. The choice with the lowest
  mean per-token loss on its continuation is the prediction.
* ``schema`` {context_options, continuation, gold}: one prompt per context,
  ``context + delim + continuation``; the continuation is the common token *suffix*. The context
  whose continuation has the lowest mean loss is the prediction.
* ``language_modeling`` {context, continuation}: correct when greedy (argmax) decoding of the
  prompt ``context.strip() + delim`` reproduces every continuation token.

Few-shot: ``num_fewshot`` other examples of the same (shuffled, truncated) task, drawn with
``random.Random(1234 + index)``, rendered like the example itself with the gold answer filled
in and each followed by a blank line. Every prompt starts with BOS and is cut from the left to the
model's context length. Data are shuffled with ``random.Random(1337)`` before ``max_per_task``
examples are taken, so a truncated evaluation is a fixed random subset.

Bundle format (this module's own; PyYAML is not a dependency). A directory holding ``core.json``::

    {"format": "nanochat-core-v1",
     "tasks": [{"label": "hellaswag_zeroshot",            # unique name, reported as is
                "task_type": "multiple_choice",           # multiple_choice | schema | language_modeling
                "dataset_uri": "eval_data/language_understanding/hellaswag.jsonl",  # relative to the dir
                "num_fewshot": 0,
                "continuation_delimiter": " ",            # optional, default " "
                "random_baseline": 0.25}]}                # chance accuracy as a fraction in [0, 1)

and the JSONL files it names (one example per line, fields as listed above). nanochat's published
bundle (``core.yaml`` + ``eval_meta_data.csv`` with baselines in percent + ``eval_data/``) is
converted to this format once, when it is downloaded or found unpacked in the bundle directory,
by a small parser for its simple YAML (a list of flat mappings under ``icl_tasks``).
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_FORMAT = "nanochat-core-v1"
CORE_JSON = "core.json"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


class BundleError(Exception):
    """The eval bundle is missing or malformed (the message names the file)."""


@dataclass
class CoreTask:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    random_baseline: float = 0.0


# -----------------------------------------------------------------------------
# Bundle: location, loading, download and conversion


def default_bundle_dir() -> str:
    from nanochat.common import get_base_dir  # noqa: PLC0415
    return os.path.join(get_base_dir(), "eval_bundle")


def load_bundle(bundle_dir: str) -> list[CoreTask]:
    """Read and check `bundle_dir/core.json` (every dataset file must exist)."""
    path = os.path.join(bundle_dir, CORE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT or not isinstance(payload.get("tasks"), list):
        raise BundleError(f"{path}: expected {{\"format\": \"{BUNDLE_FORMAT}\", \"tasks\": [...]}}")
    tasks, labels = [], set()
    for i, t in enumerate(payload["tasks"]):
        try:
            task = CoreTask(label=str(t["label"]), task_type=t["task_type"], dataset_uri=t["dataset_uri"],
                            num_fewshot=int(t.get("num_fewshot", 0)),
                            continuation_delimiter=t.get("continuation_delimiter", " "),
                            random_baseline=float(t.get("random_baseline", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: tasks[{i}] is malformed ({type(e).__name__}: {e})") from None
        if task.task_type not in TASK_TYPES:
            raise BundleError(f"{path}: tasks[{i}] ({task.label}) has task_type {task.task_type!r}, "
                              f"expected one of {', '.join(TASK_TYPES)}")
        if not 0.0 <= task.random_baseline < 1.0:
            raise BundleError(f"{path}: tasks[{i}] ({task.label}) random_baseline {task.random_baseline} "
                              f"must be a fraction in [0, 1)")
        if task.label in labels:
            raise BundleError(f"{path}: duplicate task label {task.label!r}")
        if not os.path.isfile(os.path.join(bundle_dir, task.dataset_uri)):
            raise BundleError(f"{path}: tasks[{i}] ({task.label}) dataset {os.path.join(bundle_dir, task.dataset_uri)} not found")
        labels.add(task.label)
        tasks.append(task)
    return tasks


def load_task_data(bundle_dir: str, task: CoreTask) -> list[dict]:
    path = os.path.join(bundle_dir, task.dataset_uri)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise BundleError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _yaml_scalar(text: str):
    text = text.strip()
    if text.startswith('"'):
        # YAML double-quoted escapes (\n, \t, \", \\) are JSON's; anything after it is a comment
        return json.JSONDecoder().raw_decode(text)[0]
    if text.startswith("'"):
        end = 1
        while True:
            end = text.find("'", end)
            if end < 0:
                raise BundleError(f"core.yaml: unterminated quote in {text!r}")
            if text[end + 1:end + 2] == "'":  # '' is an escaped quote
                end += 2
                continue
            return text[1:end].replace("''", "'")
    if text.startswith("["):
        inner = text.strip()[1:-1].strip()
        return [_yaml_scalar(x) for x in inner.split(",")] if inner else []
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", ""):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_icl_tasks_yaml(text: str) -> list[dict]:
    """The `icl_tasks:` list of a DCLM/nanochat `core.yaml`: flat mappings with scalar values,
    flow lists (`[0]`) or block lists. Not a general YAML parser."""
    lines = [ln.rstrip("\n") for ln in text.splitlines()]
    tasks: list[dict] = []
    in_tasks, item_indent, key_for_list = False, None, None
    for raw in lines:
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        body = raw.strip()
        if not in_tasks:
            if indent == 0 and body.split(":", 1)[0].strip() == "icl_tasks":
                in_tasks = True
            continue
        if indent == 0 and not body.startswith("-"):
            break  # the next top-level key
        if body.startswith("-") and (item_indent is None or indent == item_indent):
            item_indent = indent if item_indent is None else item_indent
            tasks.append({})
            body = body[1:].strip()
            key_for_list = None
            if not body:
                continue
        elif body.startswith("-") and key_for_list is not None:
            tasks[-1][key_for_list].append(_yaml_scalar(body[1:]))
            continue
        if not tasks or ":" not in body:
            raise BundleError(f"core.yaml: cannot parse line {raw!r}")
        key, value = body.split(":", 1)
        key = key.strip()
        if value.strip():
            tasks[-1][key] = _yaml_scalar(value)
            key_for_list = None
        else:
            tasks[-1][key] = []
            key_for_list = key
    return tasks


def convert_dclm_bundle(bundle_dir: str) -> str:
    """Write `core.json` from nanochat's `core.yaml` + `eval_meta_data.csv` in `bundle_dir`."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    with open(yaml_path, encoding="utf-8") as f:
        raw_tasks = parse_icl_tasks_yaml(f.read())
    baselines = {}
    with open(csv_path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0  # percent there
    tasks = []
    for t in raw_tasks:
        label = t.get("label")
        if label not in baselines:
            raise BundleError(f"{csv_path}: no 'Random baseline' row for task {label!r}")
        shots = t.get("num_fewshot", 0)
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append({"label": label, "task_type": t["icl_task_type"],
                      "dataset_uri": os.path.join("eval_data", t["dataset_uri"]).replace(os.sep, "/"),
                      "num_fewshot": int(shots), "continuation_delimiter": t.get("continuation_delimiter", " "),
                      "random_baseline": baselines[label]})
    out = os.path.join(bundle_dir, CORE_JSON)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"format": BUNDLE_FORMAT, "source": "converted from core.yaml + eval_meta_data.csv",
                   "tasks": tasks}, f, indent=1)
    os.replace(out + ".tmp", out)
    return out


def ensure_eval_bundle(bundle_dir: str | None = None, download: bool = True, url: str = EVAL_BUNDLE_URL,
                       timeout: float = 30.0, log=print) -> str | None:
    """The bundle directory if usable (converting or downloading as needed), else None after one
    line on `log` saying why and what to do. Never raises for a missing network."""
    bundle_dir = bundle_dir or default_bundle_dir()
    if os.path.isfile(os.path.join(bundle_dir, CORE_JSON)):
        return bundle_dir
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        convert_dclm_bundle(bundle_dir)
        return bundle_dir
    if not download:
        log(f"CORE: no eval bundle at {bundle_dir} ({CORE_JSON}, or nanochat's core.yaml bundle); CORE is skipped")
        return None
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(bundle_dir) or ".") as tmp:
            zpath = os.path.join(tmp, "eval_bundle.zip")
            with urllib.request.urlopen(url, timeout=timeout) as r, open(zpath, "wb") as f:
                shutil.copyfileobj(r, f)
            with zipfile.ZipFile(zpath) as z:
                z.extractall(os.path.join(tmp, "x"))
            found = [root for root, _, files in os.walk(os.path.join(tmp, "x")) if "core.yaml" in files]
            if not found:
                raise BundleError(f"{url}: archive has no core.yaml")
            convert_dclm_bundle(found[0])
            if os.path.exists(bundle_dir):
                shutil.rmtree(bundle_dir)
            shutil.move(found[0], bundle_dir)
    except Exception as e:  # noqa: BLE001 (offline, DNS, HTTP, bad archive: one line, no crash)
        log(f"CORE: eval bundle not found at {bundle_dir} and the download from {url} failed "
            f"({type(e).__name__}: {str(e)[:120]}); CORE is skipped. Unpack the bundle there "
            f"(nanochat's core.yaml layout or core.json, see nanochat/core_eval.py)")
        return None
    log(f"CORE: downloaded the eval bundle to {bundle_dir} in {time.time() - t0:.0f}s")
    return bundle_dir


# -----------------------------------------------------------------------------
# Prompts


def _shot_mc(ex: dict, delim: str) -> str:
    return f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n"


def _shot_schema(ex: dict, delim: str) -> str:
    return f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n"


def _shot_lm(ex: dict, delim: str) -> str:
    return f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n"


def render_prompts(item: dict, task_type: str, delim: str, fewshot: list[dict] = ()) -> list[str]:
    """The prompt strings of one example: one per choice (multiple_choice), one per context
    (schema), or [without continuation, with continuation] (language_modeling)."""
    if task_type == "multiple_choice":
        prefix = "".join(_shot_mc(ex, delim) for ex in fewshot)
        return [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]
    if task_type == "schema":
        prefix = "".join(_shot_schema(ex, delim) for ex in fewshot)
        return [f"{prefix}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(_shot_lm(ex, delim) for ex in fewshot)
        without = f"{prefix}{item['context'].strip()}{delim}"
        # Trailing whitespace would merge into the continuation's first token: strip it.
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


def fewshot_examples(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    """`num_fewshot` examples other than data[idx], fixed per index."""
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    rng = random.Random(1234 + idx)
    return [data[i] for i in rng.sample(others, min(num_fewshot, len(others)))]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs[1:]):
            return i - 1
    return n


def continuation_spans(token_lists: list[list[int]], task_type: str) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Rows to run and, per row, the [start, end) token span whose predictions are scored
    (position t is predicted from positions < t; start >= 1 always, since BOS leads)."""
    if task_type == "multiple_choice":
        start = min(_common_prefix(token_lists), min(len(t) for t in token_lists) - 1)
        start = max(start, 1)
        return token_lists, [(start, len(t)) for t in token_lists]
    if task_type == "schema":
        n = max(1, min(_common_suffix(token_lists), min(len(t) for t in token_lists) - 1))
        return token_lists, [(len(t) - n, len(t)) for t in token_lists]
    if task_type == "language_modeling":
        without, with_ = token_lists
        start = len(without) if with_[:len(without)] == without else _common_prefix([without, with_])
        start = max(1, min(start, len(with_) - 1))
        return [with_], [(start, len(with_))]
    raise ValueError(f"unknown task type {task_type!r}")


def _crop(rows: list[list[int]], spans: list[tuple[int, int]], max_len: int | None):
    """Keep the last `max_len` tokens of each row (the scored end is what matters)."""
    if not max_len:
        return rows, spans
    out_rows, out_spans = [], []
    for r, (s, e) in zip(rows, spans):
        cut = max(0, len(r) - max_len)
        out_rows.append(r[cut:])
        out_spans.append((max(1, s - cut), e - cut))
    return out_rows, out_spans


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_example(model, tokenizer, item: dict, task: CoreTask, fewshot: list[dict], device,
                  max_seq_len: int | None = None, autocast_ctx=None) -> bool:
    """Whether the model gets one example right (see the module docstring for the rules)."""
    bos = tokenizer.get_bos_token_id()
    prompts = render_prompts(item, task.task_type, task.continuation_delimiter, fewshot)
    token_lists = [tokenizer.encode(p, prepend=bos) for p in prompts]  # a few short strings: no thread pool
    rows, spans = continuation_spans(token_lists, task.task_type)
    rows, spans = _crop(rows, spans, max_seq_len)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), bos, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    if autocast_ctx is not None:
        with autocast_ctx:
            logits = model(ids)
    else:
        logits = model(ids)
    logits = logits[:, :-1].float()          # position t-1 predicts token t
    targets = ids[:, 1:]
    scored = torch.zeros(targets.shape, dtype=torch.bool)
    for i, (s, e) in enumerate(spans):
        scored[i, s - 1:e - 1] = True
    scored = scored.to(device)
    if task.task_type == "language_modeling":
        hit = (logits.argmax(dim=-1) == targets) | ~scored
        return bool(hit.all().item())   # the one host sync of the example
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")   # (rows, T-1)
    mean_nll = (nll * scored).sum(dim=1) / scored.sum(dim=1)
    return int(mean_nll.argmin().item()) == int(item["gold"])


def evaluate_task(model, tokenizer, data: list[dict], task: CoreTask, device, max_seq_len: int | None = None,
                  autocast_ctx=None) -> float:
    """Accuracy on `data`. Under torchrun each rank scores every world_size-th example and the
    counts are summed, so every rank returns the same number."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for idx in range(rank, len(data), world):
        ok = score_example(model, tokenizer, data[idx], task, fewshot_examples(data, idx, task.num_fewshot),
                           device, max_seq_len, autocast_ctx)
        correct[0] += float(ok)
        correct[1] += 1
    if ddp:
        dist.all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def centered(accuracy: float, random_baseline: float) -> float:
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_core(model, tokenizer, bundle_dir: str, device, max_per_task: int = -1,
                  max_seq_len: int | None = None, autocast_ctx=None, log=None) -> dict:
    """Every task of the bundle -> {"core", "accuracy": {label}, "centered": {label},
    "examples": {label}, "seconds"}. `max_per_task` -1 = all examples."""
    tasks = load_bundle(bundle_dir)
    t0 = time.time()
    acc, cen, n = {}, {}, {}
    for task in tasks:
        data = load_task_data(bundle_dir, task)
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        t_task = time.time()
        acc[task.label] = evaluate_task(model, tokenizer, data, task, device, max_seq_len, autocast_ctx)
        cen[task.label] = centered(acc[task.label], task.random_baseline)
        n[task.label] = len(data)
        if log:
            log(f"CORE {task.label:<32} acc {acc[task.label]:.4f} centered {cen[task.label]:+.4f} "
                f"({len(data)} ex, {time.time() - t_task:.1f}s)")
    core = sum(cen.values()) / len(cen) if cen else float("nan")
    return {"core": core, "accuracy": acc, "centered": cen, "examples": n, "seconds": time.time() - t0}
