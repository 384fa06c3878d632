"""The classification format: both row shapes, every error as one line naming file and line, raw prompts
tokenised with single-token candidates, the ZO batch, and candidate scoring against full-vocabulary logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors

from lopt.data.classification import (
    SST2_LABEL_WORDS,
    SST2_TEMPLATE,
    ClassificationExample,
    collate_classification,
    load_classification,
    parse_rows,
    tokenize_classification,
)
from lopt.errors import UsageError
from lopt.measures.classification import accuracy, candidate_logits, candidate_loss
from lopt.models.shapes import build_model, tiny_config
from lopt.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def usage_error(path, rows, **kwargs) -> str:
    with pytest.raises(UsageError) as error:
        load_classification(write(path, rows), **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- parsing


def test_both_row_shapes_parse_with_index_or_text_answers(tmp_path):
    path = write(tmp_path / "rows.jsonl", [
        {"prompt": "2 + 2 =", "candidates": [" 3", " 4"], "answer": 1},
        {"prompt": "Sky:", "candidates": [" blue", " green"], "answer": " blue"},
        "",  # blank lines are skipped
        {"text": "A fine film.", "label": 1},
        {"text": "A dull film.", "label": "terrible"},  # a label word without its space
        {"text": "Fine.", "label": " great"},
    ])
    rows = load_classification(path)
    assert [(r.prompt, r.candidates, r.answer) for r in rows] == [
        ("2 + 2 =", (" 3", " 4"), 1),
        ("Sky:", (" blue", " green"), 0),
        ("A fine film. It was", SST2_LABEL_WORDS, 1),
        ("A dull film. It was", SST2_LABEL_WORDS, 0),
        ("Fine. It was", SST2_LABEL_WORDS, 1),
    ]
    assert [r.where for r in rows] == [f"{path} line {n}" for n in (1, 2, 4, 5, 6)]
    assert SST2_TEMPLATE == "{text} It was" and SST2_LABEL_WORDS == (" terrible", " great")


def test_a_template_and_label_words_of_ones_own_and_a_json_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "5 > 3", "label": "yes"}, {"text": "{x}", "label": 0}]))
    rows = load_classification(path, template="Q: {text} A:", label_words=[" no", " yes"])
    assert [(r.prompt, r.answer, r.where) for r in rows] == [("Q: 5 > 3 A:", 1, f"{path} item 1"),
                                                            ("Q: {x} A:", 0, f"{path} item 2")]
    assert parse_rows([{"text": "t", "label": 1}], source="mine")[0].where == "mine row 1"


@pytest.mark.parametrize("rows, expected", [
    (['{"prompt": "a", "candidates": ["x", "y"], "answer": 0}', '{"prompt": "b",'], "line 2: bad JSON"),
    ([{"question": "a", "answer": "b"}], "line 1: missing field 'prompt' or 'text' (found: answer, question)"),
    ([{"prompt": "a", "answer": 0}], "line 1: missing field 'candidates'"),
    ([{"prompt": "a", "candidates": ["x", "y"]}], "line 1: missing field 'answer'"),
    ([{"text": "a"}], "line 1: missing field 'label'"),
    ([{"prompt": "a", "candidates": ["x", "y"], "answer": "z"}],
     "line 1: answer \"z\" is not one of the candidates ['x', 'y']: give its index (0 to 1) or its exact text"),
    ([{"prompt": "a", "candidates": ["x", "y"], "answer": 2}], "line 1: answer 2 is not one of the candidates"),
    ([{"prompt": "a", "candidates": ["x", "y"], "answer": True}], "line 1: answer true is not one of"),
    ([{"text": "a", "label": "fine"}], "line 1: label \"fine\" is not one of the candidates [' terrible', ' great']"),
    ([{"prompt": "a", "candidates": ["x"], "answer": 0}], "line 1: candidates must be a list of at least two"),
    ([{"prompt": "a", "candidates": ["x", "x"], "answer": 0}], "line 1: candidates repeat a string"),
    ([{"prompt": "", "candidates": ["x", "y"], "answer": 0}], "line 1: prompt must be a non-empty string"),
    ([{"text": 3, "label": 0}], "line 1: text must be a non-empty string, got 3"),
    (["[1, 2]"], "item 1: a JSON int, not an object"),
    (["7"], "line 1: a JSON int, not an object"),
    ([{"text": "a", "label": 0}, {"prompt": "b", "candidates": ["x", "y", "z"], "answer": 0}],
     "line 2: 3 candidates, but"),
])
def test_each_bad_row_is_one_line_naming_file_and_line(tmp_path, rows, expected):
    path = tmp_path / "bad.jsonl"
    message = usage_error(path, rows)
    assert message.startswith(str(path)) and expected in message, message


def test_file_errors(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        load_classification(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(UsageError, match="data file is empty"):
        load_classification(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(UsageError, match=r"latin.jsonl line 2 is not UTF-8 text \(byte 0xe9\)"):
        load_classification(tmp_path / "latin.jsonl")
    with pytest.raises(UsageError, match=r"has no \{text\}"):
        parse_rows([{"text": "a", "label": 0}], template="It was")


def test_a_candidate_of_several_tokens_is_refused_naming_its_first_row(tmp_path, tokenizer):
    path = write(tmp_path / "rows.jsonl", [{"prompt": "a", "candidates": ["x", "y"], "answer": 0},
                                           {"text": "good film", "label": 1}])
    with pytest.raises(UsageError) as error:  # byte tokenizer: " terrible" is 9 tokens
        tokenize_classification(load_classification(path), tokenizer)
    message = str(error.value)
    assert message.startswith(f"{path} line 2: candidate ' terrible' is 9 tokens for this tokenizer")
    assert "single-token answers from the last prompt position" in message and "one token each" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- tokenising


def rows_of(prompts_and_answers, candidates=("a", "b", "c")):
    return parse_rows([{"prompt": p, "candidates": list(candidates), "answer": a} for p, a in prompts_and_answers])


def test_prompts_are_tokenised_raw_without_the_chat_template(tokenizer):
    rows = rows_of([("Is it A?", 0), ("Pick:", "c")])
    examples = tokenize_classification(rows, tokenizer)
    assert getattr(tokenizer, "chat_template", None)  # the tokenizer has one, and it is not used
    assert [tokenizer.decode(e.input_ids) for e in examples] == ["Is it A?", "Pick:"]
    ids = [tokenizer.convert_tokens_to_ids(c) for c in "abc"]
    assert [(e.candidate_ids, e.label) for e in examples] == [(ids, 0), (ids, 2)]
    # seq_len keeps the end of the prompt: the scored position.
    (cut,) = tokenize_classification(rows[:1], tokenizer, seq_len=3)
    assert tokenizer.decode(cut.input_ids) == " A?"


def test_the_bos_is_added_as_the_tokenizer_adds_it_by_default():
    tokenizer = byte_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|system|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", bos)])
    (example,) = tokenize_classification(rows_of([("Hi", 1)]), tokenizer)
    assert example.input_ids == [bos, *tokenizer("Hi", add_special_tokens=False)["input_ids"]]
    assert example.candidate_ids == [tokenizer.convert_tokens_to_ids(c) for c in "abc"]  # no BOS on candidates


def test_collate_right_pads_and_points_at_each_last_prompt_token(tokenizer):
    examples = tokenize_classification(rows_of([("abcdef", 0), ("ab", 1), ("abcd", 2)]), tokenizer)
    batch = collate_classification(examples, pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "last_index", "candidate_ids", "label"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 6)
    assert batch["candidate_ids"].shape == (3, 3)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["last_index"].tolist() == [5, 1, 3]
    assert batch["label"].tolist() == [0, 1, 2]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["input_ids"][row, batch["last_index"][row]].item() == e.input_ids[-1]
    with pytest.raises(ValueError, match="different numbers of candidates"):
        collate_classification([ClassificationExample([1], [2, 3], 0), ClassificationExample([1], [2, 3, 4], 0)], 0)


# ---------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def naive_scores(model, examples):
    """Per example: the full-vocabulary log-softmax at the last prompt position (float64, unpadded forward),
    restricted to the candidates; cross-entropy over them and whether the right one is highest."""
    losses, right = [], []
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, -1].double()
        logp = torch.log_softmax(logits, -1)[e.candidate_ids]
        losses.append(-(logp[e.label] - torch.logsumexp(logp, 0)).item())
        right.append(int(logp.argmax()) == e.label)
    return sum(right) / len(examples), sum(losses) / len(examples)


@pytest.mark.parametrize("family, tied", [("llama", False), ("qwen2", True)])
def test_accuracy_matches_a_full_vocabulary_log_softmax_restricted_to_the_candidates(tokenizer, family, tied):
    config = tiny_config(family, vocab_size=len(tokenizer), tie_word_embeddings=tied, num_hidden_layers=2)
    model = build_model(config, seed=3, dtype=torch.float64)
    prompts = ["x" * (1 + i % 7) + str(i) for i in range(13)]
    examples = tokenize_classification(rows_of([(p, i % 3) for i, p in enumerate(prompts)]), tokenizer)
    model.train()
    expected_accuracy, expected_loss = naive_scores(model.eval(), examples)
    model.train()
    for batch_size in (1, 4, 13):  # right padding changes nothing
        score = accuracy(model, examples, batch_size, pad_token_id=tokenizer.pad_token_id)
        assert score.count == 13
        assert score.accuracy == pytest.approx(expected_accuracy, abs=1e-12)
        assert score.loss == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    assert model.training  # its mode is restored
    batch = collate_classification(examples, tokenizer.pad_token_id)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at_last = full[torch.arange(13), batch["last_index"]]
    torch.testing.assert_close(candidate_logits(model, batch), at_last.gather(1, batch["candidate_ids"]))
    assert candidate_loss(model, batch).item() == pytest.approx(
        F.cross_entropy(at_last.gather(1, batch["candidate_ids"]), batch["label"]).item(), rel=1e-9)
