"""RULER-style synthetic long-context tasks, generated offline and deterministic by seed.

Six tasks after RULER (arXiv 2404.06654), each a prompt of about ``length`` tokens that ends in an
answer prefix, and a list of reference answers:

=================  ===========================================================================
niah_single        one "special magic number" needle for a key word in a haystack
niah_multikey      the same, with three distractor needles for other keys
niah_multivalue    one key with four values; all four must be produced
niah_multiquery    four keys; the values of all four must be produced
vt                 variable tracking: a chain ``VAR A = 12345; VAR B = VAR A; ...`` (4 hops);
                   name every variable holding the value
cwe                common-word extraction: a numbered word list in which 10 words appear 30
                   times and the rest 3 times; name the 10 common words
=================  ===========================================================================

The haystack is real text (``pydoc``: sentences of Python's documentation from a seeded position)
or RULER's ``noise`` filler. Needles sit at seeded depths. Scoring is RULER's ``string_match_all``
(:func:`score_all`: the share of the references found in the output, case-insensitive, whole
words); :func:`score_any` is its ``string_match_part``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import needle

# Key words for needles: concrete nouns that do not occur in Python's documentation.
KEY_WORDS = (
    "apricot avalanche badger bamboo banjo barnacle beetroot blizzard bluebell bonfire "
    "buffalo butterscotch cactus camel canyon caramel cardamom caribou cashew cathedral "
    "cauliflower cello cheetah chestnut chimney cinnamon clover coconut comet coral cormorant "
    "cranberry crocodile cucumber daffodil dandelion dolphin dragonfly driftwood eggplant "
    "elephant emerald falcon ferret fjord flamingo foxglove gazelle geyser ginger giraffe "
    "glacier gondola gooseberry gorilla granite harmonica hazelnut hedgehog heron hibiscus "
    "hummingbird iceberg iguana jaguar jasmine kangaroo kayak kiwi koala lagoon lantern "
    "lavender lemur leopard lighthouse lobster lotus lynx macaw magnolia mandolin mango "
    "marigold marmalade meadow meteor mongoose moose mosquito mulberry nectarine nightingale "
    "nutmeg oasis octopus orchid ostrich otter oyster pagoda panther papaya parsnip peacock "
    "pelican peppermint persimmon pheasant pinecone pistachio platypus pomegranate porcupine "
    "puffin pumpkin quail quince raccoon radish rainforest raspberry reindeer rhubarb "
    "saffron salamander sardine seahorse sequoia shamrock snowflake sparrow squirrel "
    "starfish strawberry sunflower swan tadpole tambourine tangerine thunderstorm toucan "
    "trombone tulip turnip turquoise ukulele vanilla volcano walnut walrus waterfall "
    "watermelon weasel willow wolverine xylophone yak zebra zucchini"
).split()

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.\n"
)


@dataclass
class TaskSample:
    """One prompt. ``prompt`` ends with ``answer_prefix`` (the model continues it)."""

    task: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# scoring


def _found(ref: str, prediction: str) -> bool:
    pattern = r"(?<![0-9A-Za-z_])" + re.escape(ref.strip()) + r"(?![0-9A-Za-z_])"
    return re.search(pattern, prediction, flags=re.IGNORECASE) is not None


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER string_match_all: the share of ``answers`` present (whole word, any case)."""
    if not answers:
        raise ValueError("a task sample needs at least one reference answer")
    return sum(_found(a, prediction) for a in answers) / len(answers)


def score_any(prediction: str, answers: Sequence[str]) -> float:
    """RULER string_match_part: 1.0 if any reference is present, else 0.0."""
    if not answers:
        raise ValueError("a task sample needs at least one reference answer")
    return float(any(_found(a, prediction) for a in answers))


def score(sample: TaskSample, prediction: str) -> float:
    """The task's metric for one prediction (all tasks use string_match_all, as RULER)."""
    return score_all(prediction, sample.answers)


# ---------------------------------------------------------------------------------------------
# haystack and length fitting


_SENTENCES: list[str] | None = None


