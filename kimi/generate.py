"""Sampling from a trained model.

    python -m kimi.generate --checkpoint out/nano/checkpoints/latest --prompt "ROMEO:" --stream
    python -m kimi.generate --checkpoint out/nano --interactive

    from kimi import Generator, load_model
    gen = Generator(load_model("out/nano"))
    print(gen.generate_text("ROMEO:", max_new_tokens=50))

With `use_cache=True` (the default) decoding uses the model's MLA latent cache: per token and layer it
stores only the compressed KV latent and the shared RoPE key, and runs the weight-absorbed decode path.
Greedy decoding gives the same tokens with and without the cache.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import torch


class PromptError(ValueError):
    pass


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, cli: bool = False
) -> None:
    """ValueError naming the first setting that would fail or be silently ignored (`cli`: flag names)."""
    name = (lambda k: "--" + k.replace("_", "-")) if cli else (lambda k: k)
    if max_new_tokens < 1:
        raise ValueError(f"{name('max_new_tokens')}={max_new_tokens} must be >= 1")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"{name('temperature')}={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"{name('top_k')}={top_k} must be >= 1, or 0 for no top-k filter")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p')}={top_p} must be in (0, 1] (1 keeps every token)")


def sample_next(
    logits_V: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id from the last position's logits. temperature 0 means greedy."""
    if temperature <= 0:
        return logits_V.argmax(-1, keepdim=True)
    logits_V = logits_V.float() / temperature
    if top_k:
        kth = torch.topk(logits_V, min(top_k, logits_V.shape[-1])).values[..., -1:]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits_V, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits_V = torch.full_like(logits_V, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits_V.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


class Generator:
    """Text in, text out, around a `KimiModel` (any device)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, tokenizer_name: str = "gpt2"):
        self.model = model.eval()
        self._tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from kimi.data.tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer(self.tokenizer_name)
            vocab = self.model.config.vocab_size
            if self._tokenizer.n_vocab > vocab:
                raise PromptError(
                    f"the model's vocabulary ({vocab}) is smaller than the {self.tokenizer_name} tokenizer's "
                    f"({self._tokenizer.n_vocab}); it was trained on token ids, use generate(ids) instead"
                )
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def stream(
        self,
        idx: list[int],
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        stop_token: int | None = None,
        vocab_limit: int | None = None,
    ) -> Iterator[int]:
        """Yields new token ids one by one; ids >= `vocab_limit` are never sampled (a model vocabulary padded past
        the tokenizer's, e.g. GPT-2's 50257 ids in 50304 rows, has rows no tokenizer can decode)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        block = self.model.config.block_size
        if not idx:
            raise PromptError("the prompt is empty; give at least one token")
        if len(idx) >= block:
            raise PromptError(f"the prompt has {len(idx)} tokens but the model's context is {block}; shorten it")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        ids = torch.tensor([idx], dtype=torch.long, device=self.device)
        total = min(len(idx) + max_new_tokens, block)
        cache = self.model.new_cache(1, total, device=self.device) if use_cache else None
        pos = 0
        for _ in range(total - len(idx)):
            if cache is not None:
                logits = self.model(ids[:, pos:], cache=cache, start_pos=pos).logits
                pos = ids.shape[1]
            else:
                logits = self.model(ids).logits
            logits_V = logits[0, -1]
            if vocab_limit is not None and vocab_limit < logits_V.shape[-1]:
                logits_V = logits_V.clone()
                logits_V[vocab_limit:] = float("-inf")
            nxt = sample_next(logits_V, temperature, top_k, top_p, gen)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            tok = int(nxt)
            yield tok
            if stop_token is not None and tok == stop_token:
                return

    def generate(self, idx: list[int], max_new_tokens: int = 50, **kw) -> list[int]:
        return list(self.stream(idx, max_new_tokens, **kw))

    def generate_text(
        self,
        prompt: str,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Continuation of `prompt` (the prompt itself not included). `on_text` receives text as it is made."""
        tok = self.tokenizer
        ids = tok.encode(prompt, allowed_special={"<|endoftext|>"})
        out: list[int] = []
        shown = ""
        stream = self.stream(
            ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache, tok.eot_token, tok.n_vocab
        )
        for t in stream:
            if t == tok.eot_token:
                break
            out.append(t)
            if on_text is not None:
                text = tok.decode(out)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    on_text(text[len(shown) :])
                    shown = text
        return tok.decode(out)


def load_generator(checkpoint: str, device: str = "auto") -> Generator:
    from kimi.checkpoint import resolve
    from kimi.loading import load_model, tokenizer_name_of

    path = resolve(checkpoint)
    model = load_model(path)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    model.to(dev)
    return Generator(model, tokenizer_name=tokenizer_name_of(path) or "gpt2")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kimi.generate", description="Sample text from a nanoKimi checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a step dir, OUT/checkpoints/latest, or a run's OUT dir")
    p.add_argument("--prompt", default="\n", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200, help=">= 1 (default: %(default)s)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help=">= 0; 0 = greedy, top-k/top-p then do nothing (default: %(default)s)",
    )
    p.add_argument(
        "--top-k", type=int, default=200, help="sample from the k likeliest tokens; 0 = no limit (default: %(default)s)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: none, a different sample each run)")
    p.add_argument("--num-samples", type=int, default=1, help=">= 1 (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line; an empty line asks again; EOF (Ctrl-D) or 'quit' ends",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto = cuda when available (default: %(default)s)"
    )
    args = p.parse_args(argv)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, cli=True)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
        gen = load_generator(args.checkpoint, args.device)
        prompts = read_prompts() if args.interactive else [args.prompt]
        for prompt in prompts:
            try:
                sample(gen, prompt, args, stream=args.stream or args.interactive)
            except PromptError as e:
                if not args.interactive:
                    raise
                print(f"error: {e}", file=sys.stderr)  # a bad prompt in a session: say so, ask for the next
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def sample(gen: Generator, prompt: str, args: argparse.Namespace, stream: bool) -> None:
    """Print `args.num_samples` continuations of `prompt` (token by token when `stream`)."""
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        kw = dict(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed, use_cache=not args.no_cache
        )
        if stream:
            sys.stdout.write(prompt)
            gen.generate_text(
                prompt, args.max_new_tokens, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()), **kw
            )
            sys.stdout.write("\n")
        else:
            print(prompt + gen.generate_text(prompt, args.max_new_tokens, **kw))
        if args.num_samples > 1:
            print("-" * 40)


QUIT_WORDS = ("quit",)  # not "exit": "Exit" is a stage direction a Shakespeare prompt may start with


def read_prompts() -> Iterator[str]:
    """Prompts typed at `prompt> `: an empty (or blank) line asks again; EOF, Ctrl-C or "quit" ends."""
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # leave the terminal on a fresh line
            return
        if line.strip().lower() in QUIT_WORDS:
            return
        if line.strip():
            yield line


if __name__ == "__main__":
    main()
