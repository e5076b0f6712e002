"""Single-device nanoKimi model: MLA (or MHA) attention, MoE (or dense) FFN, latent KV cache.

Imports nothing from kimi.parallel / kimi.train / kimi.tracking / kimi.data: parallelism is applied
from outside (see kimi/model/moe.py's `dispatcher` seam).
"""

from kimi.model.attention import MHA, MLA
from kimi.model.cache import KVCache
from kimi.model.layers import MLP, RMSNorm
from kimi.model.loss import LMHead, linear_cross_entropy
from kimi.model.moe import GroupedExperts, LocalDispatcher, MoE
from kimi.model.router import Router
from kimi.model.transformer import Block, KimiModel, ModelOutput

__all__ = [
    "MHA",
    "MLA",
    "MLP",
    "Block",
    "GroupedExperts",
    "KVCache",
    "KimiModel",
    "LMHead",
    "LocalDispatcher",
    "ModelOutput",
    "MoE",
    "RMSNorm",
    "Router",
    "linear_cross_entropy",
]