def _pydoc_sentences() -> list[str]:
    global _SENTENCES
    if _SENTENCES is None:
        from .modeling import corpus_text

        text = re.sub(r"\s+", " ", corpus_text("pydoc"))
        parts = re.split(r"(?<=[.!?]) (?=[A-Z])", text)
        _SENTENCES = [p.strip() + " " for p in parts if 20 <= len(p) <= 400]
    return _SENTENCES


def _haystack_units(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "noise":
        return [NOISE] * n
    if kind == "pydoc":
        sents = _pydoc_sentences()
        start = rng.randrange(len(sents))
        return [sents[(start + i) % len(sents)] for i in range(n)]
    raise ValueError(f"unknown haystack {kind!r}; valid: ['pydoc', 'noise']")


def _fit(
    build: Callable[[int], str],
    count_tokens: Callable[[str], int],
    budget: int,
    max_n: int | None = None,
) -> tuple[str, int]:
    """Largest n <= ``max_n`` (haystack units) with ``count_tokens(build(n)) <= budget``."""
    fits = lambda n: (max_n is None or n <= max_n) and count_tokens(build(n)) <= budget  # noqa: E731
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise RuntimeError("haystack fitting did not converge")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    text = build(lo)
    if count_tokens(text) > budget:
        raise ValueError(f"the task's fixed text alone exceeds the budget of {budget} tokens")
    return text, lo


def _insert(units: list[str], needles: Sequence[str], depths: Sequence[float]) -> str:
    """Insert ``needles`` between haystack units at relative ``depths`` (in order)."""
    out = list(units)
    placed = sorted(zip(depths, range(len(needles))), reverse=True)
    for depth, i in placed:
        pos = int(round(depth * len(units)))
        out.insert(pos, needles[i] + " ")
    return "".join(out)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


# ---------------------------------------------------------------------------------------------
# the generators


def _niah(task: str, rng: random.Random, haystack: str, fit) -> tuple[str, list[str], dict]:
    n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[
        task
    ]
    keys = rng.sample(KEY_WORDS, n_keys)
    if task == "niah_multivalue":
        values = [_number(rng) for _ in range(4)]
        needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in values]
        answers = values
    else:
        values = [_number(rng) for _ in keys]
        needles = [
            f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)
        ]
        answers = values if task == "niah_multiquery" else values[:1]
    order = list(range(len(needles)))
    rng.shuffle(order)
    needles = [needles[i] for i in order]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    if task in ("niah_single", "niah_multikey"):  # the demo's needle wording (prism.needle)
        question = needle.QUESTION.format(key=keys[0])
        prefix = needle.ANSWER_PREFIX.format(key=keys[0])
    elif task == "niah_multivalue":
        question = (
            f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
        )
        prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
    else:
        joined = ", ".join(keys[:-1]) + f", and {keys[-1]}"
        question = (
            f"What are all the special magic numbers for {joined} mentioned in the provided text?"
        )
        prefix = f"The special magic numbers for {joined} mentioned in the provided text are"
    seed = rng.random()

    def build(n: int) -> str:
        units = _haystack_units(haystack, random.Random(seed), n)
        return f"{NIAH_INTRO}{_insert(units, needles, depths)}\n{question} Answer: {prefix}"

    prompt, n = fit(build)
    meta = {"keys": keys, "depths": [round(d, 4) for d in depths], "units": n}
    return prompt, answers, meta


def _vt(rng: random.Random, haystack: str, fit) -> tuple[str, list[str], dict]:
    hops = 4
    names: list[str] = []
    while len(names) < hops + 1:
        v = _var(rng)
        if v not in names:
            names.append(v)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)
    ]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)
    intro = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    )
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        "Answer: According to the chain(s) of variable assignment in the text above, "
        f"{hops + 1} variables are assigned the value {value}, they are:"
    )
    seed = rng.random()

    def build(n: int) -> str:
        units = _haystack_units(haystack, random.Random(seed), n)
        return f"{intro}{_insert(units, chain, depths)}\n{question} {prefix}"

    prompt, n = fit(build)
    return prompt, names, {"value": value, "units": n}


_CWE_VOCAB: list[str] | None = None


