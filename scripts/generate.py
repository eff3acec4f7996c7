"""Generate text from a base-model checkpoint, printing each token as soon as it is sampled.

    python -m scripts.generate -p "The capital of France is"       # one completion, streamed
    python -m scripts.generate --model-tag=d12                     # on a terminal: interactive
    python -m scripts.generate -i < prompts.txt                    # one completion per input line
    python -m scripts.generate -p "Once upon a time" --temperature=0 --max-tokens=100   # greedy
    python -m scripts.generate -p "Hi" --num-samples=4 --temperature=1.0 --top-p=0.9 --seed=7

Each prompt is encoded after a BOS token; a completion stops at --max-tokens or when the model
emits BOS (a document boundary). Without -p, interactive mode starts when stdin is a terminal (or
with -i): one completion per line read, until end of input (Ctrl-D); otherwise the prompt is
"The capital of France is". Lines starting with '#' describe the run; everything else is the
prompt and its completion. Every prompt starts from --seed, so output is deterministic, and
--no-kv-cache (re-running the whole sequence every step, for checking) gives the same tokens. The
checkpoint's weight EMA is used when present unless --no-ema. Runs on CUDA (bf16 autocast), MPS
and CPU (fp32); the device is detected unless --device-type says.
"""
from __future__ import annotations

import sys
import time

from nanochat.checkpoint import CheckpointError, model_tag_problem
from nanochat.common import UsageError
from nanochat.tokenizer import TokenizerError
from nanochat.usage import OneLineParser, die, fail

PROG = "python -m scripts.generate"
DEFAULT_PROMPT = "The capital of France is"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model-tag", type=str, default=None,
                   help="checkpoint directory name under base_checkpoints (none: the most recently written one)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = latest complete)")
    p.add_argument("-p", "--prompt", type=str, default=None,
                   help=f"text to continue (none: interactive on a terminal or with -i, else {DEFAULT_PROMPT!r})")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="read prompts from stdin, one per line, until end of input (also without a terminal)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens to generate at most, per completion")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (-1 = disabled)")
    p.add_argument("--top-p", type=float, default=-1.0, help="nucleus sampling mass in (0, 1] (-1 = disabled)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="independent samples of each prompt (one batch; streamed only when 1)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling generator, reset for every prompt")
    p.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps; empty = autodetect")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step (slow; for checking)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has a weight EMA")
    return p


def validate_args(args) -> list[str]:
    problems = []
    if problem := model_tag_problem(args.model_tag):
        problems.append(problem)
    if args.max_tokens < 1:
        problems.append(f"--max-tokens={args.max_tokens} must be >= 1")
    if args.temperature < 0:
        problems.append(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k == 0 or args.top_k < -1:
        problems.append(f"--top-k={args.top_k} must be >= 1 or -1 (disabled)")
    if args.top_p != -1 and not 0 < args.top_p <= 1:
        problems.append(f"--top-p={args.top_p} must be in (0, 1] or -1 (disabled)")
    if args.num_samples < 1:
        problems.append(f"--num-samples={args.num_samples} must be >= 1")
    if args.step < -1:
        problems.append(f"--step={args.step} must be >= 0 or -1 (latest)")
    if args.device_type not in ("", "cuda", "cpu", "mps"):
        problems.append(f"--device-type={args.device_type!r} must be cuda, cpu, mps or empty (autodetect)")
    if args.prompt is not None and args.interactive:
        problems.append("-p/--prompt and -i/--interactive exclude each other: give one prompt or read them from stdin")
    return problems


def interactive_prompts():
    """Lines from stdin until end of input; on a terminal with a '> ' marker (and line editing)."""
    if sys.stdin.isatty():
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(flush=True)
                return
            if line.strip():
                yield line
    else:
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


class Generator:
    """Completes prompts with the loaded model and prints them, streaming a single sample."""

    def __init__(self, args, model, tokenizer, autocast_ctx):
        from nanochat.engine import Engine  # noqa: PLC0415 (torch-heavy: after the flags are checked)
        self.args, self.model, self.tokenizer, self.autocast_ctx = args, model, tokenizer, autocast_ctx
        self.engine = Engine(model, tokenizer)
        self.bos = tokenizer.get_bos_token_id()
        self.sampling = dict(temperature=args.temperature, top_k=args.top_k if args.top_k > 0 else None,
                             top_p=args.top_p if args.top_p > 0 else None, seed=args.seed,
                             use_cache=not args.no_kv_cache)

    def problem(self, tokens: list[int]) -> str | None:
        if len(tokens) + self.args.max_tokens > self.model.rotary_seq_len:
            return (f"prompt ({len(tokens)} tokens) + --max-tokens={self.args.max_tokens} exceeds the model's rotary "
                    f"table ({self.model.rotary_seq_len} positions)")
        return None

    def complete(self, prompt: str, tokens: list[int]) -> list[list[int]]:
        """Print `prompt` and its completion(s); returns the new tokens of each sample."""
        from nanochat.engine import stream_text  # noqa: PLC0415
        args, out = self.args, sys.stdout
        t0 = time.time()
        with self.autocast_ctx:
            if args.num_samples == 1:
                out.write(prompt)
                out.flush()
                new = []
                for ids, piece in stream_text(self.engine, tokens, args.max_tokens, stop_tokens=(self.bos,),
                                              **self.sampling):
                    out.write(piece)
                    out.flush()
                    new += ids
                out.write("\n")
                outs = [new]
            else:
                outs = self.engine.generate_batch(tokens, args.max_tokens, num_samples=args.num_samples,
                                                  stop_tokens=(self.bos,), **self.sampling)
                for i, new in enumerate(outs):
                    out.write(f"--- sample {i}\n{prompt}{self.tokenizer.decode(new)}\n")
        dt = time.time() - t0
        n_new = sum(len(o) for o in outs)
        out.write(f"# {n_new} tokens in {dt:.2f}s ({n_new / max(dt, 1e-9):.1f} tok/s, "
                  f"{'no ' if args.no_kv_cache else ''}KV cache)\n")
        out.flush()
        return outs


def main(argv=None):
    args = build_parser().parse_args(argv)
    problems = validate_args(args)
    if problems:
        fail(problems, PROG)
    interactive = args.interactive or (args.prompt is None and sys.stdin.isatty())
    from nanochat.engine import setup_inference  # noqa: PLC0415
    try:
        _, _, autocast_ctx, tokenizer, model, meta, weights = setup_inference(
            args.device_type, args.model_tag, args.step, use_ema=not args.no_ema)
    except UsageError as e:
        fail([str(e)], PROG)
    except (CheckpointError, TokenizerError) as e:
        die(str(e), PROG)
    gen = Generator(args, model, tokenizer, autocast_ctx)
    print(f"# {meta['model_dir']} step {meta['step']} ({weights} weights), temperature {args.temperature}, "
          f"top-k {args.top_k}, top-p {args.top_p}, seed {args.seed}"
          f"{', interactive: one completion per line, Ctrl-D ends' if interactive else ''}", flush=True)
    prompts = interactive_prompts() if interactive else [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    results = []
    try:
        for prompt in prompts:
            tokens = tokenizer.encode(prompt, prepend=gen.bos)
            if problem := gen.problem(tokens):
                if not interactive:
                    fail([problem], PROG)
                print(f"generate: error: {problem}", file=sys.stderr, flush=True)
                continue
            results.append(gen.complete(prompt, tokens))
    except KeyboardInterrupt:
        print(flush=True)
        sys.exit(130)
    return results[0] if len(results) == 1 and not interactive else results


if __name__ == "__main__":
    main()
