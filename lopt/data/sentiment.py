"""An embedded sentiment task for zeroth-order fine-tuning, generated from the VADER lexicon.

Rows are ``{"text", "label"}`` in the classification format (``lopt.data.classification``), scored with
MeZO's SST-2 prompt ``"{text} It was"`` and the label words ``" terrible"`` (0, negative) / ``" great"``
(1, positive), one token each for SmolLM2. A text puts one strongly polar adjective in a short templated
sentence about a subject ("Honestly, the hotel was dismal."); some rows negate it ("Nobody would call the
hotel dismal."), which flips the label, and some contrast two adjectives of opposite polarity, the second
one deciding ("At first the hotel seemed dismal, but in the end it was superb.").

The words come from ``vader_polar_words.txt`` beside this file (its header says how they were filtered,
the source and its MIT license; ``python -m lopt.data.sentiment PATH/vader_lexicon.txt`` rebuilds it),
split once into training and evaluation words by whole families (``split_words``). Rows are deterministic
in ``(split, n, seed)`` and balanced (``sentiment_rows``). How SmolLM2 scores them zero-shot: docs/zo.md.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from functools import lru_cache
from pathlib import Path

from lopt.data.classification import SST2_LABEL_WORDS, SST2_TEMPLATE

TEMPLATE = SST2_TEMPLATE  # "{text} It was"
CANDIDATES = SST2_LABEL_WORDS  # (" terrible", " great"): label 0 negative, 1 positive
LEXICON_FILE = Path(__file__).parent / "vader_polar_words.txt"

# The task's difficulty: the share of rows whose word is negated, and of rows with two words of which the second
# decides (the rest state one word plainly). Zero-shot on SmolLM2 (200 eval rows, seed 0): 0.70 with these
# shares; 0.70 plain rows only, 0.64 negated only, 0.71 contrasted only.
NEGATION_SHARE = 0.25
CONTRAST_SHARE = 0.25
EVAL_WORD_SHARE = 0.25  # of each polarity's words, held out for evaluation
TRAIN_SIZE, EVAL_SIZE = 1000, 200  # sentiment_splits(): MeZO samples 1,000 SST-2 training rows
_SPLIT_SEED = 20260601  # fixes the train / eval word split, whatever the rows' seed
_FAMILY_LETTERS = 5

SUBJECTS = ("the movie", "the restaurant", "the hotel", "the concert", "the book", "the service", "the game",
            "the show", "the album", "the trip", "the play", "the meal")
PLAIN = (
    "{subject} was {word}.",
    "I found {subject} {word}.",
    "Honestly, {subject} was {word}.",
    "The critic called {subject} {word}.",
    "In one word, {subject} was {word}.",
    "Everyone agreed that {subject} was {word}.",
    "My friends thought {subject} was {word}.",
)
NEGATED = (  # the word's polarity is flipped
    "{subject} was not {word}.",
    "I did not find {subject} {word}.",
    "Nobody would call {subject} {word}.",
    "{subject} was anything but {word}.",
    "{subject} was never {word}.",
)
CONTRAST = (  # {first} has the other polarity; {word} decides
    "At first {subject} seemed {first}, but in the end it was {word}.",
    "The reviews said {first}, but {subject} was {word}.",
    "I expected {subject} to be {first}; it was {word}.",
    "{subject} started {first} and ended {word}.",
)


def sentiment_rows(split: str, n: int, seed: int = 0, negation_share: float = NEGATION_SHARE,
                   contrast_share: float = CONTRAST_SHARE) -> list[dict]:
    """``n`` rows ``{"text", "label"}`` (label 0 negative, 1 positive) from the ``split`` ("train" or "eval")
    words; ``n // 2`` are negative. The same arguments give the same rows."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0 or not (0 <= negation_share and 0 <= contrast_share and negation_share + contrast_share <= 1):
        raise ValueError(f"need n >= 0 and shares in [0, 1] that add up to at most 1, got {n}, "
                         f"{negation_share}, {contrast_share}")
    words = split_words()[split]
    rng = random.Random(seed * 2 + (split == "eval"))
    labels = [0] * (n // 2) + [1] * (n - n // 2)
    rng.shuffle(labels)
    rows = []
    for label in labels:
        subject, draw = rng.choice(SUBJECTS), rng.random()
        if draw < negation_share:
            text = rng.choice(NEGATED).format(subject=subject, word=rng.choice(words[1 - label]))
        elif draw < negation_share + contrast_share:
            text = rng.choice(CONTRAST).format(subject=subject, first=rng.choice(words[1 - label]),
                                               word=rng.choice(words[label]))
        else:
            text = rng.choice(PLAIN).format(subject=subject, word=rng.choice(words[label]))
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    return rows


def sentiment_splits(train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` rows, from disjoint word sets."""
    return sentiment_rows("train", train_size, seed), sentiment_rows("eval", eval_size, seed)


# ---------------------------------------------------------------------------------------------- the words


@lru_cache(maxsize=1)
def lexicon() -> dict[str, float]:
    """``{word: mean valence}`` of the shipped polar words (positive > 0, negative < 0)."""
    words = {}
    for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            word, mean, _std = line.split("\t")
            words[word] = float(mean)
    return words


@lru_cache(maxsize=1)
def split_words() -> dict[str, dict[int, tuple[str, ...]]]:
    """``{"train" | "eval": {0: negative words, 1: positive words}}``: whole five-letter-prefix families go to
    one side; about ``EVAL_WORD_SHARE`` of each polarity's words are held out. The label words themselves
    ("great", "terrible") are left out: a row stating one would be copying, not sentiment."""
    excluded = {c.strip().lower() for c in CANDIDATES}
    families: dict[str, list[str]] = {}
    for word in sorted(lexicon()):
        if word not in excluded:
            families.setdefault(word[:_FAMILY_LETTERS], []).append(word)
    keys = sorted(families)
    random.Random(_SPLIT_SEED).shuffle(keys)

    def polarity(word):
        return int(lexicon()[word] > 0)

    totals = [sum(polarity(w) == p for ws in families.values() for w in ws) for p in (0, 1)]
    targets = [round(EVAL_WORD_SHARE * t) for t in totals]
    held = [0, 0]
    split = {"train": {0: [], 1: []}, "eval": {0: [], 1: []}}
    for key in keys:
        counts = [sum(polarity(w) == p for w in families[key]) for p in (0, 1)]
        side = "eval" if all(held[p] + counts[p] <= targets[p] for p in (0, 1)) else "train"
        if side == "eval":
            held = [held[p] + counts[p] for p in (0, 1)]
        for word in families[key]:
            split[side][polarity(word)].append(word)
    return {side: {p: tuple(sorted(ws)) for p, ws in by.items()} for side, by in split.items()}


# ---------------------------------------------------------------------------------------------- the file

MIN_VALENCE = 1.5  # |mean valence| on VADER's -4..4 scale
MAX_STD = 1.0  # standard deviation of the ten ratings
MIN_LETTERS = 3
FIRST_WORD = "abandon"  # the lexicon's lines before this one are emoticons and chat acronyms
# Left out by hand: profanity, slurs, sexual violence, self-harm, body shaming, chat slang; and words the
# part-of-speech lexicon calls adjectives that read as nouns or verbs in "the movie was {word}".
EXCLUDED = frozenset("""
assholes bullshit cocksucker dickhead dipshit douchebag goddammed jackasses motherfucker pissants pissed
pervert perverts retard tard scumbag smartass twat wanker sexy suicide suicidal damn damned damns
overweight dumpy
haha lmao lulz roflcopter bwahahah aok fav fab gratz congrats
broke champion darling dread fool freak irritant like maniac mock panic party scare snub waste
""".split())
EXCLUDED_PREFIXES = ("fuck", "fuk", "shit", "bitch", "bastard", "slut", "whore", "rape", "rapi", "fag")

VADER_LICENSE = """The MIT License (MIT)

Copyright (c) 2016 C.J. Hutto

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""


def base_adjective(word: str) -> bool:
    """Whether lemminflect's lexicon has ``word`` as an adjective in its base form (a build-time tool only:
    the shipped file needs nothing)."""
    from lemminflect import getAllLemmas

    return word in getAllLemmas(word, upos="ADJ").get("ADJ", ())


def polar_lines(vader_lexicon: str, is_adjective=base_adjective) -> list[str]:
    """``word<TAB>mean<TAB>std`` for the strongly polar words of VADER's ``vader_lexicon.txt`` (its text):
    dictionary words only, lowercase ASCII letters, at least ``MIN_LETTERS``; ``|mean| >= MIN_VALENCE``;
    ``std <= MAX_STD``; all ten raters on the mean's side of zero; not ``EXCLUDED``; and ``is_adjective``
    (so that "the movie was {word}" reads as English)."""
    lines = vader_lexicon.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split("\t")[0] == FIRST_WORD)
    kept = []
    for line in lines[start:]:
        word, mean, std, ratings = line.split("\t")
        mean_value, ratings = float(mean), [int(r) for r in ratings.strip("[]").split(",")]
        if not (word.isascii() and word.isalpha() and word.islower() and len(word) >= MIN_LETTERS):
            continue
        if word in EXCLUDED or word.startswith(EXCLUDED_PREFIXES):
            continue
        if abs(mean_value) < MIN_VALENCE or float(std) > MAX_STD or not all(r * mean_value > 0 for r in ratings):
            continue
        if is_adjective(word):
            kept.append(f"{word}\t{mean}\t{std}")
    return kept


def lexicon_file_text(vader_lexicon: str, is_adjective=base_adjective) -> str:
    """The text of ``vader_polar_words.txt``: a header naming the source, the filter and the license, then the words."""
    lines = polar_lines(vader_lexicon, is_adjective)
    positive = sum(float(line.split("\t")[1]) > 0 for line in lines)
    header = [
        "Strongly polar English words from the VADER sentiment lexicon, for lopt's embedded sentiment task",
        "(lopt/data/sentiment.py, which rebuilds this file: python -m lopt.data.sentiment PATH/vader_lexicon.txt).",
        "",
        "Source: vaderSentiment 3.3.2 (PyPI), vaderSentiment/vader_lexicon.txt;",
        "https://github.com/cjhutto/vaderSentiment",
        "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of",
        "Social Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14).",
        "",
        f"Filter: the lexicon's word lines (from '{FIRST_WORD}' on; the lines before are emoticons and chat acronyms);",
        f"lowercase ASCII letters only, at least {MIN_LETTERS}; |mean valence| >= {MIN_VALENCE} on the -4..4 scale;",
        f"standard deviation of the ten ratings <= {MAX_STD}; all ten ratings on the mean's side of zero;",
        "adjectives in their base form only, by the part-of-speech lexicon of lemminflect 0.2.3 (a build-time tool,",
        "MIT; none of its data is in this file), so that 'the movie was WORD' reads as English;",
        "less a hand list of profanity, slurs, sexual-violence, self-harm and chat-slang words (sentiment.EXCLUDED).",
        f"{len(lines)} words: {positive} positive, {len(lines) - positive} negative.",
        "Columns (tab-separated): word, mean valence, standard deviation, as in the source.",
        "",
        "The source's license, which covers this derived file:",
        "",
        *VADER_LICENSE.splitlines(),
    ]
    return "".join(f"# {h}".rstrip() + "\n" for h in header) + "".join(line + "\n" for line in lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lopt.data.sentiment PATH/vader_lexicon.txt (writes lopt/data/vader_polar_words.txt)")
    if importlib.util.find_spec("lemminflect") is None:
        sys.exit("rebuilding the word list needs lemminflect (its part-of-speech lexicon): pip install lemminflect")
    LEXICON_FILE.write_text(lexicon_file_text(Path(sys.argv[1]).read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {LEXICON_FILE}")
