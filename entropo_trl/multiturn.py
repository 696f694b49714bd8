"""Which tokens count (docs/design.md): assistant-only masks for multi-turn trajectories, for any chat template.

A trajectory is `[system, user(issue), assistant, user(observation), assistant, ..., assistant(finish)]`. Only the
assistant turns are the policy's actions, so only their tokens enter `logp`, `ref`, the SFT loss and the KL samples.
The assistant header (`<|im_start|>assistant\\n`) is masked; the content and the template's end-of-turn token
(`<|im_end|>`) are trained, so the model learns to stop.

The spans come from the tokenizer's own chat template. By definition (the reference method, [`_prefix_bounds`]) the
assistant turn `i` starts where `messages[:i]` rendered with the generation prompt ends and stops where
`messages[:i + 1]` ends. That is only right when the template renders every prefix exactly as it appears in the full
conversation; templates that drop past `<think>` blocks or special-case the last turn do not, and then
[`assistant_token_mask`] raises [`TemplateNotPrefixPreservingError`] instead of returning a wrong mask.

Rendering every prefix costs time quadratic in the number of turns (at 100-200 agent steps it costs more than the
tokenisation itself), so the boundaries are first computed from short windows ([`_window_bounds`]): each assistant
turn and the observations after it are rendered behind the prompt and the previous turn only, and the window's
renderings are used only if the pieces they add, laid end to end, rebuild the full conversation character for
character. Anything else (a window the template renders differently, or refuses) falls back to the prefix renders.
"""

import functools
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase


class TemplateNotPrefixPreservingError(ValueError):
    """The chat template renders a prefix of the conversation differently from the full conversation."""


@functools.cache
def _known_templates() -> dict[str, str]:
    """TRL's stored chat templates (original and training variants), by name, to name a user's template in errors."""
    try:
        import trl

        folder = Path(trl.__file__).parent / "chat_templates"
        return {path.read_text(encoding="utf-8"): path.stem for path in sorted(folder.glob("*.jinja"))}
    except Exception:  # pragma: no cover - naming is best effort
        return {}