def _cwe_vocab() -> list[str]:
    global _CWE_VOCAB
    if _CWE_VOCAB is None:
        from .modeling import corpus_text

        words = set(re.findall(r"\b[a-z]{4,10}\b", corpus_text("pydoc")))
        _CWE_VOCAB = sorted(words - set(KEY_WORDS))
    return _CWE_VOCAB


def _cwe(rng: random.Random, fit, n_common: int = 10, f_common: int = 30, f_rare: int = 3):
    vocab = _cwe_vocab()
    pool = rng.sample(vocab, min(len(vocab), 2000))
    common, rare_pool = pool[:n_common], pool[n_common:]
    seed = rng.random()
    intro = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    question = f"Question: What are the {n_common} most common words in the above list?"
    prefix = f"Answer: The top {n_common} words that appear most often in the list are:"

    def builder(freq: int):
        def build(n_rare: int) -> str:
            r = random.Random(seed)
            words = common * freq + rare_pool[:n_rare] * f_rare
            r.shuffle(words)
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return f"{intro}{listing}\n{question} {prefix}"

        return build

    # short contexts cannot hold 10 x 30 repetitions: lower the common words' frequency (as RULER
    # does for small lengths), keeping them well above the rare words' frequency
    for freq in sorted({f_common, 20, 10, 6}, reverse=True):
        if freq > f_common or freq <= f_rare:
            continue
        try:
            prompt, n = fit(builder(freq), len(rare_pool))
        except ValueError:
            continue
        if n >= n_common:
            return prompt, list(common), {"rare_words": n, "common_freq": freq}
    raise ValueError("length too short for the common-word-extraction task")


# max_new_tokens: generation budget; stop_at_newline: the answer is one value on one line
# (generation stops at the first newline after it, so later rambling cannot add matches); the
# multi-answer tasks may list their values on several lines and run to max_new_tokens
TASKS: dict[str, dict[str, Any]] = {
    "niah_single": {"max_new_tokens": 16, "stop_at_newline": True},
    "niah_multikey": {"max_new_tokens": 16, "stop_at_newline": True},
    "niah_multivalue": {"max_new_tokens": 64, "stop_at_newline": False},
    "niah_multiquery": {"max_new_tokens": 64, "stop_at_newline": False},
    "vt": {"max_new_tokens": 32, "stop_at_newline": False},
    "cwe": {"max_new_tokens": 64, "stop_at_newline": False},
}


def generate(
    task: str,
    length: int,
    count_tokens: Callable[[str], int],
    seed: int = 0,
    index: int = 0,
    haystack: str = "pydoc",
    max_new_tokens: int | None = None,
) -> TaskSample:
    """One sample of ``task`` whose prompt has at most ``length - max_new_tokens`` tokens.

    Deterministic in ``(task, length, seed, index, haystack)`` (and the tokenizer).
    ``count_tokens(text) -> int`` measures a prompt (the model's tokenizer).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    new = TASKS[task]["max_new_tokens"] if max_new_tokens is None else int(max_new_tokens)
    budget = length - new
    if budget < 64:
        raise ValueError(f"length {length} leaves no room for a {task} prompt")
    rng = random.Random(f"{task}|{length}|{seed}|{index}|{haystack}")
    fit = lambda build, max_n=None: _fit(build, count_tokens, budget, max_n)  # noqa: E731
    if task.startswith("niah"):
        prompt, answers, meta = _niah(task, rng, haystack, fit)
    elif task == "vt":
        prompt, answers, meta = _vt(rng, haystack, fit)
    else:
        prompt, answers, meta = _cwe(rng, fit)
    meta["prompt_tokens"] = count_tokens(prompt)
    return TaskSample(task, prompt, answers, new, meta)


def generate_samples(
    task: str,
    length: int,
    count_tokens: Callable[[str], int],
    samples: int,
    seed: int = 0,
    haystack: str = "pydoc",
    max_new_tokens: int | None = None,
) -> list[TaskSample]:
    return [
        generate(task, length, count_tokens, seed, i, haystack, max_new_tokens)
        for i in range(samples)
    ]
