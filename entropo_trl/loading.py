"""Loading tokenizers and models by name, with one clear line when the name resolves to nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name, **kwargs)` (e.g. `AutoTokenizer`, `AutoModelForCausalLM`).

    When `name` is neither a folder nor a model the Hub (or, offline, the local Hugging Face cache) holds, this stops
    with one line naming it, the kind of thing (`what`) and what was tried, instead of transformers' chained tracebacks.
    A folder that exists but fails to load keeps its full error: that is a real problem with the folder.

    Raises:
        SystemExit: `name` could not be found.
    """
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        if Path(name).is_dir():
            raise
        from huggingface_hub import constants

        where = (
            "the local Hugging Face cache (offline: HF_HUB_OFFLINE=1)"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face Hub and the local cache"
        )
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(
            f"cannot load the {what} {name!r}: it is not a folder, and {where} has no such model ({reason})"
        ) from None
