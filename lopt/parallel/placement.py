"""Where the training state lives, chosen once at setup: whole on every rank, paged, sharded or staged.

``Whole``: every rank holds the whole model and optimizer state (one process, or data parallel).
``Paged``: the same, with the blocks that are not running waiting on the host (``--offload``; it is given
the offload, ``lopt.training.offload.BlockOffload``). ``Sharded``: each rank holds 1/N of them (``--shard``,
``lopt.parallel.sharding``). ``Staged``: rank r trains block r (``--pipeline``, ``lopt.parallel.pipeline``).

A placement owns what differs between them: which micro-batches a rank runs, how a block is clipped and
stepped, which tensors the finite check reads, how rank 0 comes to hold the whole state for a checkpoint,
an evaluation or ``final/``, and when a resumed run's optimizer state goes in. It receives the model, the
world and the run's optimizers (``lopt.training.optim.Optimizers``) and returns values; the step kinds
(``lopt.training.steps``) and the Trainer call it, never the other way round.
"""

from __future__ import annotations

import contextlib

import torch

from lopt.parallel import sharding


class Whole:
    """Every rank holds the whole model and optimizer state; rank r runs micro-batches r, r+N, ... of a step."""

    evaluates_together = False  # rank 0 holds the whole model: it evaluates alone

    def __init__(self, model, optimizers, world, device: torch.device):
        self.model, self.optimizers, self.world, self.device = model, optimizers, world, device

    def describe(self) -> str:
        """The run's kind of parallelism, for the start line (with more than one rank)."""
        return "data parallel"

    def uneven_note(self, grad_accum: int) -> str | None:
        """A note when the step's micro-batches do not divide among the ranks."""
        size = self.world.size
        if not grad_accum % size:
            return None
        return (f"note: --grad-accum {grad_accum} does not divide among {size} ranks: in each step some ranks run one "
                f"micro-batch fewer (and add zero gradients when they have none); a multiple of {size} keeps every "
                "rank busy")

    def guard(self):
        """Around the steps: collectives that others start (none here)."""
        return contextlib.nullcontext()

    def place(self):
        """Put the state where this placement keeps it, once every rank holds rank 0's weights (nothing to do)."""

    def load_optimizer_states(self, states: list[dict]):
        """A resumed run's optimizer states (laid out for the run's optimizers)."""
        self.optimizers.load(states)

    # ----------------------------------------------------------------------------- a step

    def micro_batches(self, count: int) -> range:
        """The indices of this rank's micro-batches of a step of ``count``; an index >= ``count`` is a filler."""
        return range(self.world.rank, count, self.world.size)

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Scale ``params``' gradients to a norm of at most ``max_norm``; returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step_block(self, b: int):
        """Step optimizer ``b`` and free its gradients."""
        optimizer = self.optimizers.all[b]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def skip_block(self, b: int):
        """Drop optimizer ``b``'s gradients without a step (they were not finite)."""
        self.optimizers.all[b].zero_grad(set_to_none=True)

    def state_tensors(self) -> list[torch.Tensor]:
        """What the finite check reads: every parameter and floating optimizer state tensor this rank holds."""
        return self._params() + self._optimizer_state_tensors()

    def _params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def _optimizer_state_tensors(self) -> list[torch.Tensor]:
        return [v for optimizer in self.optimizers.all for state in optimizer.state.values()
                for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]

    # ----------------------------------------------------------------------------- rank 0's whole state

    def gather_for_evaluation(self, step: int):
        """Before rank 0 evaluates mid-run: its model whole (it is). Every rank calls it."""

    def checkpoint_state(self, step: int) -> tuple[dict, list[dict]] | None:
        """The model's and the optimizers' whole state dicts on rank 0, None elsewhere. Every rank calls it."""
        if not self.world.is_main:
            return None
        return self.model.state_dict(), self.optimizers.state_dicts()

    def final_weights(self) -> dict | None:
        """The causal LM's weights for ``final/`` when they must be gathered first; None: the model's own."""
        return None


class Folded(Whole):
    """``--method zo``: the whole model on every rank, as ``Whole``; the ZO engine (``lopt.zo``) keeps a low-rank
    update beside the weights, folded into them (on every rank alike) before the model is evaluated or saved."""

    def __init__(self, model, optimizers, world, device: torch.device, engine):
        super().__init__(model, optimizers, world, device)
        self.engine = engine

    def describe(self) -> str:
        return "ZO data parallel: the ranks exchange only the step's losses"

    def gather_for_evaluation(self, step: int):
        self.engine.merged_model()

    def final_weights(self) -> dict | None:
        self.engine.merged_model()
        return None


