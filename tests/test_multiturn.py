"""Assistant-only masks: exact spans for the target template families, real trajectories, and loud failures."""

import random

import pytest
from conftest import load_swesmith, prompt_of, trajectory

from entropo_trl import TemplateNotPrefixPreservingError, assistant_token_mask, tokenize_prompt_completion
from entropo_trl.testing import build_tiny_tokenizer


def masked_spans(tokenizer, ids, mask):
    spans, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def conversation(seed=0, turns=3):
    rng = random.Random(seed)
    return prompt_of(rng) + trajectory(rng, turns)


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_qwen3_chatml_spans_are_content_plus_im_end():
    tokenizer = build_tiny_tokenizer("qwen3")
    messages = conversation()
    ids, mask = assistant_token_mask(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert masked_spans(tokenizer, ids, mask) == [c + "<|im_end|>" for c in assistant_contents(messages)]
    # the header is never trained
    header = tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]
    assert all(not m for t, m in zip(ids, mask) if t == header)


def test_gemma3_spans_are_content_plus_end_of_turn():
    tokenizer = build_tiny_tokenizer("gemma3")
    messages = conversation(1)
    ids, mask = assistant_token_mask(tokenizer, messages)
    # Gemma-3 trims message content when rendering
    assert masked_spans(tokenizer, ids, mask) == [c.strip() + "<end_of_turn>" for c in assistant_contents(messages)]


def test_glm45_spans_end_with_the_next_role_token():
    tokenizer = build_tiny_tokenizer("glm4moe")
    messages = conversation(2)
    ids, mask = assistant_token_mask(tokenizer, messages)
    contents = assistant_contents(messages)
    expected = ["\n<think></think>\n" + c.strip() + "<|user|>" for c in contents[:-1]]
    expected.append("\n<think></think>\n" + contents[-1].strip())  # GLM renders nothing after the final turn
    assert masked_spans(tokenizer, ids, mask) == expected


def test_tool_role_observations_are_masked():
    tokenizer = build_tiny_tokenizer("qwen3")
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": "run ls"},
        {"role": "tool", "content": "setup.py"},
        {"role": "assistant", "content": "done"},
    ]
    ids, mask = assistant_token_mask(tokenizer, messages)
    assert masked_spans(tokenizer, ids, mask) == ["run ls<|im_end|>", "done<|im_end|>"]


def test_template_dropping_past_think_blocks_raises_naming_it():
    tokenizer = build_tiny_tokenizer("qwen3_thinking")  # Qwen3's original template: only the last turn gets <think>
    with pytest.raises(TemplateNotPrefixPreservingError, match="qwen3"):
        assistant_token_mask(tokenizer, conversation())


def test_prefix_preserving_training_template_fixes_it():
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = build_tiny_tokenizer("qwen3_thinking")
    template = get_training_chat_template(tokenizer)
    messages = conversation()
    ids, mask = assistant_token_mask(tokenizer, messages, chat_template=template)
    spans = masked_spans(tokenizer, ids, mask)
    assert len(spans) == 3 and all(s.endswith("<|im_end|>") for s in spans)


def test_tokenize_prompt_completion_splits_at_the_generation_prompt():
    tokenizer = build_tiny_tokenizer("qwen3")
    messages = conversation()
    out = tokenize_prompt_completion(tokenizer, messages[:2], messages[2:])
    prompt_text = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(out["prompt_ids"]) == prompt_text
    assert len(out["completion_ids"]) == len(out["completion_mask"])
    full_ids, full_mask = assistant_token_mask(tokenizer, messages)
    assert out["prompt_ids"] + out["completion_ids"] == full_ids
    assert out["completion_mask"] == full_mask[len(out["prompt_ids"]) :]


@pytest.mark.parametrize(
    "completion, message",
    [
        ([], "empty"),
        ([{"role": "user", "content": "hello"}], "must start with an assistant turn"),
    ],
)
def test_malformed_completions_raise(completion, message):
    tokenizer = build_tiny_tokenizer("qwen3")
    with pytest.raises(ValueError, match=message):
        tokenize_prompt_completion(tokenizer, [{"role": "user", "content": "x"}], completion)


def test_real_swesmith_trajectories():
    """Real SWE-smith trajectories: masked spans are exactly the assistant contents plus <|im_end|>."""
    rows = load_swesmith()
    corpus = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = build_tiny_tokenizer("qwen3", corpus=corpus, vocab_size=2000)
    for row in rows:
        messages = row["messages"]
        ids, mask = assistant_token_mask(tokenizer, messages)
        contents = assistant_contents(messages)
        assert masked_spans(tokenizer, ids, mask) == [c + "<|im_end|>" for c in contents]
        # observations dominate real trajectories; none of their tokens is trained
        assert 0 < sum(mask) < 0.5 * len(ids)
        assert contents[-1].rstrip().endswith("</function>") and "submit" in contents[-1]


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "glm4moe"])
def test_fast_prefix_renders_and_backend_encoding_match_the_public_path(family, monkeypatch):
    """The masks come out the same through each way of rendering prefixes (the compiled template on a conversation
    normalised once, transformers' `render_jinja_template`, the public `apply_chat_template`), and with a tokenizer
    saved with truncation switched on (the Rust tokenizer is then not called directly)."""
    import entropo_trl.multiturn as multiturn

    tokenizer = build_tiny_tokenizer(family)
    rng = random.Random(3)
    messages = prompt_of(rng) + trajectory(rng, turns=4, words=30)
    fast = assistant_token_mask(tokenizer, messages)
    plain = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert fast[0] == list(plain) and sum(fast[1]) > 0

    used = []

    def spy(name, make):
        def wrapped(*args, **kwargs):
            used.append(name)
            return make(*args, **kwargs)

        return wrapped

    def broken(*args, **kwargs):
        used.append("broken")
        raise RuntimeError("simulated change in transformers' internals")

    monkeypatch.setattr(multiturn, "_compiled_renderer", spy("compiled", multiturn._compiled_renderer))
    assert assistant_token_mask(tokenizer, messages) == fast and used == ["compiled"]
    used.clear()
    monkeypatch.setattr(multiturn, "_compiled_renderer", broken)
    monkeypatch.setattr(multiturn, "_jinja_renderer", spy("jinja", multiturn._jinja_renderer))
    assert assistant_token_mask(tokenizer, messages) == fast and used == ["broken", "jinja"]
    used.clear()
    monkeypatch.setattr(multiturn, "_jinja_renderer", broken)
    monkeypatch.setattr(multiturn, "_render", spy("public", multiturn._render))
    assert assistant_token_mask(tokenizer, messages) == fast
    assert used[:3] == ["public", "broken", "broken"] and used.count("public") == 1 + 2 * 4  # full + 2 per turn
    monkeypatch.undo()

    tokenizer.backend_tokenizer.enable_truncation(max_length=16)
    assert assistant_token_mask(tokenizer, messages) == fast
