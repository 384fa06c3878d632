"""The trainer: the embedded default end to end, exact gradient accumulation, exact resume,
the early lower-block step, the optimizers and the schedule. CPU, tiny models, a few steps each."""

import json
import math

import pytest
from conftest import write_qa_file
import torch

from lopt.config import TrainConfig
from lopt.models.shapes import build_model, tiny_config
import lopt
import lopt_kernels.adamw
from lopt.training.optim import AdamW
from lopt.models.tokenizer import byte_tokenizer
from lopt.errors import UsageError
from lopt.training.trainer import Trainer, lr_factor, train


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """16 question/answer rows of unequal prompt and answer lengths."""
    return write_qa_file(tmp_path_factory.mktemp("data") / "qa.jsonl", 16)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(out / "final").named_parameters())


def small(tmp_path, name, model, data, **overrides):
    fields = dict(model=model, data=data, output_dir=str(tmp_path / name), lr=3e-3, save_every=0, seq_len=64)
    fields.update(overrides)
    return TrainConfig(**fields)


# ------------------------------------------------------------------------------------- the embedded default


def test_embedded_default_trains_evaluates_and_leaves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    summary = train(TrainConfig(output_dir=str(out), max_steps=4, save_every=2, eval_every=2, eval_max_examples=4,
                                keep_checkpoint=True))
    assert summary["status"] == "completed" and summary["steps"] == 4
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("eval_loss" in r) for r in rows] == [False, True, False, False]  # the end's eval is eval.json
    for key in ("loss", "task_loss", "aux_loss", "lr", "tokens_per_s", "step"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004"]  # only the latest kept
    assert not list(out.glob(".tmp-*"))
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["num_examples"] == 200 and evaluation["num_generated"] == 4
    assert math.isfinite(evaluation["loss"]) and 0 <= evaluation["exact_match"] <= 1
    assert summary["eval"]["loss"] == evaluation["loss"]

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 1?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4


def test_embedded_default_loss_falls_clearly_within_sixty_steps(tmp_path):
    summary = train(TrainConfig(output_dir=str(tmp_path / "run"), eval_max_examples=20))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 60
    first, last = rows[0]["task_loss"], sum(r["task_loss"] for r in rows[-10:]) / 10
    assert last < 0.65 * first, (first, last)  # measured: 5.55 -> about 2.8
    assert summary["eval"]["loss"] < 0.65 * first
    assert summary["eval"]["token_accuracy"] > 0.15  # the answers' tokens, teacher-forced


# ------------------------------------------------------------------------------------- exactness


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    """4 x 1, 2 x 2 and 1 x 4: the same 4 examples per step (unequal label counts), the same gradients."""
    grads = []  # per run: the gradients the optimizer sees at each step, in parameter-group order
    original = AdamW.step

    def recording_step(self, closure=None):
        grads[-1].append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return original(self, closure)

    monkeypatch.setattr(AdamW, "step", recording_step)
    runs = {}
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        grads.append([])
        out = tmp_path / f"b{batch_size}"
        train(small(tmp_path, out.name, tiny_model_dir, qa_file, batch_size=batch_size, grad_accum=accum,
                    max_steps=2, max_grad_norm=0.5))
        runs[batch_size] = (metrics(out), final_params(out), grads[-1])
    reference_rows, reference_params, reference_grads = runs[4]
    for batch_size in (2, 1):
        rows, params, step_grads = runs[batch_size]
        for a, b in zip(rows, reference_rows):
            for key in ("loss", "task_loss", "aux_loss", "grad_norm"):  # grad_norm: before clipping
                assert a[key] == pytest.approx(b[key], rel=1e-5 if a["step"] == 1 else 1e-4), (batch_size, key)
        # The first step starts from the same parameters: the same gradients, to roundoff. (The second
        # starts from parameters that Adam's roundoff amplification has moved by ~1e-6.)
        assert len(step_grads) == len(reference_grads) == 2
        for g, ref in zip(step_grads[0], reference_grads[0], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item(), msg=str(batch_size))
        # Adam turns roundoff in near-zero gradients into ~1e-3 of an update (lr 3e-3): nothing more.
        for name, p in params.items():
            torch.testing.assert_close(p, reference_params[name], rtol=0, atol=2e-5, msg=name)


def test_packing_gives_the_same_step(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    """--pack puts a micro-batch's examples into fewer rows; the gradients stay those of the padded batch."""
    grads, rows_seen = [], []
    original_step, original_train_step = AdamW.step, lopt.LoPTModel.train_step

    def recording_step(self, closure=None):
        grads[-1].append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return original_step(self, closure)

    def counting_train_step(self, batch, *args, **kwargs):
        rows_seen[-1].append(batch["input_ids"].shape[0])
        return original_train_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(AdamW, "step", recording_step)
    monkeypatch.setattr(lopt.LoPTModel, "train_step", counting_train_step)
    for pack in (False, True):
        grads.append([])
        rows_seen.append([])
        train(small(tmp_path, f"pack{pack}", tiny_model_dir, qa_file, batch_size=4, max_steps=1, pack=pack,
                    seq_len=128))
    assert rows_seen[0] == [4] and rows_seen[1][0] < 4  # the packed batch has fewer rows
    for g, ref in zip(grads[1][0], grads[0][0], strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_resume_continues_exactly(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    straight = tmp_path / "straight"
    train(small(tmp_path, "straight", tiny_model_dir, qa_file, batch_size=4, max_steps=6))

    # Stop the second run after step 3 the way Ctrl-C does (checkpoint, then return), then resume it.
    original = Trainer.optimizer_step

    def stop_after_three(self, micro_batches):
        result = original(self, micro_batches)
        if self.step == 2:  # this call makes step 3
            self.stop_requested = True
        return result

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_three)
    first = train(small(tmp_path, "resumed", tiny_model_dir, qa_file, batch_size=4, max_steps=6))
    assert first["status"] == "interrupted" and first["steps"] == 3
    assert (tmp_path / "resumed" / "checkpoint-000003" / "state.pt").is_file()
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    second = train(small(tmp_path, "resumed", tiny_model_dir, qa_file, batch_size=4, max_steps=6, resume=True))
    assert second["status"] == "completed" and second["steps"] == 6

    resumed = tmp_path / "resumed"
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(straight), metrics(resumed)):
        for key in ("loss", "task_loss", "aux_loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    reference = final_params(straight)
    for name, p in final_params(resumed).items():
        assert torch.equal(p, reference[name]), name


def test_early_lower_step_matches_the_plain_step(tmp_path, tiny_model_dir, qa_file):
    """Without clipping and with grad_accum 1 the arithmetic is the same: identical results."""
    outs = {}
    for early in (False, True):
        name = f"early{early}"
        train(small(tmp_path, name, tiny_model_dir, qa_file, batch_size=4, max_steps=3, max_grad_norm=0,
                    num_blocks=3, early_lower_step=early))
        outs[early] = tmp_path / name
    assert [r["loss"] for r in metrics(outs[True])] == [r["loss"] for r in metrics(outs[False])]
    reference = final_params(outs[False])
    for name, p in final_params(outs[True]).items():
        assert torch.equal(p, reference[name]), name


def test_sequential_schedule_matches_interleaved_with_accumulation(tmp_path, tiny_model_dir, qa_file):
    """Without clipping, per-block optimizers step what one optimizer would (AdamW is per parameter):
    the sequential schedule with --grad-accum 3 gives the interleaved run's weights exactly."""
    outs = {}
    for schedule in ("interleaved", "sequential"):
        train(small(tmp_path, schedule, tiny_model_dir, qa_file, batch_size=2, grad_accum=3, max_steps=3,
                    max_grad_norm=0, num_blocks=3, schedule=schedule))
        outs[schedule] = tmp_path / schedule
    # The logged aux loss sums the same terms in another order (by block, then micro-batch): equal to roundoff.
    for a, b in zip(metrics(outs["sequential"]), metrics(outs["interleaved"])):
        assert a["task_loss"] == b["task_loss"] and math.isclose(a["aux_loss"], b["aux_loss"], rel_tol=1e-6)
    reference = final_params(outs["interleaved"])
    for name, p in final_params(outs["sequential"]).items():
        assert torch.equal(p, reference[name]), name


def test_sequential_schedule_runs_the_fresh_boundary_with_accumulation(tmp_path, tiny_model_dir, qa_file):
    summary = train(small(tmp_path, "fresh", tiny_model_dir, qa_file, batch_size=2, grad_accum=2, max_steps=2,
                          schedule="sequential", boundary="fresh"))
    assert summary["status"] == "completed" and summary["steps"] == 2
    with pytest.raises(UsageError, match="drop --early-lower-step"):
        train(small(tmp_path, "both", tiny_model_dir, qa_file, max_steps=1, schedule="sequential",
                    early_lower_step=True))


@pytest.mark.parametrize("offload", [dict(offload="optimizer"), dict(offload="params", stream_state=True)],
                         ids=["optimizer", "params-streamed"])
def test_offload_changes_no_number_and_resumes(tmp_path, tiny_model_dir, qa_file, offload, monkeypatch):
    """--offload pages blocks through the host: the same losses and weights as the sequential schedule
    without it, also across a checkpoint written and resumed while paged."""
    common = dict(batch_size=2, grad_accum=2, num_blocks=3, schedule="sequential", lr=3e-3)
    train(small(tmp_path, "plain", tiny_model_dir, qa_file, max_steps=4, **common))
    original = Trainer.optimizer_step

    def stop_after_two(self, micro_batches):
        out = original(self, micro_batches)
        if self.step == 1:  # the second step: ask to stop, as Ctrl-C would
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_two)
    first = train(small(tmp_path, "paged", tiny_model_dir, qa_file, max_steps=4, **common, **offload))
    assert first["status"] == "interrupted" and first["steps"] == 2
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    train(small(tmp_path, "paged", tiny_model_dir, qa_file, max_steps=4, resume=True, **common, **offload))
    assert [r["loss"] for r in metrics(tmp_path / "paged")] == [r["loss"] for r in metrics(tmp_path / "plain")]
    reference = final_params(tmp_path / "plain")
    for name, p in final_params(tmp_path / "paged").items():
        assert torch.equal(p, reference[name]), name


def test_offload_needs_the_sequential_schedule(tmp_path, tiny_model_dir, qa_file):
    with pytest.raises(UsageError, match="needs --schedule sequential"):
        train(small(tmp_path, "a", tiny_model_dir, qa_file, max_steps=1, offload="params"))
    with pytest.raises(UsageError, match="needs --offload"):
        train(small(tmp_path, "b", tiny_model_dir, qa_file, max_steps=1, schedule="sequential", stream_state=True))


def test_early_lower_step_uses_one_optimizer_per_block(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    steps = []
    original = AdamW.step
    monkeypatch.setattr(AdamW, "step", lambda self, closure=None: (steps.append(len(self.param_groups)),
                                                                   original(self, closure))[1])
    train(small(tmp_path, "run", tiny_model_dir, qa_file, batch_size=4, max_steps=1, num_blocks=2,
                early_lower_step=True))
    assert len(steps) == 2  # the lower block's optimizer, then the upper's


# ------------------------------------------------------------------------------------- optimizers, schedule


@pytest.mark.parametrize("chunk", [None, 8])
def test_adamw_matches_torch_on_fp32_parameters(chunk, monkeypatch):
    if chunk:  # the PyTorch path, in slices of 8 values (the 5x7 matrix: 5 slices, the last one short)
        monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
        monkeypatch.setattr(lopt_kernels.adamw, "STEP_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    opt_ours, opt_theirs = AdamW(ours, **kwargs), torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_keeps_small_updates_of_bf16_parameters():
    """Steps of lr 1e-4 on weights of 1.0 are below half a bf16 unit (0.0039): plain bf16 AdamW loses
    every one; the fp32 master copy (adamw) and stochastic rounding (adamw-bf16) keep them."""
    start = torch.ones(1000, dtype=torch.bfloat16)

    def run(optimizer_class, **kwargs):
        p = torch.nn.Parameter(start.clone())
        opt = optimizer_class([p], lr=1e-4, weight_decay=0.0, **kwargs)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach(), opt

    p, opt = run(AdamW, state_dtype=torch.float32)
    master = opt.state[opt.param_groups[0]["params"][0]]["master"]
    assert master.dtype == torch.float32 and master.mean().item() == pytest.approx(1 - 1e-2, rel=1e-4)
    assert torch.equal(p, master.to(torch.bfloat16))
    p, _ = run(AdamW, state_dtype=torch.bfloat16)
    assert (1 - p.float().mean().item()) == pytest.approx(1e-2, rel=0.1)  # unbiased in expectation
    p, _ = run(torch.optim.AdamW)
    assert torch.equal(p, start)


def test_optimizer_8bit_without_bitsandbytes_is_a_clear_error(tmp_path, tiny_model_dir, qa_file):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    from lopt.errors import UsageError

    with pytest.raises(UsageError, match="pip install bitsandbytes"):
        train(small(tmp_path, "run", tiny_model_dir, qa_file, optimizer="adamw-8bit", max_steps=1))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] > 0.1 and lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("family, tied", [("qwen2", True), ("qwen3", False), ("mistral", False)])
def test_each_supported_family_trains_and_reloads(tmp_path, qa_file, family, tied):
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(family, vocab_size=264, tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    build_model(config, seed=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    summary = train(small(tmp_path, "run", str(tmp_path / "model"), qa_file, batch_size=4, max_steps=2))
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert reloaded.config.model_type == family
    assert not reloaded.config.tie_word_embeddings  # LoPT unties the head from the embeddings


def test_an_all_ones_mask_is_dropped_on_the_host_with_the_same_gradients():
    """The trainer drops an all-ones attention mask before the transfer (no device sync in the engine);
    the engine's gradients without it equal those with it."""
    from lopt.training.steps import to_device as _to_device

    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1] * 4 + [0]])}
    assert "attention_mask" in _to_device(padded, torch.device("cpu"))
    full = {"input_ids": torch.randint(0, 256, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    full["labels"] = full["input_ids"].clone()
    assert set(_to_device(full, torch.device("cpu"))) == {"input_ids", "labels"}

    grads = []
    for batch in (full, _to_device(full, torch.device("cpu"))):
        model = lopt.LoPTModel(build_model(tiny_config("llama", vocab_size=256), seed=0), num_blocks=2)
        model.train_step(batch)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for with_mask, without in zip(*grads):
        torch.testing.assert_close(without, with_mask, rtol=1e-5, atol=1e-7)


def test_lopt_train_is_the_trainer_function_whatever_was_imported_first():
    """The README's API: ``lopt.train(lopt.TrainConfig(...))``, even after ``lopt.training.trainer`` was imported."""
    import lopt
    import lopt.training.trainer

    assert lopt.train is lopt.training.trainer.train and callable(lopt.train)
