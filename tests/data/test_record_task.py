"""The real default's generated task: fixed, chat-formatted, its answer derived from the prompt, and a
held-out split whose (name, city) pairs training never shows."""

import re

from lopt.data.embedded import RECORD_HELD_OUT_SIZE, record_splits


def fields(row):
    system, user, assistant = row["messages"]
    assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
    match = re.fullmatch(r"name=(\w+); age=(\d+); city=(\w+)", assistant["content"])
    assert match, assistant["content"]
    return user["content"], match.groups()


def test_record_task_is_fixed_and_its_answers_come_from_the_prompt():
    train, held_out = record_splits()
    assert (train, held_out) == record_splits()
    assert len(held_out) == RECORD_HELD_OUT_SIZE and len(train) == 2000
    for row in train + held_out:
        prompt, (name, age, city) = fields(row)
        assert prompt.startswith("Format as a record: ")
        assert all(re.search(rf"\b{v}\b", prompt) for v in (name, age, city)), prompt
        assert 18 <= int(age) <= 90


def test_held_out_pairs_are_never_trained_on():
    train, held_out = record_splits()
    pairs = lambda rows: {(f[0], f[2]) for f in (fields(r)[1] for r in rows)}  # noqa: E731
    assert len(pairs(held_out)) == RECORD_HELD_OUT_SIZE
    assert not pairs(held_out) & pairs(train)
    # Every held-out name and city is seen in training, in other pairs.
    assert {n for n, _ in pairs(held_out)} <= {n for n, _ in pairs(train)}
    assert {c for _, c in pairs(held_out)} <= {c for _, c in pairs(train)}
