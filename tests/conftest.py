"""Fixtures and the offline environment of the test suite; shared helpers are in `helpers.py`."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer("qwen3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Qwen3 model saved to disk (the reference / SFT model)."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_model(tokenizer).save_pretrained(path)
    return str(path)
