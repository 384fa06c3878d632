"""``--shard`` (``lopt.parallel.sharding``): 2 ranks on the CPU with gloo, each holding half of every decoder layer,
the embedding and the head (FSDP2), give the one-process run.

The ranks are forked as in ``tests/test_distributed.py`` (its helpers); references are one-process runs in
this process. Tiny model, a few steps each.
"""

import json
import signal
from pathlib import Path

import pytest
import torch

from lopt.training.checkpoint import read_checkpoint
from lopt.cli import EXIT_USAGE
from lopt.config import TrainConfig
from lopt.models.shapes import build_model, tiny_config
from lopt.errors import UsageError
from lopt.engine.model import LoPTModel
from lopt.training.run_dir import checkpoints
from lopt.models.tokenizer import byte_tokenizer
from lopt.training.trainer import train
from ranks import Ranks, argv, assert_same_run, flags, fork_ranks, kill_rank_1_after, metrics, run_ranks


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def family_model(family: str) -> LoPTModel:
    """A 5-layer model of ``family`` (odd sizes: vocab 101 and the head's rows do not split evenly over 2
    ranks), in 3 blocks."""
    extra = dict(sliding_window=6) if family == "mistral" else {}
    config = tiny_config(family, hidden_size=48, num_hidden_layers=5, vocab_size=101, **extra)
    return LoPTModel(build_model(config, seed=0), num_blocks=3, kernels=False)


def family_batches() -> list[dict]:
    """4 micro-batches of 2 rows of 13 tokens, one row of each padded after 9, one with packed documents."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(4):
        ids = torch.randint(0, 101, (2, 13), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        batch["labels"][0, :3] = -100  # a prompt
        if i == 3:
            batch["document_ids"] = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
        batches.append(batch)
    return batches


def step_totals(engine: LoPTModel, batches) -> tuple[int, int]:
    parts = [engine.unpack(b) for b in batches]
    return (sum(int((labels != -100).sum()) for _, _, labels, _ in parts),
            sum(int(mask.sum()) for _, mask, _, _ in parts))


def sharded_gradients(rank: int, size: int, port: int, out: Path):
    """One rank: each family's model sharded, this rank's micro-batches; rank 0 saves the whole gradients."""
    import torch.distributed as dist

    from lopt.parallel import sharding
    from lopt.parallel.world import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    world = World(rank, size)
    world.timeout_s = 60
    result = {}
    for family in FAMILIES:
        engine = family_model(family)
        batches = family_batches()
        total_tokens, total_positions = step_totals(engine, batches)
        sharding.shard_model(engine, world, torch.device("cpu"))
        for batch in batches[rank::size]:
            engine.train_step(batch, total_tokens=total_tokens, total_positions=total_positions)
        world.sum_grads(list(engine.parameters()), "summing the decoders' gradients")
        grads = {name: sharding.full(p.grad) for name, p in engine.named_parameters()}
        result[family] = dict(grads=grads, sharded=sorted(n for n, p in engine.named_parameters()
                                                          if sharding.is_sharded(p)))
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_gradients_equal_one_process_in_every_family(tmp_path, ranks):
    """The engine's step under FSDP2 (every layer, the embedding and norm+head sharded over 2 or 4 ranks, the
    decoders whole): each rank's share of the 4 micro-batches, the sum in backward, equals one process's
    gradients over all of them, for every parameter, in each family (Mistral with a sliding window). Over 4
    ranks the vocabulary's 101 rows split 26/26/26/23."""
    out = tmp_path / "grads.pt"
    assert fork_ranks(lambda rank, size, port: sharded_gradients(rank, size, port, out), ranks) == [0] * ranks
    result = torch.load(out, weights_only=False)
    for family in FAMILIES:
        engine = family_model(family)
        batches = family_batches()
        total_tokens, total_positions = step_totals(engine, batches)
        for batch in batches:
            engine.train_step(batch, total_tokens=total_tokens, total_positions=total_positions)
        got = result[family]["grads"]
        assert got.keys() == dict(engine.named_parameters()).keys()
        for name, p in engine.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=f"{family} {name}")
        sharded = result[family]["sharded"]
        assert all(not n.startswith("aux_decoders") for n in sharded)
        assert len(sharded) == sum(1 for n, _ in engine.named_parameters() if not n.startswith("aux_decoders"))


