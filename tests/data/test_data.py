"""The data path: row formats, chat rendering, prompt masking, truncation, batching, loading files."""

import json

import pytest
import torch

from lopt.data.sft import (
    IGNORE_INDEX,
    StepSchedule,
    collate,
    eval_examples,
    load_rows,
    rows_to_conversations,
    tokenize_conversations,
)
from lopt.data.embedded import sft_splits
from lopt.errors import UsageError
from lopt.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def prompt_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])


ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Capital of France?"},
                              {"role": "assistant", "content": "Paris"}]},
    "instruction": {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    "query": {"query": "2 + 2?", "response": "4"},
    "question": {"question": "Opposite of hot?", "answer": "cold"},
    "prompt": {"prompt": "Once upon a", "completion": " time"},
}
ANSWERS = {"messages": "Paris", "instruction": "chat", "query": "4", "question": "cold", "prompt": " time"}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_row_format_is_rendered_with_the_chat_template_and_its_prompt_masked(tokenizer, fmt):
    conversations, skipped = rows_to_conversations([ROWS[fmt]])
    assert skipped == 0
    (example,) = tokenize_conversations(conversations, tokenizer, seq_len=512)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|system|>" if fmt == "messages" else "<|user|>")
    # Only the answer and its end-of-turn token are learned; everything before is masked.
    assert labelled_text(tokenizer, example) == ANSWERS[fmt] + "<|end|>"
    assert text.endswith("<|assistant|>" + ANSWERS[fmt] + "<|end|>")
    assert prompt_text(tokenizer, example) + ANSWERS[fmt] + "<|end|>" == text
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert all(label != IGNORE_INDEX for label in example.labels[first_label:])


def test_instruction_input_is_part_of_the_prompt(tokenizer):
    conversations, _ = rows_to_conversations([ROWS["instruction"]])
    assert conversations[0][0] == {"role": "user", "content": "Translate to French.\n\ncat"}
    no_input, _ = rows_to_conversations([{"instruction": "Say hi.", "output": "hi"}])
    assert no_input[0][0]["content"] == "Say hi."


def test_multi_turn_conversation_learns_every_assistant_turn(tokenizer):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]}
    (example,) = tokenize_conversations(rows_to_conversations([row])[0], tokenizer, seq_len=512)
    assert labelled_text(tokenizer, example) == "B<|end|>D<|end|>"
    assert prompt_text(tokenizer, example) == "<|user|>a<|end|><|assistant|><|user|>c<|end|><|assistant|>"


def test_tokenizer_without_chat_template_uses_plain_text_with_eos(tokenizer):
    plain = byte_tokenizer()
    plain.chat_template = None
    (example,) = tokenize_conversations(rows_to_conversations([ROWS["question"]])[0], plain, seq_len=512)
    assert plain.decode(example.input_ids) == "Opposite of hot?\ncold<|end|>"
    assert labelled_text(plain, example) == "cold<|end|>"


def test_truncation_to_seq_len_can_leave_no_label(tokenizer):
    row = {"question": "x" * 50, "answer": "yes"}
    (example,) = tokenize_conversations(rows_to_conversations([row])[0], tokenizer, seq_len=20)
    assert len(example.input_ids) == len(example.labels) == 20
    assert example.num_label_tokens == 0


def test_label_count_is_what_the_shifted_loss_counts(tokenizer):
    (example,) = tokenize_conversations(rows_to_conversations([ROWS["query"]])[0], tokenizer, seq_len=512)
    labels = torch.tensor([example.labels])
    assert example.num_label_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 2  # "4" and <|end|>


def test_rows_without_known_fields_name_the_expected_ones():
    with pytest.raises(UsageError, match="none of the known fields.*found: foo, text.*question \\+ answer"):
        rows_to_conversations([{"text": "hello", "foo": 1}], "data.jsonl")


def test_rows_with_non_text_answers_are_skipped_and_counted():
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": None}, {"question": "q3", "answer": ""}]
    conversations, skipped = rows_to_conversations(rows)
    assert len(conversations) == 1 and skipped == 2
    with pytest.raises(UsageError, match="no row"):
        rows_to_conversations([{"messages": [{"role": "user", "content": "no answer"}]}])


def test_rows_of_several_formats_in_one_file_all_load(tmp_path, capsys):
    """Each row is read by its own fields: a file may mix formats, and none of its rows is lost."""
    rows = [ROWS[fmt] for fmt in ROWS] * 2
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conversations, skipped = rows_to_conversations(load_rows(str(path)), str(path))
    assert skipped == 0 and len(conversations) == len(rows)
    assert [c[-1]["content"] for c in conversations] == [ANSWERS[fmt] for fmt in ROWS] * 2
    assert capsys.readouterr().err == ""


def test_a_table_of_several_formats_loads_every_row(tmp_path, capsys):
    """Parquet and CSV give every row every column (None where a row has none): that is not a field."""
    pytest.importorskip("datasets")
    import pandas as pd

    rows = [ROWS["question"], ROWS["prompt"], ROWS["query"]]
    pd.DataFrame(rows).to_parquet(tmp_path / "mixed.parquet")
    conversations, skipped = rows_to_conversations(load_rows(str(tmp_path / "mixed.parquet")))
    assert skipped == 0 and [c[-1]["content"] for c in conversations] == ["cold", " time", "4"]
    assert capsys.readouterr().err == ""


