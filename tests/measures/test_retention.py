"""Retention measures at toy size: deterministic, KL of a model from itself is 0 and grows with a
perturbation, the text NLL is the hand-computed one."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lopt.models.shapes import build_model, tiny_config
from lopt.measures.retention import (
    GENERAL_PROMPTS,
    GENERAL_TEXT_TOKENS,
    RetentionProbe,
    general_text,
    kl_from_reference,
    reference,
    text_nll,
)
from lopt.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    config = tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return build_model(config, seed=5).eval()


def perturbed(model, scale, seed=0):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return other


def test_general_text_is_the_fixed_slice_of_the_python_reference(tokenizer):
    from pydoc_data.topics import topics

    chunks = general_text(tokenizer, chunk_len=100, num_tokens=1000)
    assert chunks.shape == (10, 100)
    # The byte tokenizer: the first 1000 characters (ASCII there) of the topics in sorted order.
    expected = tokenizer("\n\n".join(topics[k] for k in sorted(topics))[:1000], add_special_tokens=False)["input_ids"]
    assert chunks.flatten().tolist() == expected
    assert torch.equal(general_text(tokenizer, 100, 1000), chunks)
    assert general_text(tokenizer, 1000, 4096).shape == (16, 256)  # chunks capped at MAX_CHUNK_LEN
    assert general_text(tokenizer, 64).shape == (GENERAL_TEXT_TOKENS // 64, 64)


def test_text_nll_equals_a_hand_computation(model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 2
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:36]
    chunks = torch.tensor(ids).view(3, 12)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:  # each position scored from its own prefix, one forward per position
            for t in range(1, len(chunk)):
                logits = model(input_ids=chunk[None, :t]).logits[0, -1]
                total -= F.log_softmax(logits.double(), -1)[chunk[t]].item()
                count += 1
    assert count == 3 * 11
    assert text_nll(model, chunks, batch_size=2) == pytest.approx(total / count, rel=1e-6)
    assert math.isclose(text_nll(model, chunks, batch_size=2), text_nll(model, chunks, batch_size=2))


def test_kl_of_a_model_from_itself_is_zero_and_grows_with_a_perturbation(model, tokenizer):
    ref = reference(model, tokenizer, batch_size=8, prompts=GENERAL_PROMPTS[:6], answer_tokens=8)
    assert len(ref.sequences) == 6 and ref.log_probs.shape[1] == model.config.vocab_size
    assert ref.log_probs.shape[0] == sum(len(s) - a for s, a in zip(ref.sequences, ref.answer_starts))
    same = kl_from_reference(model, ref, batch_size=8)
    assert same["kl"] == 0.0
    kls = [kl_from_reference(perturbed(model, scale), ref, batch_size=8)["kl"] for scale in (0.05, 0.2, 0.8)]
    assert 0 < kls[0] < kls[1] < kls[2], kls
    # The reference's greedy answer is its own argmax: its NLL can only rise under a big perturbation.
    assert kl_from_reference(perturbed(model, 0.8), ref, batch_size=8)["answer_nll"] > same["answer_nll"]


def test_the_probe_is_deterministic_and_measures_against_the_model_as_built(model, tokenizer):
    working = copy.deepcopy(model)
    probe = RetentionProbe(working, tokenizer, chunk_len=64, batch_size=8)
    before = probe.measure(working)
    assert before == probe.measure(working)
    assert before == RetentionProbe(copy.deepcopy(model), tokenizer, 64, 8).measure(model)
    assert before["kl"] == 0.0 and before["kl_positions"] > len(GENERAL_PROMPTS)
    assert before["general_tokens"] == GENERAL_TEXT_TOKENS and before["chunk_len"] == 64
    with torch.no_grad():  # training moves the model; the probe keeps the original's answers
        for p in working.parameters():
            p.mul_(1.1)
    after = probe.measure(working)
    assert after["kl"] > 0 and after["general_nll"] != before["general_nll"]


def test_the_trainer_records_task_score_and_retention_before_and_after(tmp_path, tiny_model_dir, capsys):
    import json

    from lopt.config import TrainConfig
    from lopt.training.trainer import train

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say {w}.", "answer": w}) + "\n"
                            for w in ("red", "green", "blue", "cyan", "black", "white", "pink", "grey")))
    common = dict(model=tiny_model_dir, data=str(data), eval_data=str(data), seq_len=48, batch_size=4,
                  save_every=0, lr=3e-3, max_steps=2)
    summary = train(TrainConfig(output_dir=str(tmp_path / "run"), **common))
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result == json.loads(json.dumps(summary["eval"]))
    before = result["before"]
    assert before["kl"] == 0.0 and result["kl"] > 0
    for key in ("general_nll", "answer_nll", "loss", "exact_match"):
        assert math.isfinite(before[key]) and math.isfinite(result[key]), key
    assert result["general_nll"] != before["general_nll"] and result["loss"] != before["loss"]
    assert before["answer_agreement"] == 1.0 and 0 <= result["answer_agreement"] <= 1
    assert len(result["answer_samples"]) == 4 and all(s["prompt"] in GENERAL_PROMPTS for s in result["answer_samples"])
    from lopt.cli import summary_text

    text = summary_text(summary, TrainConfig(**common))
    assert f"KL from the original: 0.0000 -> {result['kl']:.4f}" in text
    assert f"general-text NLL: {before['general_nll']:.4f} -> {result['general_nll']:.4f}" in text
    assert "exact match: " in text and f"task loss: {before['loss']:.4f} -> {result['loss']:.4f}" in text
    assert f"agreeing with the original's (first 8 tokens): 100% -> {result['answer_agreement']:.0%}" in text
    assert "KL from the original" not in capsys.readouterr().err  # the summary is printed once, by the CLI

    train(TrainConfig(output_dir=str(tmp_path / "plain"), retention=False, **common))
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    assert "kl" not in plain and "general_nll" not in plain and "loss" in plain["before"]


def test_lopt_eval_measures_any_model_against_a_reference(tmp_path, tiny_model_dir, capsys):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopt.cli import main

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say {w}.", "answer": w}) + "\n" for w in ("red", "blue", "pink")))
    moved = tmp_path / "moved"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    perturbed(model, 0.3).save_pretrained(moved)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(moved)

    args = ["eval", "--model", str(moved), "--reference", tiny_model_dir, "--data", str(data), "--seq-len", "32"]
    assert main([*args, "--output", str(tmp_path / "moved.json")]) == 0
    assert main(["eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, "--data", str(data),
                 "--seq-len", "32", "--output", str(tmp_path / "same.json")]) == 0
    out = capsys.readouterr().out
    same, moved_result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("same", "moved"))
    assert same["kl"] == 0.0 and moved_result["kl"] > 0
    assert same["num_examples"] == 3 and moved_result["general_nll"] != same["general_nll"]
    assert f"KL from the reference: {moved_result['kl']:.4f}" in out
    assert f"general-text NLL: {same['general_nll']:.4f}" in out


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "1"], "--seq-len must be an integer from 2"),
    (["--batch-size", "0"], "--batch-size must be an integer from 1"),
    (["--eval-max-examples", "-1"], "--eval-max-examples must be an integer from 0"),
    (["--output", "{tmp}/no-such-dir/out.json"], "--output .*: give a file in an existing directory"),
    (["--output", "{tmp}"], "--output .*: give a file in an existing directory"),
])
def test_lopt_eval_refuses_bad_flags_before_loading(tmp_path, capsys, flags, message):
    """One line, exit 2, and no model loaded (the --model path does not even exist)."""
    from lopt.cli import main

    flags = [f.format(tmp=tmp_path) for f in flags]
    assert main(["eval", "--model", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def _always_starting_with(model, tokenizer, token_id, prompts):
    """The model with just enough extra logit on ``token_id`` (a bias on the head) that its greedy answer to
    every prompt now starts with that token, as a model trained into one answer format does: a small
    change of every teacher-forced distribution, a different answer to every prompt."""
    ref = reference(model, tokenizer, batch_size=8, prompts=prompts, answer_tokens=1)
    first = ref.log_probs  # one position per prompt: the first answer token's log-probabilities
    margin = (first.max(-1).values - first[:, token_id]).max().item()
    changed = copy.deepcopy(model)
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = margin + 0.05
    changed.lm_head.bias = torch.nn.Parameter(bias)
    return changed


def test_own_answers_flag_a_format_change_that_teacher_forced_measures_miss(model, tokenizer):
    """The blind spot the own-answer measure closes: KL and the NLL of the original's answers, both
    teacher-forced on the original's answers, barely move, while the model's own answers all change."""
    from lopt.measures.retention import own_answers

    prompts = GENERAL_PROMPTS[:8]
    ref = reference(model, tokenizer, batch_size=8, prompts=prompts, answer_tokens=12)
    token = tokenizer.convert_tokens_to_ids("n") if "n" in tokenizer.get_vocab() else tokenizer("n")["input_ids"][-1]
    assert not any(answer[0] == token for answer in ref.answer_ids())
    changed = _always_starting_with(model, tokenizer, token, prompts)

    same, same_kl = own_answers(model, tokenizer, ref, batch_size=8), kl_from_reference(model, ref, batch_size=8)
    moved, moved_kl = own_answers(changed, tokenizer, ref, batch_size=8), kl_from_reference(changed, ref, batch_size=8)
    assert same["answer_agreement"] == 1.0 and same["answer_kept"] == 1.0
    assert moved_kl["kl"] < 0.05 and abs(moved_kl["answer_nll"] - same_kl["answer_nll"]) < 0.05, moved_kl
    assert moved["answer_agreement"] == moved["first_token_agreement"] == moved["answer_kept"] == 0.0, moved
    assert len(moved["answer_samples"]) == 4
    assert all(s["answer"] != s["original"] for s in moved["answer_samples"])


def test_answers_agreement_counts_the_first_tokens_and_the_kept_prefix():
    from lopt.measures.retention import AGREEMENT_TOKENS, answers_agreement

    original = list(range(20))
    late_change = original[:AGREEMENT_TOKENS] + [99] * (20 - AGREEMENT_TOKENS)
    early_change = [0, 1, 99] + original[3:]
    result = answers_agreement([original, late_change, early_change, [5]], [original] * 4)
    assert result["answer_agreement"] == pytest.approx(2 / 4)
    assert result["first_token_agreement"] == pytest.approx(3 / 4)
    assert result["answer_kept"] == pytest.approx((1 + AGREEMENT_TOKENS / 20 + 2 / 20 + 0) / 4)
