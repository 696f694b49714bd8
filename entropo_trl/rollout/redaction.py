"""Redaction of secrets: the values of the API-key variables the runner knows (`SECRET_VARIABLES`, other `*_API_KEY` /
`*_TOKEN` / `*_SECRET` / `*_PASSWORD` variables, and the client's own key) are replaced in what the model is shown and
in what is written, as a second line of defence behind the sandbox's cleared environment."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

SECRET_VARIABLES = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_API_KEY",
    "GEMINI_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "MISTRAL_API_KEY",
    "TOGETHER_API_KEY",
    "OPENROUTER_API_KEY",
    "VLLM_API_KEY",
)
"""Environment variables whose values the runner redacts from observations and records (besides these, any variable
named like `*_API_KEY`, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`)."""

_SECRET_NAME = re.compile(r"(?:^|_)(?:API_KEY|TOKEN|SECRET|SECRET_KEY|PASSWORD|ACCESS_KEY)$")
_MIN_SECRET_CHARS = 8  # shorter values ("1", "true") are not keys, and redacting them would garble observations


def known_secrets(*extra: str | None) -> list[tuple[str, str]]:
    """(name, value) of the secrets to redact: the environment's `SECRET_VARIABLES` and other variables named like
    keys, plus `extra` values (the client's API key), longest value first; values under 8 characters are left out."""
    found = {
        value: name
        for name, value in os.environ.items()
        if (name in SECRET_VARIABLES or _SECRET_NAME.search(name)) and len(value) >= _MIN_SECRET_CHARS
    }
    for value in extra:
        if value and len(value) >= _MIN_SECRET_CHARS:
            found.setdefault(value, "API key")
    return sorted(((name, value) for value, name in found.items()), key=lambda item: -len(item[1]))


def redact(value: Any, secrets: Sequence[tuple[str, str]]) -> Any:
    """`value` with every secret's value replaced by `[redacted NAME]`, in strings, lists and dict values."""
    if not secrets:
        return value
    if isinstance(value, str):
        for name, secret in secrets:
            if secret in value:
                value = value.replace(secret, f"[redacted {name}]")
        return value
    if isinstance(value, list):
        return [redact(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: redact(item, secrets) for key, item in value.items()}
    return value
