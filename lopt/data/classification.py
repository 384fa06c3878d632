"""Classification data for zeroth-order fine-tuning: rows with a prompt and candidate answers, tokenised to
the batch the ZO engine scores.

Two row shapes, one JSON object a line (one file may mix them):
- ``{"prompt": ..., "candidates": [...], "answer": <index or the candidate string>}``;
- ``{"text": ..., "label": <index or label word>}``: the prompt is ``template`` with the text in place of
  ``{text}``, the candidates are ``label_words``. The default is MeZO's SST-2 prompt: ``"{text} It was"``
  scored with ``" terrible"`` (label 0, negative) and ``" great"`` (label 1, positive).

Every candidate must be one token for the model's tokenizer: the engine scores all candidates from the
last prompt position of one forward (no full-vocabulary logits, no second pass per candidate). Prompts are
scored raw, as MeZO does: no chat template, just the tokenizer's own special tokens (a BOS where it adds
one by default). Errors are ``UsageError`` lines naming the file and line.

Scoring (accuracy, candidate loss) is ``lopt.measures.classification``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lopt.errors import UsageError

SST2_TEMPLATE = "{text} It was"  # MeZO's SST-2 prompt
SST2_LABEL_WORDS = (" terrible", " great")  # label 0 (negative), label 1 (positive)
EXPECTED_FIELDS = "prompt + candidates + answer | text + label"
SINGLE_TOKEN_HINT = ("the ZO engine scores single-token answers from the last prompt position: use candidates or "
                     "label words that are one token each (usually a word with its leading space, e.g. ' great')")


@dataclass(frozen=True)
class ClassificationRow:
    """One validated row: the prompt as scored, its candidates, the index of the right one, and where it came
    from (``"data.jsonl line 3"``) for messages about it."""

    prompt: str
    candidates: tuple[str, ...]
    answer: int
    where: str


@dataclass
class ClassificationExample:
    """One tokenised row: the prompt's tokens (the candidates are scored after its last one), each candidate's
    single token id, and the index of the right candidate."""

    input_ids: list[int]
    candidate_ids: list[int]
    label: int

    num_label_tokens = 1  # one scored answer: a step's examples weigh alike (lopt.training.steps.StepBatch)


# ---------------------------------------------------------------------------------------------- loading


def load_classification(source: str | Path, template: str = SST2_TEMPLATE,
                        label_words: Sequence[str] = SST2_LABEL_WORDS) -> list[ClassificationRow]:
    """The validated rows of a JSON Lines file (or a JSON array of row objects)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"data file not found: {source}" if not path.exists() else
                         f"{source} is not a regular file: give a JSON Lines file of classification rows")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read data file {source}: {error.strerror or error}") from None
    placed = read_json_rows(data, str(source))
    if not placed:
        raise UsageError(f"data file is empty: {source}")
    return parse_rows(placed, template, label_words, source=str(source))


def looks_like_classification(source: str | Path) -> bool:
    """Whether ``source``'s first row is a classification row (``candidates``, or ``text`` and ``label``): how
    ``lopt train --method zo`` tells this format from the chat and question/answer ones. A hub dataset, a file
    that is not JSON, or an unreadable one: False (the other loader says what is wrong)."""
    path = Path(source).expanduser()
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return False
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
        first = read_json_rows(head.split(b"\n", 1)[0] if path.suffix == ".jsonl" else head, str(source))
    except (OSError, UsageError):
        return False
    keys = set(first[0][1]) if first and isinstance(first[0][1], dict) else set()
    return "candidates" in keys or {"text", "label"} <= keys


