"""RULER-style needle-in-a-haystack prompts over real English text.

    text, answer = build_needle_prompt(tokenizer, length=8192, seed=0)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    ... greedy-decode a few tokens ...
    check_answer(generated_text, answer)   # True if the needle's number was retrieved

The haystack is prose from Python's own documentation (``pydoc_data.topics``, shipped with every
CPython: ~430 distinct prose paragraphs, ~30K tokens), shuffled by paragraph with the seed (longer
prompts go through it again in a new order); one needle -- "The special
magic number for <key> is: <7 digits>." -- sits at a seeded depth. The prompt ends with the answer
prefix, so the first generated tokens are the answer. With a chat template (instruct models)
the question goes in the user turn and the answer prefix starts the assistant turn.
"""

from __future__ import annotations

import functools
import random
import re

__all__ = ["build_needle_prompt", "check_answer", "filler_paragraphs", "pydoc_text"]

KEYS = (
    "amber-falcon", "silent-harbor", "crimson-meadow", "frozen-lantern", "velvet-canyon",
    "hollow-summit", "golden-orchard", "restless-tide", "paper-comet", "quiet-ember",
    "iron-willow", "lunar-garden", "scarlet-river", "misty-archive", "copper-horizon",
)  # fmt: skip

INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the magic number afterwards.\n\n"
)
NEEDLE = "The special magic number for {key} is: {value}."
# the question and answer prefix of a single-key needle (the RULER wording; also used by the
# niah_single / niah_multikey tasks of prism.eval.tasks)
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"


def pydoc_topics() -> dict[str, str]:
    """Python's ``pydoc_data.topics`` (the help texts of the language reference, shipped with
    every CPython): the one real-text source of the needle prompts and of the harness corpus."""
    from pydoc_data.topics import topics

    return topics


@functools.cache
def pydoc_text() -> str:
    """Every pydoc topic, stripped, in name order, joined by blank lines (≈465K characters)."""
    topics = pydoc_topics()
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@functools.cache
def filler_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of ``pydoc_data.topics`` (grammar blocks, code and headings dropped),
    each re-flowed onto one line."""
    topics = pydoc_topics()
    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(ln.startswith((" ", "\t")) for ln in lines):
                continue  # code, grammar, tables and indented lists
            if any(set(ln.strip()) <= set("*=-~^") for ln in lines):
                continue  # headings and their underlines
            text = " ".join(ln.strip() for ln in lines).strip()
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 120 and letters >= 0.85 * len(text) and text[-1] in ".:":
                out.append(text)
    return tuple(dict.fromkeys(out))  # some topics share paragraphs: keep the first of each


def _chat_wrap(tokenizer, user: str, prefix: str) -> str:
    messages = [{"role": "user", "content": user}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return head + prefix


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_needle_prompt(
    tokenizer,
    length: int = 8192,
    seed: int = 0,
    depth: float | None = None,
    chat: bool | None = None,
) -> tuple[str, str]:
    """A needle-in-a-haystack prompt of about ``length`` tokens -> ``(prompt_text, answer)``.

    ``depth``: where the needle sits, as a fraction of the haystack (default: seeded in
    [0.1, 0.9]). ``chat``: wrap in the tokenizer's chat template (default: when it has one).
    Tokenize the text with ``add_special_tokens=False`` (a chat template already has them).
    The prompt is at most ``length`` tokens and within a few percent of it.
    """
    if length < 64:
        raise ValueError(f"length must be >= 64 tokens, got {length}")
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    depth = rng.uniform(0.1, 0.9) if depth is None else float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    needle = NEEDLE.format(key=key, value=value)
    question = "\n\n" + QUESTION.format(key=key)
    prefix = ANSWER_PREFIX.format(key=key)

    def render(paragraphs: list[str]) -> str:
        at = round(depth * len(paragraphs))
        body = "\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:])
        user = INTRO.format(key=key) + body + question
        if chat:
            return _chat_wrap(tokenizer, user, prefix)
        return user + "\n\n" + prefix

    budget = length - _n_tokens(tokenizer, render([]))
    chosen: list[str] = []
    used = 0
    full = False
    while not full:  # the corpus is ~30K tokens: longer prompts go through it again, reshuffled
        pool = list(filler_paragraphs())
        rng.shuffle(pool)
        for para in pool:
            n = _n_tokens(tokenizer, para) + 1  # + the paragraph break
            if used + n > budget:
                full = True
                break
            chosen.append(para)
            used += n
    text = render(chosen)
    while chosen and _n_tokens(tokenizer, text) > length:
        chosen.pop()
        text = render(chosen)
    return text, value


def check_answer(generated: str, answer: str) -> bool:
    """True if the needle's number appears in the generated text (RULER's string match), as a
    whole number (``12345678`` does not count for ``1234567``)."""
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", generated) is not None
