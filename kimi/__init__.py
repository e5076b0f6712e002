"""nanoKimi: train small Kimi-K2-style MoE language models."""

from kimi.config import Config, KimiConfig, load_config

__all__ = ["Config", "KimiConfig", "KimiModel", "Generator", "load_config", "load_model"]


def __getattr__(name):  # lazy, so `import kimi` stays light for tools that only need the config
    if name == "KimiModel":
        from kimi.model import KimiModel

        return KimiModel
    if name == "Generator":
        from kimi.generate import Generator

        return Generator
    if name == "load_model":
        from kimi.loading import load_model

        return load_model
    raise AttributeError(name)
