"""Assistant-only masks: exact spans for the target template families, real trajectories, and loud failures."""

import random
from pathlib import Path

import numpy as np
import pytest
import trl
from helpers import (
    load_swesmith,
    multi_turn_kto_rows,
    multi_turn_pairs,
    prompt_of,
    single_turn_pairs,
    trajectory,
)

import entropo_trl.multiturn as multiturn
from entropo_trl import TemplateNotPrefixPreservingError, assistant_token_mask, tokenize_prompt_completion
from entropo_trl.testing import build_tiny_tokenizer, chat_template


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
def test_fast_renders_and_backend_encoding_match_the_public_path(family, monkeypatch):
    """The masks come out the same through each way of rendering the windows and prefixes (the compiled template on a
    conversation normalised once, transformers' `render_jinja_template`, the public `apply_chat_template`), and with a
    tokenizer saved with truncation switched on (the Rust tokenizer is then not called directly)."""
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
    # the full conversation, the prompt, two windows per turn (with and without the generation prompt), and one per
    # message from the first assistant turn on
    assert used[:3] == ["public", "broken", "broken"]
    assert used.count("public") == 1 + 1 + 2 * 4 + (len(messages) - 2)
    monkeypatch.undo()

    tokenizer.backend_tokenizer.enable_truncation(max_length=16)
    assert assistant_token_mask(tokenizer, messages) == fast


def unexpected(*args, **kwargs):
    raise AssertionError("the prefix renders were used: the windows did not rebuild the conversation")


def outcome(call):
    """`call()`'s result, or the class and message of what it raised."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - compared, not hidden
        return type(error), str(error)


def masks_both_ways(tokenizer, messages, monkeypatch, windows_used=True, **kwargs):
    """`assistant_token_mask` through the windows (checking that they were used, unless `windows_used` is False) and
    through the reference method, the renderings of every prefix."""
    with monkeypatch.context() as patch:
        if windows_used:
            patch.setattr(multiturn, "_prefix_bounds", unexpected)
        window = outcome(lambda: assistant_token_mask(tokenizer, messages, **kwargs))
    with monkeypatch.context() as patch:
        patch.setattr(multiturn, "_window_bounds", lambda *args: None)
        prefix = outcome(lambda: assistant_token_mask(tokenizer, messages, **kwargs))
    return window, prefix


def every_test_conversation():
    """Every conversation the tests build: assistant and user turns, tool observations (one or several in a row),
    no system prompt, the trainers' DPO / KTO rows, single turns."""
    conversations = [conversation(seed, turns) for seed in range(3) for turns in (1, 2, 3, 4, 7)]
    tool_turns = conversation(4, 6)
    conversations.append(
        [{**m, "role": "tool"} if i > 1 and m["role"] == "user" else m for i, m in enumerate(tool_turns)]
    )
    conversations.append(tool_turns[:5] + [{"role": "tool", "content": "tests/test_core.py ok"}] + tool_turns[5:])
    conversations.append(conversation(5, 4)[1:])
    for pair in multi_turn_pairs(n=2, turns=4) + single_turn_pairs(n=2):
        conversations += [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]
    conversations += [row["prompt"] + row["completion"] for row in multi_turn_kto_rows(n=2, turns=5)]
    return conversations


def templates():
    from trl.chat_template_utils import get_training_chat_template

    return [
        ("qwen3", None),
        ("gemma3", None),
        ("glm4moe", None),
        ("qwen3", chat_template("qwen3_instruct_2507_training")),
        ("qwen3_thinking", get_training_chat_template(build_tiny_tokenizer("qwen3_thinking"))),
    ]


@pytest.mark.parametrize("family, template", templates())
def test_windows_give_the_prefix_renders_masks(family, template, monkeypatch):
    """The windows give exactly the masks of the reference method (render every prefix), on every test conversation,
    for the target families and TRL's training templates. Gemma-3 refuses `tool` messages (roles must alternate):
    both ways raise its error."""
    from jinja2 import TemplateError

    tokenizer = build_tiny_tokenizer(family)
    for messages in every_test_conversation():
        window, prefix = masks_both_ways(tokenizer, messages, monkeypatch, chat_template=template)
        assert window == prefix
        refused = family == "gemma3" and any(m["role"] == "tool" for m in messages)
        assert window[0] is TemplateError if refused else sum(window[1]) > 0


