"""SFT data: load rows, render them as conversations, tokenise with the prompt masked, batch.

Every row format becomes a list of chat messages; the tokenizer's chat template (or, for a tokenizer
without one, plain text with an EOS after each answer) renders it, and only the assistant turns'
tokens keep their labels: prompt tokens get -100. ``datasets`` is imported here only, when a file or
hub name is read: the training step itself never needs it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lopt.errors import UsageError

if TYPE_CHECKING:  # collate's annotation; torch itself loads inside collate, after the --data checks
    import torch

IGNORE_INDEX = -100  # a label the losses skip (prompt, padding): PyTorch's cross_entropy default

# (format name, required columns, optional columns), tried in this order.
ROW_FORMATS = (
    ("messages", ("messages",), ()),
    ("instruction", ("instruction", "output"), ("input",)),
    ("query", ("query", "response"), ()),
    ("question", ("question", "answer"), ()),
    ("prompt", ("prompt", "completion"), ()),
)
EXPECTED_FIELDS = (
    "messages | instruction + output (+ input) | query + response | question + answer | prompt + completion"
)
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Example:
    """One tokenised conversation: ``labels[t]`` is ``input_ids[t]`` on answer tokens, -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss counts: the engine shifts labels left, so position 0's label is never predicted."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class EvalExample:
    """A held-out conversation cut before its last answer, for generation and exact match."""

    prompt_ids: list[int]
    answer: str


# ---------------------------------------------------------------------------------------------- loading


def check_data_source(source: str) -> None:
    """``UsageError`` for a local data path that does not exist (a hub name is looked up when read).
    Needs neither torch nor datasets, so ``lopt train`` says it before loading either."""
    if not Path(source).expanduser().exists() and _looks_like_path(source):
        raise UsageError(f"data file not found: {source}")


def load_rows(source: str) -> list[dict]:
    """The rows of a local JSON / JSONL / Parquet / CSV file (or a directory of them), or of a hub dataset.

    JSON and JSON Lines are parsed here, so an error names its file and line; Parquet, CSV and hub datasets
    are read by ``datasets``."""
    path = Path(source).expanduser()
    try:
        if not path.exists():
            check_data_source(source)
            return _load_dataset(source, None, f"dataset {source!r} (not a local file, so it was looked up on the hub)")
        builder, files = _local_builder(path, source)
        if builder == "json":
            rows = [row for p in files for row in _json_rows(p)]
        else:
            rows = _load_dataset(builder, [str(p) for p in files], f"{source} as {builder}")
    except OSError as error:  # permissions, I/O: whatever stops the read
        raise UsageError(f"cannot read data file {error.filename or source}: {error.strerror or error}") from None
    if not rows:
        raise UsageError(f"{source} has no rows")
    return rows


def _load_dataset(name: str, data_files: list[str] | None, what: str) -> list[dict]:
    try:
        import datasets  # the data path's own dependency: the GPU machine and the engine do without it
    except ImportError:
        raise UsageError(f"reading {what} needs the datasets package: pip install datasets") from None
    try:
        with quiet_hub(datasets_too=True):
            table = datasets.load_dataset(name, data_files=data_files, split="train")
    except Exception as error:  # datasets reports parse and network failures with many exception types
        raise UsageError(f"could not read {what}: {_reason(error)}") from None
    return table.to_list()


