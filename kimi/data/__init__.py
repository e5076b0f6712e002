"""Data pipeline: offline GPT-2 tokenizer, corpora, text -> token shards, datasets and batch iteration.

    python -m kimi.prepare --corpus shakespeare --out data/shakespeare   # then --data.dataset=data/shakespeare

Names resolve lazily, so `python -m kimi.prepare` does not pay for importing torch.
"""

import importlib

_WHERE = {
    "BatchIterator": "dataset",
    "DataError": "dataset",
    "ShardDataset": "dataset",
    "TokenDataset": "dataset",
    "ToyDataset": "dataset",
    "build_dataset": "dataset",
    "MixtureDataset": "mixture",
    "build_data": "mixture",
    "TextDataProcessor": "pipeline",
    "prepare_corpus": "pipeline",
    "prepare_files": "pipeline",
    "get_tokenizer": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"kimi.data.{_WHERE[name]}"), name)
    raise AttributeError(name)