def test_two_sharded_ranks_give_the_one_process_run(tmp_path, tiny_model_dir, data):
    """--grad-accum 3 over 2 ranks: in every step rank 1 runs one micro-batch and a zero-weight copy (every
    rank must enter each unit's all-gathers and reduce-scatters as often), and in each epoch's short last
    step a copy only. Evaluation mid-run and at the end runs on both ranks (each forward gathers weights);
    rank 0 alone writes, and the checkpoint and final/ hold whole tensors."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", shard=True, save_every=2, eval_data=data,
                   eval_every=2, eval_max_examples=2, max_grad_norm=0.05)
    ranks = run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, shard=False, output_dir=str(tmp_path / "one"))))
    out = tmp_path / "ranks"
    assert_same_run(out, tmp_path / "one", tiny_model_dir)  # the clip is active: its norm is global
    assert [("eval_loss" in r) for r in metrics(out)] == [False, True, False, False]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    one_eval = (tmp_path / "one" / "eval.json").read_text()
    assert (out / "eval.json").read_text().count('"exact_match"') == one_eval.count('"exact_match"') == 2
    # The ranks' evaluation of the sharded model is the one process's evaluation of its model.
    sharded_eval, one_eval = (json.loads(t) for t in ((out / "eval.json").read_text(), one_eval))
    for result in (sharded_eval, sharded_eval["before"]):
        expected = one_eval if result is sharded_eval else one_eval["before"]
        assert result["exact_match"] == expected["exact_match"]
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    # The checkpoint holds whole tensors, one-process shaped: the model's and the optimizer state's.
    saved, reference = (read_checkpoint(d / "checkpoint-000004", torch.device("cpu")) for d in (out, tmp_path / "one"))
    assert {k: v.shape for k, v in saved["model"].items()} == {k: v.shape for k, v in reference["model"].items()}
    for mine, theirs in zip(saved["optimizers"], reference["optimizers"]):
        assert mine["state"].keys() == theirs["state"].keys()
        for index, state in theirs["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    assert mine["state"][index][key].shape == value.shape, (index, key)
                    torch.testing.assert_close(mine["state"][index][key], value, rtol=1e-3, atol=1e-6)
    assert "2 ranks (sharded data parallel)" in ranks.output(0)


def test_sharded_early_lower_step_reduces_each_block_at_its_boundary(tmp_path, tiny_model_dir, data):
    """--early-lower-step, 3 blocks: each lower block's reduce-scatter ends with its local backward, and the
    block is clipped and stepped there, sharded. The same as one process with the step in one micro-batch."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", shard=True, batch_size=3, grad_accum=2, num_blocks=3,
                   early_lower_step=True, max_grad_norm=0.05)
    run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, shard=False, output_dir=str(tmp_path / "one"), batch_size=6, grad_accum=1)))
    assert_same_run(tmp_path / "ranks", tmp_path / "one", tiny_model_dir)


def test_sharded_checkpoints_resume_anywhere(tmp_path, tiny_model_dir, data):
    """A sharded run's checkpoint is one process's: 2 sharded ranks' step 3 resumed by one process, and one
    process's resumed by 2 sharded ranks (the optimizer state loaded as each rank's slices), each give the
    straight 6 steps."""
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, grad_accum=2)
    straight = flags(tiny_model_dir, data, tmp_path / "straight", max_steps=6, **constant)
    train(TrainConfig(**straight))

    run_ranks(dict(straight, output_dir=str(tmp_path / "two-then-one"), max_steps=3, shard=True), tmp_path)
    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "two-then-one"), resume=True)))
    assert_same_run(tmp_path / "two-then-one", tmp_path / "straight", tiny_model_dir)

    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "one-then-two"), max_steps=3)))
    run_ranks(dict(straight, output_dir=str(tmp_path / "one-then-two"), resume=True, shard=True), tmp_path)
    assert_same_run(tmp_path / "one-then-two", tmp_path / "straight", tiny_model_dir)


def test_shard_refuses_what_it_cannot_run(tmp_path, monkeypatch, data):
    with pytest.raises(UsageError, match="--shard splits the model across torchrun's processes"):
        TrainConfig(shard=True).validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra, message in ((dict(schedule="sequential"), "--shard with --schedule sequential is not supported"),
                           (dict(offload="optimizer", schedule="sequential"), "--shard with --schedule sequential"),
                           (dict(optimizer="adamw-8bit"), "adamw-8bit is not supported"),
                           (dict(gpu_mem=24.0), "--recipe and --gpu-mem plan one process")):
        with pytest.raises(UsageError, match=message):
            TrainConfig(shard=True, **extra).validate()
    TrainConfig(shard=True, early_lower_step=True, grad_accum=2).validate()
    monkeypatch.delenv("WORLD_SIZE")
    # One block keeps a tied head tied to the embeddings: the two cannot be separate units.
    tied = tmp_path / "tied-model"
    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    build_model(config, seed=1).save_pretrained(tied)
    tokenizer.save_pretrained(tied)
    ranks = Ranks(argv(flags(str(tied), data, tmp_path / "tied", shard=True, num_blocks=1)), tmp_path)
    codes = ranks.wait()
    assert codes[0] == 2, ranks.output()
    assert "--shard with --num-blocks 1 on a model whose head shares the embedding matrix" in ranks.output(0)


def test_a_killed_sharded_rank_ends_the_job_with_one_line_and_a_usable_checkpoint(tmp_path, tiny_model_dir, data):
    """Rank 1 killed mid-run: rank 0's next all-gather or reduce-scatter (FSDP's, inside a forward or
    backward) or sum fails at once; it exits 2 with one line naming the last complete checkpoint, which
    one process resumes."""
    out = tmp_path / "run"
    fields = flags(tiny_model_dir, data, out, max_steps=10_000, save_every=1, dist_timeout=60, shard=True)
    ranks = kill_rank_1_after(fields, tmp_path)
    assert ranks.wait(timeout=30) == [EXIT_USAGE, -signal.SIGKILL], ranks.output()
    lines = [line for line in ranks.output(0).splitlines() if line.startswith("lopt: error:")]
    assert len(lines) == 1 and "Traceback" not in ranks.output(0), ranks.output(0)
    assert lines[0].startswith("lopt: error: rank 0: ") and "failed: another rank exited" in lines[0], lines[0]
    newest = checkpoints(out)[-1]
    assert f"the last complete checkpoint is {newest}" in lines[0]
    step = read_checkpoint(newest, torch.device("cpu"))["step"]
    summary = train(TrainConfig(**dict(fields, shard=False, resume=True, max_steps=step + 1)))
    assert summary["status"] == "completed" and summary["steps"] == step + 1
