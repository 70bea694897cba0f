"""Install the megatron_patch package: loss-spike fixes ("Spike No More", WeSaR) on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron-patch",
    version="0.1.0",
    description="Loss-spike stabilization (Spike No More, WeSaR) for megatron-core GPT pre-training",
    license="Apache-2.0",  # as megatron-core
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    # Tested on Python 3.11 (megatron-core 0.16.1) and 3.12 (newest 0.19.x; NGC images ship 3.12).
    python_requires=">=3.10,<3.13",
    install_requires=[
        # Tested range: pip resolves it to 0.16.1 on Python 3.11 (0.17 onwards needs 3.12) and to
        # the newest 0.19.x on 3.12. What differs between them: megatron_patch/upstream.py.
        "megatron-core>=0.16.1,<0.20",
        # Any torch 2.x satisfies this, including the on-disk 2.13.0 CPU wheel: nothing new is pulled.
        "torch>=2.4,<3",
        "numpy",
        "sentencepiece>=0.2",
        # dist_checkpointing needs psutil but megatron-core does not declare it.
        "psutil",
    ],
    extras_require={
        "wandb": ["wandb==0.31.0"],
        "tensorboard": ["tensorboard"],
        "deepspeed": ["deepspeed==0.19.8"],
        "plot": ["matplotlib"],
        # Hugging Face export/import (tools/convert_checkpoint.py); tested with 5.24. protobuf
        # reads sentencepiece .model files for the transformers tokenizer export.
        "hf": ["transformers>=4.40", "protobuf"],
        # lm-eval runs exported models in tests/unit/test_lm_eval.py; its hf model needs accelerate.
        # Tested together with transformers 5.24 and torch 2.13.0 (CPU). protobuf reads
        # sentencepiece .model files for the transformers tokenizer export.
        # ruff: the lint lane (.ci/lanes/15-lint.sh, rules in ruff.toml).
        "dev": ["pytest", "pytest-timeout", "tensorboard", "matplotlib", "transformers>=4.40",
                "lm-eval==0.4.13", "accelerate==1.15.0", "protobuf", "ruff==0.17.6"],
    },
)