def chat_template_name(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str:
    """A human-readable name for the chat template in use (TRL's file name when it is a known template)."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    name = _known_templates().get(template) if isinstance(template, str) else None
    source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name is not None:
        return f"'{name}' (TRL's chat_templates/{name}.jinja, tokenizer {source})"
    return f"the chat template of tokenizer {source!r}"


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Added tokens (special or control tokens such as `<|im_end|>`, `<end_of_turn>`, `<|user|>`), longest first."""
    strings = set(tokenizer.get_added_vocab().keys()) | set(tokenizer.all_special_tokens)
    return sorted((s for s in strings if s.strip()), key=len, reverse=True)


def _render(tokenizer, messages, tools, add_generation_prompt, chat_template, template_kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        **template_kwargs,
    )


def _renderer(tokenizer, messages, tools, chat_template, template_kwargs, full: str | None = None):
    """`render(stop, add_generation_prompt, skip=None)` -> the rendering of `messages[:stop]`, leaving out
    `messages[skip[0]:skip[1]]` when `skip` is given.

    The renders are most of the masking cost on long trajectories, and `apply_chat_template` spends much of each call
    normalising and copying the whole conversation again. So the conversation is normalised once, the way
    transformers' `render_jinja_template` (what `apply_chat_template` calls) does it, and its compiled template is
    called directly on slices of it; failing that, `render_jinja_template` is called on messages normalised once;
    failing that, every render goes through `apply_chat_template`. Given `full` (the rendering by
    `apply_chat_template`), a faster way is only used when it reproduces it exactly; the windows need no such check,
    since every piece they give is checked against the full rendering."""

    def slow(stop: int, add_generation_prompt: bool, skip: tuple[int, int] | None = None) -> str:
        picked = _pick(messages, stop, skip)
        return _render(tokenizer, picked, tools, add_generation_prompt, chat_template, template_kwargs)

    normalized = [{k: v for k, v in message.items() if v is not None} for message in messages]
    for make in (_compiled_renderer, _jinja_renderer):
        try:
            render = make(tokenizer, normalized, tools, chat_template, template_kwargs)
            if full is None or render(len(messages), False) == full:
                return render
        except Exception:  # noqa: BLE001 - any mismatch in transformers' internals: take the next path
            pass
    return slow


def _pick(messages: list, stop: int, skip: tuple[int, int] | None) -> list:
    """`messages[:stop]` without `messages[skip[0]:skip[1]]`."""
    if skip is None:
        return messages[:stop]
    return messages[: skip[0]] + messages[skip[1] : stop]


def _compiled_renderer(tokenizer, normalized, tools, chat_template, template_kwargs):
    # transformers' own steps from `render_jinja_template` (compile, sanitise to plain JSON types, alias reasoning
    # fields), done once for the whole conversation instead of once per render
    from transformers.utils import chat_template_utils as utils

    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise TypeError("tools given as functions: left to render_jinja_template")
    compiled = utils._compile_jinja_template(tokenizer.get_chat_template(chat_template, tools))
    chat = utils._alias_reasoning_fields(utils._plain_template_data(normalized))
    tool_schemas = utils._plain_template_data(tools)
    kwargs = utils._plain_template_data({**tokenizer.special_tokens_map, **template_kwargs})

    def render(stop: int, add_generation_prompt: bool, skip: tuple[int, int] | None = None) -> str:
        return compiled.render(
            messages=_pick(chat, stop, skip),
            tools=tool_schemas,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    return render


def _jinja_renderer(tokenizer, normalized, tools, chat_template, template_kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = tokenizer.get_chat_template(chat_template, tools)
    kwargs = {**tokenizer.special_tokens_map, **template_kwargs}

    def render(stop: int, add_generation_prompt: bool, skip: tuple[int, int] | None = None) -> str:
        rendered, _ = render_jinja_template(
            conversations=[_pick(normalized, stop, skip)],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return rendered[0]

    return render


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_prefix(full: str, prefix: str, what: str, tokenizer, chat_template) -> None:
    if full.startswith(prefix):
        return
    at = _first_difference(full, prefix)
    raise TemplateNotPrefixPreservingError(
        f"{chat_template_name(tokenizer, chat_template)} renders {what} differently from the full conversation, so "
        f"assistant tokens cannot be located exactly (the renderings diverge at character {at}: "
        f"prefix has {prefix[at : at + 60]!r}, full conversation has {full[at : at + 60]!r}). This happens with "
        "templates that drop past <think> blocks or special-case the last turn. Use a prefix-preserving template, "
        "e.g. `tokenizer.chat_template = trl.chat_template_utils.get_training_chat_template(tokenizer)`, or pass "
        "`chat_template=...`."
    )


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} has no 'role' field: {str(message)[:80]!r}")
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(f"message {i} (role {message['role']!r}) has no 'content' field")


def _prefix_bounds(full: str, render, assistants: list[int], tokenizer, chat_template) -> list[tuple[int, int]]:
    """The reference method: `(start, end)` of each assistant turn `i` in `full`, from the renderings of
    `messages[:i]` with the generation prompt and of `messages[:i + 1]`. Quadratic in the number of turns.

    Raises:
        TemplateNotPrefixPreservingError: one of these renderings is not a prefix of the full conversation.
    """
    bounds = []
    for i in assistants:
        pre = render(i, True)
        post = render(i + 1, False)
        _check_prefix(full, pre, f"the first {i} messages (with the generation prompt)", tokenizer, chat_template)
        _check_prefix(full, post, f"the first {i + 1} messages", tokenizer, chat_template)
        bounds.append((len(pre), len(post)))
    return bounds


# Messages a window keeps in front of its assistant turn besides the prompt: the previous turn and its observation. An
# even number, so that every message keeps the parity of its index (templates that check user/assistant alternation).
_WINDOW_CONTEXT = 2


def _window_bounds(full: str, render, assistants: list[int], count: int) -> list[tuple[int, int]] | None:
    """[`_prefix_bounds`] in time linear in the number of turns, or `None` when the windows do not rebuild `full`.

    Assistant turn `i` and the messages after it, up to the next assistant turn, are rendered in a window that leaves
    out the middle of the conversation: the prompt (`messages[:h]`, up to the first assistant turn), then
    `messages[i - 2:]` (the first windows leave nothing out: they are prefix renders). The window rendered with the
    generation prompt gives the text in front of the turn's content, and each message added to the window gives that
    message's text. These pieces must follow one another in `full`, from the end of the prompt's rendering to the end
    of `full`. Then, for a prefix-preserving template that renders a message from the prompt and the messages just
    before it, they are the pieces that the prefix renders cut out, and the bounds are the same. A template that
    renders windows differently (one that numbers its turns, say) fails the check, and the caller falls back to the
    prefix renders.
    """
    if not assistants:
        return []
    head = assistants[0]
    before = render(head, False)
    if not full.startswith(before):
        return None
    pos = len(before)
    bounds = []
    for n, i in enumerate(assistants):
        stop = assistants[n + 1] if n + 1 < len(assistants) else count
        first = max(head, i - _WINDOW_CONTEXT)
        skip = (head, first - (first - head) % 2)
        before = render(i, False, skip)
        prompt = render(i, True, skip)
        if not (prompt.startswith(before) and full.startswith(prompt[len(before) :], pos)):
            return None
        start = pos + len(prompt) - len(before)
        for k in range(i + 1, stop + 1):
            after = render(k, False, skip)
            if not (after.startswith(before) and full.startswith(after[len(before) :], pos)):
                return None
            pos += len(after) - len(before)
            before = after
            if k == i + 1:
                end = pos
        if end <= start:
            return None  # the prefix renders say what is wrong
        bounds.append((start, end))
    return bounds if pos == len(full) else None


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict] | None = None,
    *,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return `(text, spans)`: character ranges of each assistant turn's trained text.

    A span covers the turn's content and its end-of-turn token (`<|im_end|>`, `<end_of_turn>`), not the assistant
    header nor the newline after the end-of-turn token. Templates without an end-of-turn token of their own (GLM-4.5,
    which ends a turn with the next role's token such as `<|observation|>` or `<|user|>`) get that following special
    token as an extra span, since it is what the model emits to stop.

    Raises:
        TemplateNotPrefixPreservingError: the template renders a prefix differently from the full conversation.
    """
    _validate_messages(messages)
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if assistants and assistants[0] == 0:
        raise ValueError("the conversation starts with an assistant turn: there is no prompt to condition it on")
    full = _render(tokenizer, messages, tools, False, chat_template, template_kwargs)
    specials = _special_strings(tokenizer)
    try:
        render = _renderer(tokenizer, messages, tools, chat_template, template_kwargs)
        bounds = _window_bounds(full, render, assistants, len(messages))
    except Exception:  # noqa: BLE001 - a window the template refuses (e.g. it checks turn numbers): prefix renders
        bounds = None
    if bounds is None:
        render = _renderer(tokenizer, messages, tools, chat_template, template_kwargs, full)
        bounds = _prefix_bounds(full, render, assistants, tokenizer, chat_template)
    spans: list[tuple[int, int]] = []
    for (start, end), i in zip(bounds, assistants):
        if end <= start:
            raise ValueError(f"assistant message {i} renders to no text after the assistant header")
        turn = full[start:end]
        trimmed_end = start + len(turn.rstrip())
        if any(full[start:trimmed_end].endswith(s) for s in specials):
            spans.append((start, trimmed_end))  # content + end-of-turn token (ChatML, Gemma)
            continue
        spans.append((start, trimmed_end))
        # No end-of-turn token inside the turn: the model stops by emitting the next role's special token (GLM).
        following = next((s for s in specials if full.startswith(s, end)), None)
        if following is not None:
            spans.append((end, end + len(following)))
    return full, spans


def assistant_token_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict] | None = None,
    *,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> tuple[list[int], list[int]]:
    """Tokenize a conversation with its chat template and mark the tokens of assistant turns.

    Args:
        tokenizer: a fast tokenizer with a chat template (Qwen3 / Qwen3-Coder ChatML, Gemma-3, GLM-4.5, ...).
        messages: `[{"role", "content"}, ...]`; tool observations may be `user` or `tool` messages.
        tools: tool schemas passed to the template, as in `apply_chat_template`.
        chat_template: a template to use instead of `tokenizer.chat_template`.
        **template_kwargs: extra template variables (e.g. `enable_thinking=False`).

    Returns:
        `(input_ids, mask)`: the token ids of the whole rendered conversation (what TRL's `apply_chat_template(...,
        tokenize=True)` gives) and a 0/1 list with `mask[i] == 1` exactly on the tokens of assistant turns: content
        plus the template's end-of-turn token, not the assistant header.

    Raises:
        TemplateNotPrefixPreservingError: the template renders a prefix differently from the full conversation (e.g.
            it drops past `<think>` blocks), so the mask cannot be exact.
    """
    input_ids, mask, _ = _tokenize_with_mask(tokenizer, messages, tools, chat_template, template_kwargs)
    return input_ids, mask


def _tokenize_with_mask(tokenizer, messages, tools, chat_template, template_kwargs):
    """`(input_ids, mask, tokens_before)` for the rendered conversation, where `tokens_before(char)` is the number of
    tokens that start before character `char` of the rendered text."""
    text, spans = assistant_char_spans(tokenizer, messages, tools, chat_template=chat_template, **template_kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"assistant_token_mask needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}"
        )
    # The Rust tokenizer directly (what `tokenizer(text, add_special_tokens=False)` runs), without the wrapper's
    # conversions: on 30k-token trajectories they cost a good part of the encoding itself.
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        encoding = backend.encode(text, add_special_tokens=False)
    else:  # a tokenizer saved with truncation / padding switched on: the wrapper switches them off per call
        encoding = tokenizer(text, add_special_tokens=False).encodings[0]
    input_ids = encoding.ids

    def tokens_before(char: int) -> int:
        # Looked up at the span boundaries only (each lookup scans the offsets in Rust: for the few hundred turns of
        # an agent trajectory, cheaper than converting the offsets of every token to Python). No token starts
        # between `char` and the first character at or after it that a token covers (such a token would cover
        # `char`), so the count is that token's index, plus one when it started before `char`.
        for covered in range(char, len(text)):
            token = encoding.char_to_token(covered)
            if token is not None:
                return token + (encoding.token_to_chars(token)[0] < char)
        return len(input_ids)

    mask = [0] * len(input_ids)
    for span_start, span_end in spans:
        # A token belongs to a turn when it starts inside it; a token that starts in the header and runs into the
        # content (a merge across the boundary) stays masked, so the header is never trained.
        lo, hi = tokens_before(span_start), tokens_before(span_end)
        mask[lo:hi] = [1] * (hi - lo)
    return input_ids, mask, tokens_before


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict[str, Any]],
    completion: list[dict[str, Any]],
    tools: list[dict] | None = None,
    *,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> dict[str, list[int]]:
    """Tokenize `prompt + completion` and split it where the prompt (with the generation prompt) ends.

    Returns `{"prompt_ids", "completion_ids", "completion_mask"}`, where `completion_mask` is the assistant-only mask
    over `completion_ids` (observation turns inside the completion are 0).

    Raises:
        ValueError: the prompt or completion is empty, the completion does not start with an assistant turn or has
            no assistant tokens.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if not completion:
        raise ValueError("the completion is empty")
    if not isinstance(completion[0], dict) or completion[0].get("role") != "assistant":
        role = completion[0].get("role") if isinstance(completion[0], dict) else type(completion[0]).__name__
        raise ValueError(f"the completion must start with an assistant turn, its first message has role {role!r}")
    if isinstance(tools, str):
        tools = json.loads(tools)
    messages = list(prompt) + list(completion)
    input_ids, mask, tokens_before = _tokenize_with_mask(tokenizer, messages, tools, chat_template, template_kwargs)
    prompt_text = _render(tokenizer, list(prompt), tools, True, chat_template, template_kwargs)
    # Tokens that start before the end of the prompt text belong to the prompt.
    prompt_len = tokens_before(len(prompt_text))
    if not any(mask[prompt_len:]):
        raise ValueError("the completion has no assistant tokens")
    return {
        "prompt_ids": input_ids[:prompt_len],
        "completion_ids": input_ids[prompt_len:],
        "completion_mask": mask[prompt_len:],
    }
