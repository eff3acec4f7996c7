"""scripts/generate.py: tokens printed as the engine yields them, -p/--prompt, interactive mode on
stdin, seeds and sampling flags; run in-process on a tiny checkpoint written by the test."""
import io
import os
import subprocess
import sys

import pytest
import torch

import nanochat.engine as engine_mod
from nanochat.engine import Engine, load_model, stream_text
from scripts import generate
from tests.helpers import ROOT
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    return make_tiny_checkpoint(tmp_path_factory, tiny_tokenizer, name="generate_base")


@pytest.fixture
def env(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def _main(argv, monkeypatch, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))   # not a terminal unless a test says so
    return generate.main(["--device-type=cpu", "--model-tag=tiny", *argv])


def _text(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith("#")]


def _reference(prompt, max_tokens, **kw):
    """The tokens Engine.generate_batch gives for the same model, prompt and sampling."""
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    model, _, _ = load_model("tiny", -1, torch.device("cpu"))
    bos = tok.get_bos_token_id()
    new = Engine(model, tok).generate_batch(tok.encode(prompt, prepend=bos), max_tokens, stop_tokens=(bos,), **kw)[0]
    return tok, new


@pytest.mark.parametrize("sampling, kw", [
    (["--temperature=0"], dict(temperature=0.0)),
    (["--temperature=1.0", "--top-k=20", "--top-p=0.9", "--seed=5"],
     dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)),
])
def test_prompt_completion_streams_the_same_tokens_as_a_batch(env, monkeypatch, capsys, sampling, kw):
    outs = _main(["-p", "The cat", "--max-tokens=12", *sampling], monkeypatch)
    out = capsys.readouterr().out
    tok, new = _reference("The cat", 12, **kw)
    assert outs == [new]
    assert _text(out) == ["The cat" + tok.decode(new)]
    header = out.splitlines()[0]
    assert header.startswith(f"# {env / 'base_checkpoints' / 'tiny'} step 3 (ema weights)")
    assert out.splitlines()[-1].startswith(f"# {len(new)} tokens in ") and "KV cache" in out


def test_each_piece_is_written_and_flushed_before_the_next_token_is_sampled(env, monkeypatch):
    events = []
    real_generate = engine_mod.Engine.generate

    def logged_generate(self, *a, **k):
        for col in real_generate(self, *a, **k):
            events.append(("token", int(col[0])))
            yield col

    class Out:
        def write(self, s):
            events.append(("write", s))

        def flush(self):
            events.append(("flush",))

    monkeypatch.setattr(engine_mod.Engine, "generate", logged_generate)
    monkeypatch.setattr("sys.stdout", Out())
    outs = _main(["-p", "Once upon a time", "--max-tokens=10", "--temperature=0"], monkeypatch)
    tokens = [i for i, e in enumerate(events) if e[0] == "token"]
    assert len(tokens) == len(outs[0]) == 10
    held = 0   # tokens whose text waits for the rest of a UTF-8 character (at most 3 more bytes)
    for i, j in zip(tokens, tokens[1:] + [len(events)]):
        between = events[i + 1:j]   # after a token and before the next one is sampled
        writes = [e for e in between if e[0] == "write"]
        if not writes:
            held += 1
            assert held <= 3, between
            continue
        held = 0
        assert ("flush",) in between[between.index(writes[0]):], between
    assert held == 0
    first_token = tokens[0]
    assert ("write", "Once upon a time") in events[:first_token]   # the prompt is out before sampling starts


def test_stream_text_holds_back_split_characters():
    """A token that ends inside a UTF-8 character is shown with the token that completes it."""
    class ByteTok:   # token id = one byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    class Script:
        tokenizer = ByteTok()

        def generate(self, tokens, max_tokens, num_samples, stop_tokens, **kw):
            for b in "aé€b".encode("utf-8") + b"\x00":
                yield torch.tensor([b])

    pieces = list(stream_text(Script(), [1], 20, stop_tokens=(0,)))
    assert [text for _, text in pieces] == ["a", "é", "€", "b"]
    assert [len(ids) for ids, _ in pieces] == [1, 2, 3, 1]


def test_interactive_mode_reads_lines_until_end_of_input(env, monkeypatch, capsys):
    outs = _main(["-i", "--max-tokens=5", "--temperature=0"], monkeypatch, stdin="The cat\n\nOnce upon\n")
    out = capsys.readouterr().out
    assert len(outs) == 2 and "interactive" in out.splitlines()[0]
    text = _text(out)
    assert len(text) == 2 and text[0].startswith("The cat") and text[1].startswith("Once upon")


def test_a_terminal_without_a_prompt_starts_interactive_mode(env, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Tty("Hello there\n"))
    outs = generate.main(["--device-type=cpu", "--model-tag=tiny", "--max-tokens=4", "--temperature=0"])
    out = capsys.readouterr().out
    # a fake terminal does not echo the typed line, so the completion follows the '> ' marker
    assert len(outs) == 1 and "\n> Hello there" in out


def test_without_prompt_or_terminal_the_default_prompt_is_used(env, monkeypatch, capsys):
    _main(["--max-tokens=3", "--temperature=0"], monkeypatch)
    assert _text(capsys.readouterr().out)[0].startswith(generate.DEFAULT_PROMPT)


def test_seed_decides_the_sample(env, monkeypatch, capsys):
    sample = ["-p", "The", "--max-tokens=16", "--temperature=1.5", "--top-k=-1"]
    a = _main([*sample, "--seed=1"], monkeypatch)
    b = _main([*sample, "--seed=1"], monkeypatch)
    c = _main([*sample, "--seed=2"], monkeypatch)
    assert a == b and a != c


def test_several_samples_print_one_block_each(env, monkeypatch, capsys):
    outs = _main(["-p", "The", "--max-tokens=4", "--num-samples=3", "--temperature=1.0"], monkeypatch)
    out = capsys.readouterr().out
    assert len(outs) == 3 and [line for line in out.splitlines() if line.startswith("--- sample")] == \
        ["--- sample 0", "--- sample 1", "--- sample 2"]


def test_too_long_a_prompt(env, monkeypatch, capsys):
    long = "word " * 400   # more than the rotary table (10 x 32 positions)
    with pytest.raises(SystemExit) as e:
        _main(["-p", long], monkeypatch)
    assert e.value.code == 2 and "exceeds the model's rotary table" in capsys.readouterr().err
    outs = _main(["-i", "--max-tokens=2"], monkeypatch, stdin=f"{long}\nThe cat\n")   # interactive goes on
    captured = capsys.readouterr()
    assert len(outs) == 1 and "exceeds the model's rotary table" in captured.err


def test_prompt_and_interactive_exclude_each_other(env, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _main(["-p", "x", "-i"], monkeypatch)
    assert e.value.code == 2 and "exclude each other" in capsys.readouterr().err


def test_interactive_script_in_a_real_process(base):
    """The whole path through a pipe: header, one streamed completion per line, exit 0."""
    out = subprocess.run([sys.executable, "-m", "scripts.generate", "--device-type=cpu", "--model-tag=tiny", "-i",
                          "--max-tokens=4", "--temperature=0"], cwd=ROOT, input="The cat\nA dog\n", text=True,
                         capture_output=True, timeout=300, env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert [line.split()[0] for line in _text(out.stdout)] == ["The", "A"]
