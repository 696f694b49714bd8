"""Assistant-only masks with Qwen's real byte-level BPE tokenizer and TRL's Qwen3 chat template, on the real SWE-smith
trajectories (`../shared/fixtures/`, read in place: the tests skip when the folder is absent)."""

import pytest
from helpers import FIXTURES, load_swesmith
from test_multiturn import masks_both_ways

from entropo_trl import assistant_token_mask, tokenize_prompt_completion
from entropo_trl.testing import chat_template

QWEN_TOKENIZER = FIXTURES / "qwen-tokenizer"


@pytest.fixture(scope="module")
def qwen():
    """Qwen's tokenizer (151,669 tokens) with TRL's `qwen3_instruct_2507` chat template."""
    from transformers import AutoTokenizer

    if not (QWEN_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"Qwen's tokenizer not found at {QWEN_TOKENIZER} (../shared/fixtures is absent)")
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    tokenizer.chat_template = chat_template("qwen3_instruct_2507")
    return tokenizer


def masked_runs(mask):
    """`(start, end)` token ranges of the runs of 1s in `mask`."""
    runs, start = [], None
    for i, keep in enumerate([*mask, 0]):
        if keep and start is None:
            start = i
        elif not keep and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_real_tokenizer_masks_are_assistant_contents_plus_im_end(qwen):
    """Decoded, the masked spans are exactly each assistant turn's content followed by `<|im_end|>`; the ids are
    those of plain `apply_chat_template`, and the trajectories have their real sizes (17k-55k tokens).

    One exception, which the real BPE shows: a turn whose content starts with newlines (4 of the 103 turns: an empty
    thought before the call) has them merged with the header's newline into one token (`ĊĊĊ`). That token starts in
    the header, so it stays untrained (the header is never trained: docs/design.md, "Which tokens count") and the span starts after it."""
    merged = 0
    for row in load_swesmith():
        messages = row["messages"]
        ids, mask = assistant_token_mask(qwen, messages)
        assert ids == qwen.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = masked_runs(mask)
        assert len(runs) == len(contents)
        for content, (start, end) in zip(contents, runs):
            body = content.lstrip("\n")
            assert qwen.decode(ids[start:end]) == body + "<|im_end|>"
            if body != content:
                assert qwen.decode(ids[start - 1 : start]) == "\n" + content[: len(content) - len(body)]
                merged += 1
            else:
                assert qwen.decode(ids[start - 2 : start]) == "assistant\n"  # the header, untrained
        assert 15_000 < len(ids) < 60_000 and 0 < sum(mask) < 0.5 * len(ids)
    assert merged == 4


def test_real_tokenizer_windows_give_the_prefix_renders_masks(qwen, monkeypatch):
    """The linear-time windows and the reference prefix renders give the same masks with the real tokenizer."""
    for row in load_swesmith():
        window, prefix = masks_both_ways(qwen, row["messages"], monkeypatch)
        assert window == prefix


def test_real_tokenizer_prompt_completion_split(qwen):
    """The prompt (`[system, issue]`) ends where the generation prompt ends: its ids decode to the rendered prompt,
    and prompt + completion are the ids and mask of the whole trajectory."""
    for row in load_swesmith():
        messages = row["messages"]
        out = tokenize_prompt_completion(qwen, messages[:2], messages[2:])
        prompt_text = qwen.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert qwen.decode(out["prompt_ids"]) == prompt_text
        ids, mask = assistant_token_mask(qwen, messages)
        assert out["prompt_ids"] + out["completion_ids"] == ids
        assert out["completion_mask"] == mask[len(out["prompt_ids"]) :]
