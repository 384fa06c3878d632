"""Self-replay (lopt.training.replay): the model's own finished answers become training conversations, in the share
--replay asks for, and none of its prompts is a retention prompt."""

import json

import pytest

import lopt.training.replay as replay
from lopt.models.shapes import build_model, tiny_config
from lopt.measures.retention import GENERAL_PROMPTS
from lopt.models.tokenizer import byte_tokenizer


def test_replay_prompts_are_not_the_retention_prompts():
    assert len(set(replay.REPLAY_PROMPTS)) == len(replay.REPLAY_PROMPTS) >= 40
    assert not set(replay.REPLAY_PROMPTS) & set(GENERAL_PROMPTS)


def test_finished_answers_become_conversations_and_cut_ones_are_left_out(monkeypatch):
    tokenizer = byte_tokenizer()
    model = build_model(tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    eos = tokenizer.eos_token_id
    said = {"A?": tokenizer.encode(" Paris. ", add_special_tokens=False) + [eos],
            "B?": tokenizer.encode("and so on", add_special_tokens=False),  # cut: no end-of-sequence token
            "C?": [eos]}  # empty

    def answers(model, tok, prompt_ids, max_new_tokens, batch_size):
        assert max_new_tokens == replay.REPLAY_ANSWER_TOKENS and len(prompt_ids) == 3
        return list(said.values())

    monkeypatch.setattr(replay, "greedy_answers", answers)
    conversations = replay.replay_conversations(model, tokenizer, batch_size=2, prompts=tuple(said))
    assert conversations == [[{"role": "user", "content": "A?"}, {"role": "assistant", "content": "Paris."}]]
    assert model.training  # left as it was


@pytest.mark.parametrize("task, share, expected", [(300, 0.25, 100), (10, 0.5, 10), (7, 0.0, 0)])
def test_replay_makes_the_share_asked_for(task, share, expected):
    assert replay.replay_count(task, share) == expected
    assert replay.repeated(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert replay.repeated([], 3) == []


def test_lopt_train_mixes_the_replay_in(capsys, tmp_path, tiny_model_dir, data, monkeypatch):
    """15 task rows and --replay 0.5: 15 replay examples from the model's own (here: stubbed) answers."""
    from lopt.cli import main

    monkeypatch.setattr(replay, "greedy_answers",
                        lambda model, tok, prompt_ids, n, b: [tok.encode("Yes.", add_special_tokens=False)
                                                              + [tok.eos_token_id]] * len(prompt_ids))
    code = main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--batch-size", "2", "--no-retention", "--replay", "0.5"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    assert "self-replay" in next(line for line in captured.out.splitlines() if line.startswith("time: "))
    assert f"{len(replay.REPLAY_PROMPTS)} of its answers ended" in err and "15 replay examples (50%" in err
    assert ": 30 examples" in err and "with 50% self-replay" in err  # the start line counts both
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["replay"] == 0.5
