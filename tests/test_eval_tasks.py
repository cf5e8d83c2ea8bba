"""RULER-style task generators and their scorer functions (prism.eval.tasks)."""

import re

import pytest

from prism.eval import tasks

count = lambda s: len(s.split())  # noqa: E731 - a deterministic stand-in tokenizer


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_generators_are_deterministic_and_fit(task):
    a = tasks.generate(task, 2048, count, seed=1, index=0)
    b = tasks.generate(task, 2048, count, seed=1, index=0)
    c = tasks.generate(task, 2048, count, seed=2, index=0)
    d = tasks.generate(task, 2048, count, seed=1, index=1)
    assert a == b
    assert a.prompt != c.prompt and a.prompt != d.prompt
    budget = 2048 - a.max_new_tokens
    assert count(a.prompt) <= budget
    assert count(a.prompt) > 0.8 * budget  # the haystack fills the length
    assert a.answers and len(set(a.answers)) == len(a.answers)
    # every reference answer is in the context, and the prompt ends in an answer prefix
    for ans in a.answers:
        assert re.search(r"\b" + re.escape(ans) + r"\b", a.prompt)
    assert a.prompt.rstrip().endswith(("is", "are", ":"))


def test_noise_haystack_and_lengths():
    s = tasks.generate("niah_single", 1024, count, haystack="noise")
    assert "The grass is green." in s.prompt
    long = tasks.generate("niah_single", 4096, count, haystack="noise")
    assert count(long.prompt) > 3 * count(s.prompt)
    with pytest.raises(ValueError, match="valid tasks"):
        tasks.generate("nope", 1024, count)
    with pytest.raises(ValueError, match="haystack"):
        tasks.generate("niah_single", 1024, count, haystack="lorem")


def test_task_structure():
    mk = tasks.generate("niah_multikey", 2048, count, seed=0)
    assert mk.prompt.count("special magic numbers for") >= 4  # 1 target + 3 distractor needles
    key = mk.metadata["keys"][0]
    assert f"One of the special magic numbers for {key} is: {mk.answers[0]}." in mk.prompt
    mv = tasks.generate("niah_multivalue", 2048, count, seed=0)
    assert len(mv.answers) == 4
    assert all(f"for {mv.metadata['keys'][0]} is: {v}" in mv.prompt for v in mv.answers)
    mq = tasks.generate("niah_multiquery", 2048, count, seed=0)
    assert len(mq.answers) == 4 and all(k in mq.prompt.split("\n")[-1] for k in mq.metadata["keys"])
    vt = tasks.generate("vt", 2048, count, seed=0)
    assert len(vt.answers) == 5
    assert f"VAR {vt.answers[0]} = {vt.metadata['value']}." in vt.prompt
    for a, b in zip(vt.answers, vt.answers[1:]):
        assert f"VAR {b} = VAR {a}." in vt.prompt
    cwe = tasks.generate("cwe", 2048, count, seed=0)
    listing = cwe.prompt.split("\n")[1]
    words = re.findall(r"\d+\. (\w+)", listing)
    top = sorted(set(words), key=lambda w: -words.count(w))[:10]
    assert sorted(top) == sorted(cwe.answers)
    assert min(words.count(w) for w in cwe.answers) > max(
        words.count(w) for w in set(words) - set(cwe.answers)
    )


def test_scorers_known_cases():
    assert tasks.score_all("The number is 1234567.", ["1234567"]) == 1.0
    assert tasks.score_all("The number is 1234568.", ["1234567"]) == 0.0
    # whole tokens only: a prefix of a longer number or word is not a match
    assert tasks.score_all("12345678", ["1234567"]) == 0.0
    assert tasks.score_all("categories", ["cat"]) == 0.0
    assert tasks.score_all("CAT, dog", ["cat", "dog"]) == 1.0
    assert (
        tasks.score_all("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    )
    assert tasks.score_any("1111111 only", ["1111111", "2222222"]) == 1.0
    assert tasks.score_any("nothing", ["1111111", "2222222"]) == 0.0
    vt = tasks.generate("vt", 1024, count, seed=0)
    assert tasks.score(vt, " ".join(vt.answers)) == 1.0
    assert tasks.score(vt, " ".join(vt.answers[:2])) == pytest.approx(0.4)
    assert tasks.score(vt, "no idea") == 0.0
    with pytest.raises(ValueError):
        tasks.score_all("x", [])