def test_windows_give_the_prefix_renders_masks_on_real_trajectories(monkeypatch):
    """The same on the real SWE-smith trajectories (45-89 messages: most windows leave turns out)."""
    rows = load_swesmith()
    corpus = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = build_tiny_tokenizer("qwen3", corpus=corpus, vocab_size=2000)
    for row in rows:
        window, prefix = masks_both_ways(tokenizer, row["messages"], monkeypatch)
        assert window == prefix and sum(window[1]) > 0


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))
)
def test_windows_agree_with_prefix_renders_for_every_stored_template(name, monkeypatch):
    """With each chat template TRL stores (whatever its special tokens), the windows and the prefix renders give the
    same masks or raise the same error (`TemplateNotPrefixPreservingError` for templates that rewrite past turns)."""
    tokenizer = build_tiny_tokenizer("qwen3")
    template = chat_template(name)
    rng = random.Random(6)
    messages = prompt_of(rng) + trajectory(rng, 5)
    as_tools = [{**m, "role": "tool"} if i > 1 and m["role"] == "user" else m for i, m in enumerate(messages)]
    for case in (messages, as_tools):
        window, prefix = masks_both_ways(tokenizer, case, monkeypatch, windows_used=False, chat_template=template)
        assert window == prefix


def test_masking_is_linear_in_the_number_of_turns(monkeypatch):
    """The messages rendered to locate the assistant turns grow linearly with the turns (the prefix renders grow
    quadratically: 80 turns cost 16 times 20 turns)."""
    tokenizer = build_tiny_tokenizer("qwen3")
    rendered = []
    pick = multiturn._pick

    def counted(*args):
        picked = pick(*args)
        rendered.append(len(picked))
        return picked

    monkeypatch.setattr(multiturn, "_pick", counted)
    monkeypatch.setattr(multiturn, "_prefix_bounds", unexpected)
    costs = []
    for turns in (20, 80):
        rendered.clear()
        rng = random.Random(turns)
        assistant_token_mask(tokenizer, prompt_of(rng) + trajectory(rng, turns, words=4))
        costs.append(sum(rendered))
    assert costs[1] < 4.5 * costs[0]


def test_token_boundaries_match_the_offsets_of_every_token():
    """Span boundaries are mapped to tokens through the encoding's char -> token map, even where the tokenizer leaves
    characters out of every token (a whitespace-splitting word-level tokenizer): the mask is the one the start
    offsets of all tokens give."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(7)
    messages = prompt_of(rng) + trajectory(rng, 4)
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    backend.train_from_iterator([m["content"] for m in messages] + ["system user assistant"], trainer=trainer)
    words = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    words.chat_template = chat_template("qwen3_instruct_2507")
    for tokenizer in (build_tiny_tokenizer("qwen3"), words):
        ids, mask = assistant_token_mask(tokenizer, messages)
        text, spans = multiturn.assistant_char_spans(tokenizer, messages)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([start for start, _ in encoding["offset_mapping"]])
        expected = np.zeros(len(starts), dtype=int)
        for span_start, span_end in spans:
            expected[np.searchsorted(starts, span_start) : np.searchsorted(starts, span_end)] = 1
        assert ids == encoding["input_ids"] and mask == expected.tolist() and sum(mask) > 0
        out = tokenize_prompt_completion(tokenizer, messages[:2], messages[2:])
        prompt_text = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert len(out["prompt_ids"]) == np.searchsorted(starts, len(prompt_text))


def test_a_fast_renderer_that_disagrees_with_apply_chat_template_is_not_used(monkeypatch):
    """The windows take the fastest renderer unchecked, since each piece they give must match the full rendering by
    `apply_chat_template`: a renderer that disagrees with it fails that match, and the prefix renders then take the
    first renderer that reproduces the full rendering."""
    tokenizer = build_tiny_tokenizer("qwen3")
    messages = conversation(8, 4)
    expected = assistant_token_mask(tokenizer, messages)
    compiled = multiturn._compiled_renderer

    def disagreeing(*args):
        render = compiled(*args)
        return lambda *call: render(*call).replace("<|im_start|>user", "<|im_start|>human")

    jinja, used = multiturn._jinja_renderer, []
    monkeypatch.setattr(multiturn, "_compiled_renderer", disagreeing)
    monkeypatch.setattr(multiturn, "_jinja_renderer", lambda *args: used.append("jinja") or jinja(*args))
    assert assistant_token_mask(tokenizer, messages) == expected and used == ["jinja"]