class Paged(Whole):
    """``--offload``: every rank holds the whole state, but the blocks not running wait on the host; the
    offload (``lopt.training.offload.BlockOffload``) steps each block and pages it back."""

    def __init__(self, model, optimizers, world, device: torch.device, offload):
        super().__init__(model, optimizers, world, device)
        self.offload = offload

    def load_optimizer_states(self, states: list[dict]):
        super().load_optimizer_states(states)
        self.offload.page_out()  # the loaded state and weights go where the offload keeps them

    def step_block(self, b: int):
        self.offload.step_block(b)

    def skip_block(self, b: int):
        super().skip_block(b)
        self.offload.page_out()

    def state_tensors(self) -> list[torch.Tensor]:
        """What is on the device; reading the host copies each step would cost more."""
        tensors = super().state_tensors()
        self.offload.synchronize()
        return [t for t in tensors if t.device == self.device]

    def checkpoint_state(self, step: int) -> tuple[dict, list[dict]] | None:
        if not self.world.is_main:
            return None
        return self.model.state_dict(), self.offload.state_dicts()  # read from the host once the copies are done


class Sharded(Whole):
    """``--shard``: each rank holds 1/N of the weights, gradients and optimizer state (FSDP2). Every rank runs
    as many micro-batches (a rank one short repeats one at weight 0), the ranks evaluate together, and each
    tensor is gathered whole for rank 0 to write."""

    evaluates_together = True  # the model is whole only across the ranks

    def __init__(self, model, optimizers, world, device: torch.device):
        super().__init__(model, optimizers, world, device)
        self._saved: list[dict] | None = None  # a resumed run's optimizer states, loaded as shards by place()

    def describe(self) -> str:
        return "sharded data parallel"

    def guard(self):
        """FSDP's own all-gathers and reduce-scatters, in every forward and backward, may lose a peer too."""
        return self.world.guard("a sharded step's gathers and sums")

    def place(self):
        """Split the model across the ranks and build the optimizers over the shards; a resumed run's optimizer
        state (one-process shaped) goes in as each rank's slice."""
        sharding.shard_model(self.model, self.world, self.device)
        self.optimizers.rebuild(self.model)
        if self._saved is not None:
            self.optimizers.load([sharding.shard_optimizer_state(optimizer, saved)
                                  for optimizer, saved in zip(self.optimizers.all, self._saved)])
        self._saved = None

    def load_optimizer_states(self, states: list[dict]):
        self._saved = states  # loaded as shards once the model is split (place)

    def micro_batches(self, count: int) -> range:
        """Every rank enters each unit's collectives as often: the step is padded to a multiple of the ranks."""
        return range(self.world.rank, -(-count // self.world.size) * self.world.size, self.world.size)

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return sharding.clip_grad_norm(params, max_norm, self.world)

    def _params(self) -> list[torch.Tensor]:
        return [sharding.local(p) for p in self.model.parameters()]

    def checkpoint_state(self, step: int) -> tuple[dict, list[dict]] | None:
        """Every rank gathers each tensor in turn, and rank 0 keeps it."""
        keep = self.world.is_main
        model_state = sharding.full_state(self.model, keep=keep)
        optimizer_states = [sharding.full_optimizer_state(o, keep=keep) for o in self.optimizers.all]
        return (model_state, optimizer_states) if keep else None

    def final_weights(self) -> dict | None:
        return sharding.full_state(self.model.model, keep=self.world.is_main)


class Staged(Whole):
    """``--pipeline``: rank r trains block r of copy r // K (``lopt.parallel.pipeline.Pipeline``); every rank keeps
    the whole model object, but rank 0 gathers the blocks before it evaluates or writes."""

    def __init__(self, model, optimizers, world, device: torch.device, pipeline):
        super().__init__(model, optimizers, world, device)
        self.pipeline = pipeline

    def describe(self) -> str:
        if self.pipeline.copies > 1:
            return f"pipeline: block r % {self.pipeline.stages} on rank r, {self.pipeline.copies} copies"
        return "pipeline: block r on rank r"

    def uneven_note(self, grad_accum: int) -> str | None:
        return None

    def load_optimizer_states(self, states: list[dict]):
        """A resumed rank reads every block's state: it keeps its own block's."""
        super().load_optimizer_states(states)
        for b, optimizer in enumerate(self.optimizers.all):
            if b != self.pipeline.stage:
                optimizer.state.clear()

    def gather_for_evaluation(self, step: int):
        self.pipeline.gather_weights(step)

    def checkpoint_state(self, step: int) -> tuple[dict, list[dict]] | None:
        """Rank 0 holds only its own block's state: every rank sends it its block first."""
        optimizer_states = self.pipeline.gather_state(step)
        if not self.world.is_main:
            return None
        return self.model.state_dict(), optimizer_states
