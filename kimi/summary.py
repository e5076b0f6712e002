"""Print a model's size and cost without allocating it:

    python -m kimi.summary --config configs/nano.yaml [--section.key=value ...]

The model is built on the meta device, so even medium is instant. Numbers carry thousands separators,
as in the dry run's (`int(n.replace(",", ""))` reads them back). Lines (parsed by tests and scripts):
    non-embedding params: N      everything except embed_tokens and lm_head (all experts included)
    total params: N
    active params: N             per token (routed experts count top_k of num_experts)
    active non-embedding params: N
    KV-cache bytes per token: N  bf16, summed over layers, per sequence
    training FLOPs per token: N  6 * active matmul params + attention, at block_size
"""

from __future__ import annotations

import argparse
import sys

import torch

from kimi.config import ConfigError, KimiConfig, load_config


def build_meta(cfg: KimiConfig):
    from kimi.model import KimiModel

    with torch.device("meta"):
        return KimiModel(cfg)


def summary_lines(cfg: KimiConfig) -> list[str]:
    m = build_meta(cfg)
    a, moe = cfg.attention, cfg.moe
    n_moe = len(m.moe_layers())
    ffn = (
        f"{n_moe} MoE layers: {moe.num_experts} experts x {moe.expert_hidden} (top-{moe.top_k}), "
        f"{moe.n_shared_experts} shared; {cfg.n_layer - n_moe} dense x {cfg.intermediate_size}"
    )
    attn = f"MLA (kv_lora {a.kv_lora_rank}, q_lora {a.q_lora_rank})" if a.type == "mla" else "MHA"
    return [
        f"model: {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, {attn}; {ffn}",
        f"vocab: {cfg.vocab_size}, block_size: {cfg.block_size}",
        f"non-embedding params: {m.num_params(non_embedding=True):,}",
        f"total params: {m.num_params():,}",
        f"active params: {m.num_active_params():,}",
        f"active non-embedding params: {m.num_active_params(non_embedding=True):,}",
        f"KV-cache bytes per token: {m.kv_cache_bytes_per_token(torch.bfloat16):,}",
        f"training FLOPs per token: {m.flops_per_token(cfg.block_size):,}",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m kimi.summary",
        description=__doc__.split("\n")[0],
        epilog="Any --section.key=value after the options overrides the config, as for kimi.train.",
    )
    p.add_argument("--config", help="YAML file (configs/*.yaml); default: the defaults of kimi/config.py")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(cfg.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