def _json_rows(path: Path) -> list[dict]:
    """The rows of a JSON array of objects, or of JSON Lines (one object per line); an error names its line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}): "
                         "save it as UTF-8") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return []
    if text.lstrip().startswith("[") or not _parses(lines[0][1]):  # one JSON document
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"could not read {path} as json: line {error.lineno} column {error.colno}: "
                             f"{error.msg}") from None
        rows = document if isinstance(document, list) else [document]
        where = [f"item {i} of its JSON array" for i in range(1, len(rows) + 1)]
    else:
        rows, where = [], []
        for number, line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UsageError(f"could not read {path} as json lines: line {number} column {error.colno}: "
                                 f"{error.msg}") from None
            where.append(f"line {number}")
    for row, place in zip(rows, where):
        if not isinstance(row, dict):
            raise UsageError(f"{path}: {place} is a JSON {type(row).__name__}, not a JSON object (one row, "
                             'e.g. {"question": ..., "answer": ...})')
    return rows


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


@contextlib.contextmanager
def quiet_hub(datasets_too: bool = False):
    """No retry warnings from huggingface_hub (nor progress bars and logged errors from ``datasets``) while
    loading: a failure becomes one UsageError line."""
    from huggingface_hub.utils import logging as hub_logging

    hub_verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity(hub_logging.CRITICAL + 1)
    if datasets_too:
        import datasets

        verbosity, bars_were_on = datasets.logging.get_verbosity(), not datasets.utils.are_progress_bars_disabled()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        hub_logging.set_verbosity(hub_verbosity)
        if datasets_too:
            datasets.logging.set_verbosity(verbosity)
            if bars_were_on:
                datasets.enable_progress_bars()


def _local_builder(path: Path, source: str) -> tuple[str, list[Path]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_BUILDERS and p.is_file())
        if not files:
            raise UsageError(f"{source} is a directory with no .json, .jsonl, .parquet or .csv files in it")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"{source} is not a regular file (a device, a pipe, a socket?): give a data file")
    kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise UsageError(f"unsupported data file type {path.suffix or '(none)'}: use .json, .jsonl, .parquet or .csv")
    if len(kinds) > 1:
        raise UsageError(f"{source} mixes file types; keep one of .json/.jsonl, .parquet, .csv")
    for p in files:
        if p.stat().st_size == 0 or (p.suffix != ".parquet" and not p.read_bytes().strip()):
            raise UsageError(f"data file is empty: {p}")
    return kinds.pop(), files


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_BUILDERS or source.count("/") > 1


def _reason(error: BaseException) -> str:
    """The most specific message in the exception chain, on one line (datasets wraps parse errors)."""
    while type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------- row formats


def row_format(row: dict) -> str | None:
    """The first known format whose required fields the row has, or None. All of them None is none of them
    (a table that mixes formats fills each row's other columns with None)."""
    for name, required, _ in ROW_FORMATS:
        if all(key in row for key in required) and any(row[key] is not None for key in required):
            return name
    return None


def _fields(row: dict) -> str:
    return ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"


def to_messages(row: dict, fmt: str) -> list[dict] | None:
    """The row as chat messages ending in an assistant turn, or None if it has no usable answer."""
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"
            ):
                return None
            clean.append({"role": m["role"], "content": m["content"]})
        return clean if any(m["role"] == "assistant" for m in clean) else None
    if fmt == "instruction":
        prompt, answer = row.get("instruction"), row.get("output")
        extra = row.get("input")
        if isinstance(prompt, str) and isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    else:
        prompt_key, answer_key = next(required for name, required, _ in ROW_FORMATS if name == fmt)
        prompt, answer = row.get(prompt_key), row.get(answer_key)
    if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def rows_to_conversations(rows: Sequence[dict], source: str = "the data") -> tuple[list[list[dict]], int]:
    """Conversations of the rows that parse, and how many rows of a known format did not (non-text fields).

    Each row is read by its own fields, so one file may mix formats. Rows with none of the known fields
    are left out with a note on stderr; when no row has them, that is the error."""
    if not rows:
        raise UsageError(f"{source} has no rows")
    formats = [row_format(row) for row in rows]
    unknown = [i for i, fmt in enumerate(formats) if fmt is None]
    if len(unknown) == len(rows):
        raise UsageError(f"{source} has none of the known fields (found: {_fields(rows[0])}); "
                         f"expected {EXPECTED_FIELDS}")
    if unknown:
        print(f"lopt: note: left out {len(unknown)} of {len(rows)} rows of {source} with none of the known fields "
              f"(first: row {unknown[0] + 1}, found: {_fields(rows[unknown[0]])}); expected {EXPECTED_FIELDS}",
              file=sys.stderr)
    conversations = [to_messages(row, fmt) for row, fmt in zip(rows, formats) if fmt is not None]
    kept = [c for c in conversations if c is not None]
    if not kept:
        found = " / ".join(sorted({fmt for fmt in formats if fmt is not None}))
        raise UsageError(f"no row of {source} has a usable {found} answer; expected {EXPECTED_FIELDS} with text values")
    return kept, len(conversations) - len(kept)


