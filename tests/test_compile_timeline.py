"""scripts/compile_timeline.py: base_train with compile-timeline hooks (CPU, compiled tiny model)."""
import re

from tests.helpers import TINY, base_with_tokenizer, run


def test_compile_timeline_trains_and_prints_the_first_steps_compile(tmp_path_factory, tiny_tokenizer):
    base = base_with_tokenizer(tmp_path_factory, "timeline_base", tiny_tokenizer)
    flags = [a for a in TINY if a != "--no-compile"]
    out = run(["-m", "scripts.compile_timeline", *flags, "--num-iterations=2", "--eval-every=-1", "--model-tag=tl"], base)
    lines = re.findall(r"^\[timeline +([\d.]+)s\] (.*)$", out.stdout, re.M)
    events = [what for _, what in lines]
    assert "dynamo compile start" in events and "dynamo compile end" in events, out.stdout[-2000:]
    assert any(e.startswith("inductor waited") for e in events)
    first = events.index("first optimizer step: start")
    assert events[first + 1:].count("first optimizer step: end (synchronized)") == 1
    times = [float(t) for t, _ in lines]
    assert times == sorted(times)
    assert not any(e.startswith("note:") for e in events)  # every hook found its target in this torch
    assert "done: 2 steps" in out.stdout