def test_rows_without_known_fields_are_left_out_counted_and_said(capsys):
    rows = [ROWS["question"], {"text": "a"}, ROWS["messages"], {"text": "b", "label": 1},
            {"question": "q", "answer": ""}]
    conversations, skipped = rows_to_conversations(rows, "data.jsonl")
    assert len(conversations) == 2
    assert skipped == 1  # the empty answer: a known format without a usable answer
    (note,) = capsys.readouterr().err.strip().splitlines()
    assert "2 of 5 rows of data.jsonl" in note and "none of the known fields" in note and "row 2" in note


def test_collate_pads_right_and_masks_padding(tokenizer):
    rows = [ROWS["question"], {"question": "Opposite of a long question?", "answer": "a short answer"}]
    examples = tokenize_conversations(rows_to_conversations(rows)[0], tokenizer, 512)
    batch = collate(examples, tokenizer.pad_token_id)
    short, long = sorted(range(2), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert batch["input_ids"].shape == (2, len(examples[long].input_ids))
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == examples[short].labels


def test_eval_examples_cut_before_the_last_answer(tokenizer):
    (example,) = eval_examples(rows_to_conversations([ROWS["messages"]])[0], tokenizer, seq_len=512)
    prompt = "<|system|>Be brief.<|end|><|user|>Capital of France?<|end|><|assistant|>"
    assert tokenizer.decode(example.prompt_ids) == prompt
    assert example.answer == "Paris"


def test_step_schedule_is_seeded_and_independent_of_the_micro_batch_split():
    a = StepSchedule(10, batch_size=4, grad_accum=1, seed=3)
    b = StepSchedule(10, batch_size=2, grad_accum=2, seed=3)
    assert a.steps_per_epoch == b.steps_per_epoch == 3
    assert a.order(0) == StepSchedule(10, 4, 1, seed=3).order(0) != a.order(1)
    assert sorted(a.order(0)) == list(range(10))
    for step in range(3):
        flat_a = [i for mb in a.micro_batches(0, step) for i in mb]
        flat_b = [i for mb in b.micro_batches(0, step) for i in mb]
        assert flat_a == flat_b
    assert b.micro_batches(0, 2) == [a.order(0)[8:10]]  # the last step is short


def test_embedded_sft_set_is_fixed_and_its_held_out_split_disjoint():
    train, held_out = sft_splits()
    assert (train, held_out) == sft_splits()
    assert len(held_out) == 200 and len(train) == 4000
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}


# ------------------------------------------------------------------------------------- loading files


def test_load_rows_reads_json_jsonl_csv_and_parquet(tmp_path):
    pytest.importorskip("datasets")
    import pandas as pd

    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert load_rows(str(tmp_path / name)) == rows, name


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "data file not found"),
        ("empty.jsonl", "", "data file is empty"),
        ("blank.json", "\n  \n", "data file is empty"),
        ("broken.json", '[{"question": "q", "answer": ', "could not read .* as json"),
        ("broken.jsonl", '{"question": "q", "answer": "a"}\nnot json\n', "could not read .*broken.jsonl.* line 2 "),
        ("broken2.json", '[{"question": "q", "answer": "a"},\n {"question": "q" "answer": "b"}]',
         "broken2.json.* line 2 column 19"),
        ("data.txt", "hello", "unsupported data file type .txt"),
    ],
)
def test_load_rows_bad_files(tmp_path, name, content, message):
    pytest.importorskip("datasets")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_rows(str(path))


def test_template_with_default_system_prompt_and_trailing_newlines(tokenizer):
    """A ChatML-style template (Qwen's shape): a system turn is added, each turn ends in a marker and a newline."""
    chatml = byte_tokenizer()
    chatml.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|system|>You are helpful.<|end|>\n{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    (example,) = tokenize_conversations(rows_to_conversations([ROWS["question"]])[0], chatml, seq_len=512)
    assert chatml.decode(example.input_ids).startswith("<|system|>You are helpful.<|end|>\n<|user|>\nOpposite")
    assert labelled_text(chatml, example) == "cold<|end|>\n"
    assert prompt_text(chatml, example).endswith("<|assistant|>\n")


def test_collate_packs_examples_first_fit_into_rows():
    from lopt.data.sft import Example, collate

    examples = [Example(list(range(1, n + 1)), [-100] * 2 + list(range(3, n + 1))) for n in (5, 7, 3, 6)]
    batch = collate(examples, pad_token_id=0, pack_to=10)
    # first fit: [5, 3] (8 tokens), [7] , [6]: rows of at most 10 tokens
    assert batch["input_ids"].shape == (3, 8)
    assert batch["document_ids"][0].tolist() == [0] * 5 + [1] * 3
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    assert batch["labels"][0].tolist() == [-100, -100, 3, 4, 5, -100, -100, 3]
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0]
    assert batch["document_ids"][2].tolist() == [0] * 6 + [-1] * 2
    assert batch["attention_mask"].sum() == sum(len(e.input_ids) for e in examples)
    assert "document_ids" not in collate(examples, pad_token_id=0)