# ---------------------------------------------------------------------------------------------- rendering


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of its assistant turns (what the model learns)."""
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain(tokenizer, messages, add_generation_prompt)

    def apply(msgs, generation_prompt=False):
        if not msgs and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = apply(messages, add_generation_prompt)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The turn is what the template adds between "prompt + assistant header" and "conversation so far":
        # the answer and its end-of-turn tokens.
        before, through = apply(messages[:i], True), apply(messages[: i + 1])
        start, end = len(before), len(through)
        if not (text.startswith(before) and text.startswith(through)):
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property:
            # find the answer's text instead, with the EOS right after it.
            start = text.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return text, spans


def _render_plain(tokenizer, messages, add_generation_prompt):
    pieces, spans, length = [], [], 0
    for message in messages:
        if message["role"] == "assistant":
            piece = message["content"] + (tokenizer.eos_token or "")
            spans.append((length, length + len(piece)))
        else:
            piece = message["content"] + "\n"
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces), spans


def _uses_template(tokenizer) -> bool:
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_conversations(conversations: Sequence[list[dict]], tokenizer, seq_len: int) -> list[Example]:
    """Tokenise, keep labels only on the assistant spans, truncate to ``seq_len`` tokens."""
    rendered = [render(tokenizer, messages) for messages in conversations]
    encoded = tokenizer(
        [text for text, _ in rendered],
        add_special_tokens=not _uses_template(tokenizer),
        return_offsets_mapping=True,
    )
    examples = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        labels = [
            token if any(tok_start < end and tok_end > start for start, end in spans) else IGNORE_INDEX
            for token, (tok_start, tok_end) in zip(ids, offsets)
        ]
        examples.append(Example(list(ids[:seq_len]), labels[:seq_len]))
    return examples


def eval_examples(conversations: Sequence[list[dict]], tokenizer, seq_len: int) -> list[EvalExample]:
    """Each conversation's prompt (everything before its last answer) and that answer's text."""
    prompts, answers = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(render(tokenizer, messages[:last], add_generation_prompt=True)[0])
        answers.append(messages[last]["content"])
    ids = tokenizer(prompts, add_special_tokens=not _uses_template(tokenizer))["input_ids"]
    return [EvalExample(list(p[-seq_len:]), a) for p, a in zip(ids, answers)]


# ---------------------------------------------------------------------------------------------- batching


def collate(examples: Sequence[Example], pad_token_id: int, pack_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: padding has attention_mask 0 and label -100.

    With ``pack_to``, examples are first packed (first fit, in order) into rows of at most that many
    tokens, and ``document_ids`` tells the engine where each example starts and ends.
    """
    import torch  # here, not at the top: `lopt train` checks --data paths before torch loads

    rows = [[e] for e in examples] if pack_to is None else _pack(examples, pack_to)
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    document_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for doc, e in enumerate(row):
            end = start + len(e.input_ids)
            input_ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start:end] = torch.tensor(e.labels)
            attention_mask[r, start:end] = 1
            document_ids[r, start:end] = doc
            start = end
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if pack_to is not None:
        batch["document_ids"] = document_ids
    return batch


def _pack(examples: Sequence[Example], capacity: int) -> list[list[Example]]:
    rows, room = [], []
    for e in examples:
        n = len(e.input_ids)
        fit = next((r for r, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([e])
            room.append(capacity - n)
        else:
            rows[fit].append(e)
            room[fit] -= n
    return rows


class StepSchedule:
    """Which examples each optimizer step uses: a seeded shuffle per epoch, cut into micro-batches.

    The order depends only on (seed, epoch, number of examples), so a resumed run rebuilds it from
    its position alone, and a step holds the same examples whatever the micro-batch split.
    """

    def __init__(self, num_examples: int, batch_size: int, grad_accum: int, seed: int):
        self.num_examples, self.batch_size, self.grad_accum, self.seed = num_examples, batch_size, grad_accum, seed
        self.examples_per_step = batch_size * grad_accum
        self.steps_per_epoch = math.ceil(num_examples / self.examples_per_step)

    def order(self, epoch: int) -> list[int]:
        indices = list(range(self.num_examples))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(indices)
        return indices

    def micro_batches(self, epoch: int, step_in_epoch: int, order: list[int] | None = None) -> list[list[int]]:
        order = self.order(epoch) if order is None else order
        start = step_in_epoch * self.examples_per_step
        chosen = order[start : start + self.examples_per_step]
        return [chosen[i : i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]


# --eval-split: a data set smaller than this keeps all its rows for training; at most this many are held out.
EVAL_SPLIT_MIN_ROWS, EVAL_SPLIT_MAX_ROWS = 20, 200


def split_rows(rows: list, share: float, seed: int) -> tuple[list, list | None]:
    """``rows`` less a seeded random ``share`` of them (whole rows, at most ``EVAL_SPLIT_MAX_ROWS``), and
    those; no split (None) for a share of 0 or fewer than ``EVAL_SPLIT_MIN_ROWS`` rows."""
    count = min(EVAL_SPLIT_MAX_ROWS, int(len(rows) * share))
    if len(rows) < EVAL_SPLIT_MIN_ROWS or count == 0:
        return rows, None
    held = set(random.Random(seed).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
