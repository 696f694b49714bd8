"""Tiny local models and tokenizers for tests, benchmarks and the demo: no Hub access needed.

`build_tiny_tokenizer(family)` trains a small byte-level BPE tokenizer with the special tokens and the real chat template
of a target family (Qwen3 ChatML, Gemma-3, GLM-4.5; the templates are TRL's stored copies of the official ones).
`build_tiny_model(tokenizer)` makes a randomly initialised Qwen3-architecture causal LM sized to that vocabulary.
"""

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

_FAMILIES = {
    # family: (TRL template file, special tokens, eos, pad, bos)
    "qwen3": (
        "qwen3_instruct_2507",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
        "<|endoftext|>",
        None,
    ),
    "qwen3_thinking": ("qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>", None),
    "gemma3": (
        "gemma3",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "<pad>",
        "<bos>",
    ),
    "glm4moe": (
        "glm4moe",
        ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        "<|user|>",
        "<|endoftext|>",
        None,
    ),
}

_DEFAULT_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "I'll look at the repository structure first.\n<function=execute_bash>\n<parameter=cmd>ls</parameter>\n</function>",
    "Exit code: 0\nExecution output of [execute_bash]:\nsetup.py\nsrc\ntests\n",
    "The test fails because the function returns None instead of raising a ValueError.",
    "<think>\nLet me think about the bug.\n</think>\n\nNow let's submit the fix.\n<function=finish>\n</function>",
    "You are a programming agent. Resolve the GitHub issue in the repository.",
    'Traceback (most recent call last):\n  File "tests/test_core.py", line 12, in test_parse\nAssertionError',
]


def chat_template(name: str) -> str:
    """One of TRL's stored chat templates by file name (e.g. `"qwen3_instruct_2507"`, `"gemma3"`, `"glm4moe"`)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_tiny_tokenizer(
    family: str = "qwen3", corpus: Iterable[str] | None = None, vocab_size: int = 600
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with `family`'s special tokens and chat template.

    Byte-level, like Qwen's: every string round-trips through `decode`, and character offsets are exact.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(_FAMILIES)}")
    template_name, specials, eos, pad, bos = _FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) if corpus is not None else _DEFAULT_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        padding_side="left",
        name_or_path=f"tiny-{family}",
    )
    tokenizer.chat_template = chat_template(template_name)
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3-architecture causal LM for `tokenizer` (fp32, eager-free SDPA attention)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def synthetic_pool(instances: int = 500, per_instance: int = 16, seed: int = 0) -> dict[str, list]:
    """A seeded pool of labelled trajectories, `{instance_id: [Trajectory, ...]}`, for the selector's benchmark and
    the report's tests: each instance has a difficulty, each candidate a random number of tool-call steps, a reward,
    regression counts (a resolved patch breaks none) and a verifier probability that leans towards the truth."""
    from .data.trajectory import Trajectory

    rng = random.Random(seed)
    pool = {}
    for i in range(instances):
        difficulty = rng.random()
        group = []
        for k in range(per_instance):
            steps = rng.randint(5, 60)
            messages = [{"role": "system", "content": "agent"}, {"role": "user", "content": f"issue {i}"}]
            for s in range(steps):
                messages.append(
                    {
                        "role": "assistant",
                        "content": f"thought {s} <function=execute_bash>\n"
                        f"<parameter=cmd>cmd {rng.randint(0, 9)}</parameter>\n</function>",
                    }
                )
                messages.append({"role": "user", "content": "ok"})
            passed = rng.random() > difficulty
            # a resolved patch passes every PASS_TO_PASS test; an unresolved one breaks some of them, or none
            failures = 0 if passed or rng.random() < 0.5 else rng.randint(1, 4)
            group.append(
                Trajectory(
                    instance_id=f"inst-{i}",
                    messages=messages,
                    reward=float(passed),
                    finished=rng.random() < 0.85,
                    num_steps=steps,
                    patch=f"diff {i} {k % 5}",
                    regression_pass_count=10 - failures,
                    regression_fail_count=failures,
                    verifier_prob=min(1.0, max(0.0, rng.gauss(0.7 if passed else 0.3, 0.2))),
                    episode_id=f"{i}/{k}",
                )
            )
        pool[f"inst-{i}"] = group
    return pool