def read_json_rows(data: bytes, name: str) -> list[tuple[str, dict]]:
    """``(place, row)`` for each JSON object of JSON Lines text (place ``"NAME line N"``) or of one JSON array
    (place ``"NAME item N"``)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"{name} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}): "
                         "save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{name} line {error.lineno}: bad JSON (column {error.colno}: {error.msg})") from None
        placed = [(f"{name} item {i}", row) for i, row in enumerate(document, 1)]
    else:
        placed = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                placed.append((f"{name} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise UsageError(f"{name} line {number}: bad JSON (column {error.colno}: {error.msg}); "
                                 "write one JSON object a line") from None
    for where, row in placed:
        if not isinstance(row, dict):
            raise UsageError(f"{where}: a JSON {type(row).__name__}, not an object; expected {EXPECTED_FIELDS}")
    return placed


def parse_rows(rows: Sequence[dict] | Sequence[tuple[str, dict]], template: str = SST2_TEMPLATE,
               label_words: Sequence[str] = SST2_LABEL_WORDS, source: str = "the data") -> list[ClassificationRow]:
    """Validated rows of either shape. ``rows``: plain dicts (placed as ``"SOURCE row N"``) or ``(place, row)``
    pairs from ``read_json_rows``. Every row must have the same number of candidates (one batch tensor)."""
    if "{text}" not in template:
        raise UsageError(f"the template {template!r} has no {{text}}: write where the row's text goes, "
                         f"e.g. {SST2_TEMPLATE!r}")
    label_words = _candidates(list(label_words), "the label words")
    placed = [r if isinstance(r, tuple) else (f"{source} row {i}", r) for i, r in enumerate(rows, 1)]
    if not placed:
        raise UsageError(f"{source} has no rows")
    parsed = [_parse(row, where, template, label_words) for where, row in placed]
    first = parsed[0]
    for row in parsed[1:]:
        if len(row.candidates) != len(first.candidates):
            raise UsageError(f"{row.where}: {len(row.candidates)} candidates, but {first.where} has "
                             f"{len(first.candidates)}: every row needs the same number of candidates")
    return parsed


def _parse(row: dict, where: str, template: str, label_words: tuple[str, ...]) -> ClassificationRow:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: a {type(row).__name__}, not a row object; expected {EXPECTED_FIELDS}")
    if "prompt" in row:
        for key in ("candidates", "answer"):
            if key not in row:
                raise UsageError(f"{where}: missing field {key!r} (a prompt row needs prompt, candidates and answer)")
        prompt = _text(row["prompt"], "prompt", where)
        candidates = _candidates(row["candidates"], f"{where}: candidates")
        return ClassificationRow(prompt, candidates, _index(row["answer"], candidates, "answer", where), where)
    if "text" in row:
        if "label" not in row:
            raise UsageError(f"{where}: missing field 'label' (a text row needs text and label)")
        text = _text(row["text"], "text", where)
        answer = _index(row["label"], label_words, "label", where)
        return ClassificationRow(template.replace("{text}", text), label_words, answer, where)
    found = ", ".join(sorted(row)) or "none"
    raise UsageError(f"{where}: missing field 'prompt' or 'text' (found: {found}); expected {EXPECTED_FIELDS}")


def _text(value, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: {key} must be a non-empty string, got {_show(value)}")
    return value


def _candidates(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
        raise UsageError(f"{what} must be a list of at least two non-empty strings, got {_show(value)}")
    if len(set(value)) < len(value):
        raise UsageError(f"{what} repeat a string: {_show(value)}")
    return tuple(value)


def _index(value, candidates: tuple[str, ...], key: str, where: str) -> int:
    """The candidate ``value`` names: its index, its exact text, or (for a label) its text without spaces."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(candidates):
            return value
    elif isinstance(value, str):
        if value in candidates:
            return candidates.index(value)
        stripped = [c.strip() for c in candidates]
        if key == "label" and value.strip() in stripped and stripped.count(value.strip()) == 1:
            return stripped.index(value.strip())
    raise UsageError(f"{where}: {key} {_show(value)} is not one of the candidates {list(candidates)}: "
                     f"give its index (0 to {len(candidates) - 1}) or its exact text")


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, tuple) else repr(list(value))
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- tokenising


def candidate_token_ids(tokenizer, rows: Sequence[ClassificationRow]) -> dict[str, int]:
    """Each candidate's token id; a candidate of more or fewer than one token is an error naming the first row
    that has it."""
    first_row = {}
    for row in rows:
        for candidate in row.candidates:
            first_row.setdefault(candidate, row)
    strings = list(first_row)
    encoded = tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else []
    ids = {}
    for candidate, tokens in zip(strings, encoded):
        if len(tokens) != 1:
            pieces = [tokenizer.decode([t]) for t in tokens]
            raise UsageError(f"{first_row[candidate].where}: candidate {candidate!r} is {len(tokens)} tokens for this "
                             f"tokenizer ({pieces}); {SINGLE_TOKEN_HINT}")
        ids[candidate] = tokens[0]
    return ids


def tokenize_classification(rows: Sequence[ClassificationRow], tokenizer,
                            seq_len: int | None = None) -> list[ClassificationExample]:
    """Tokenise the prompts raw (no chat template; the tokenizer's default special tokens) and the candidates
    to one token each. ``seq_len`` keeps a prompt's last tokens: the scored position is its end."""
    ids = candidate_token_ids(tokenizer, rows)
    encoded = tokenizer([row.prompt for row in rows])["input_ids"] if rows else []
    examples = []
    for row, prompt_ids in zip(rows, encoded):
        prompt_ids = list(prompt_ids if seq_len is None else prompt_ids[-seq_len:])
        if not prompt_ids:
            raise UsageError(f"{row.where}: the prompt has no tokens")
        examples.append(ClassificationExample(prompt_ids, [ids[c] for c in row.candidates], row.answer))
    return examples


# ---------------------------------------------------------------------------------------------- batching


def collate_classification(examples: Sequence[ClassificationExample], pad_token_id: int) -> dict:
    """The batch the ZO engine scores: ``input_ids`` and ``attention_mask`` (B, T), right-padded with
    ``pad_token_id``; ``last_index`` (B,), the position of each prompt's last token; ``candidate_ids`` (B, C);
    ``label`` (B,), the index of the right candidate."""
    import torch  # here, not at the top: loading and validating a file needs no torch

    if not examples:
        raise ValueError("collate_classification needs at least one example")
    widths = {len(e.candidate_ids) for e in examples}
    if len(widths) > 1:
        raise ValueError(f"examples with different numbers of candidates in one batch: {sorted(widths)}")
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for r, e in enumerate(examples):
        input_ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[r, : len(e.input_ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "last_index": torch.tensor([len(e.input_ids) - 1 for e in examples], dtype=torch.long),
        "candidate_ids": torch.tensor([e.candidate_ids for e in examples], dtype=torch.long),
        "label": torch.tensor([e.label for e in examples], dtype=torch.long),
    }
