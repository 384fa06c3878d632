"""The ZO study's methods: what each trains, which objective it optimises, the rates its sweep tries, and a
``Trainer`` that takes one step on a batch of the embedded sentiment task.

Objectives (B = 16 rows, MeZO's SST-2 prompt "{text} It was", candidates " terrible" / " great"):
- ``candidates``: cross-entropy over the two candidates' logits at the last prompt position
  (``lopt.measures.classification.candidate_loss``; the ZO engine's classification score is the same loss);
- ``candidates (full-vocab logits)``: the same loss computed as MeZO's trainer does (``benchmarks.zo.impls.
  published_loss``: full-vocabulary log-softmax, then the candidates' log-probabilities); equal in value;
- ``answer token, full vocab``: LoPT's ``train_step`` takes a causal-LM batch, so its task loss is the
  causal-LM cross-entropy over the whole vocabulary of the right answer token at the last prompt position
  (prompt masked), plus LoPT's reconstruction loss (lambda 10) for the lower block. It raises the right
  candidate's probability but does not only compare it with the other candidate.

Backprop methods: AdamW (weight decay 0), grad-norm clip 1.0, linear warm-up over ``WARMUP_STEPS`` then a
constant rate (the run's length is a wall-clock budget, so there is no step count to decay over). ZO methods:
MeZO's constant rate, eps 1e-3, one direction a step, no weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks.retention.methods import METHODS as RETENTION_METHODS

EPS = 1e-3
MAX_GRAD_NORM = 1.0
WARMUP_STEPS = 5
LORA = dict(RETENTION_METHODS["lora"].notes)  # rank 16, alpha 32, all linear layers (the retention study's)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    kind: str  # "zo" (lopt.zo.ZOEngine) | "mezo" (lopt.zo.reference.mezo_step) | "e2e" | "lopt" | "lora"
    objective: str
    lrs: tuple[float, ...]
    options: dict = field(default_factory=dict)

    @property
    def zeroth_order(self) -> bool:
        return self.kind in ("zo", "mezo")


METHODS = {m.name: m for m in (
    Method("mezo-loop", "MeZO's reference loop (lopt.zo.reference.mezo_step: in-place full-rank z, 4 passes) on the "
           "decoder linears", "mezo", "candidates (full-vocab logits)", (3e-5, 1e-4)),
    Method("zo-lowrank", "ZOEngine lowrank (LoZO U·Vᵀ, r 2, ν 50), all decoder linears", "zo", "candidates",
           (1e-4, 3e-4), dict(kind="lowrank")),
    Method("zo-fullrank", "ZOEngine fullrank (MeZO's noise from Philox; the CPU runs its PyTorch reference)", "zo",
           "candidates", (1e-4,), dict(kind="fullrank")),
    Method("zo-upper", "ZOEngine lowrank on the layers above the boundary only (first_layer = L/2)", "zo",
           "candidates", (1e-4, 3e-4), dict(kind="lowrank", upper_only=True)),
    Method("e2e", "end-to-end fine-tuning (AdamW, every parameter)", "e2e", "candidates", (1e-5, 5e-5)),
    Method("lopt-k2", "LoPT k=2 (lopt.LoPTModel.train_step, lambda 10), lower half at lr/10", "lopt",
           "answer token, full vocab (+ LoPT recon)", (1e-5, 5e-5), dict(num_blocks=2, lambda_aux=10.0,
                                                                         lr_lower=0.1)),
    Method("lora", "LoRA through peft, rank 16 (alpha 32) on all linear layers", "lora", "candidates", (2e-4, 1e-3)),
)}
ZO_METHODS = [name for name, m in METHODS.items() if m.zeroth_order]


def _tensors(obj, depth: int = 0):
    """The tensors held by ``obj`` (its attributes, lists and dicts, a few levels down)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 2 and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        for v in vars(obj).values():
            yield from _tensors(v, depth + 1)


class Trainer:
    """One method on ``model`` (a Hugging Face causal LM, trained in place). ``step(batch, t)`` trains on a
    collated classification batch and returns its loss (None: not finite, the run stops); ``scoring_model()``
    is the Hugging Face model with everything learnt so far in its weights (or adapters), for the measures;
    ``persistent()`` the tensors that live across steps (the byte counter's baseline)."""

    def __init__(self, method: Method, model, lr: float, seed: int, answer_pad: int = 0):
        self.method, self.model, self.lr, self.seed = method, model, lr, seed
        self.optimizer = None
        kind = method.kind
        if kind == "zo":
            from lopt.zo import ZOEngine, ZOSettings

            first = len(model.model.layers) // 2 if method.options.get("upper_only") else 0
            self.engine = ZOEngine(model, ZOSettings(kind=method.options["kind"], eps=EPS, lr=lr, first_layer=first,
                                                     seed=seed), kernels=False)
            self.trainable = sum(lin.weight.numel() for lin in self.engine.linears)
        elif kind == "mezo":
            from benchmarks.zo.impls import restrict, trained_names

            restrict(model, trained_names(model))
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        elif kind == "e2e":
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        elif kind == "lora":
            from peft import LoraConfig, get_peft_model

            self.peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
            self.model = self.peft.get_base_model()  # the same modules, the adapters injected
            self.optimizer = torch.optim.AdamW([p for p in self.peft.parameters() if p.requires_grad], lr=lr,
                                               weight_decay=0.0)
        elif kind == "lopt":
            from lopt import LoPTModel

            o = method.options
            self.lopt = LoPTModel(model, num_blocks=o["num_blocks"], lambda_aux=o["lambda_aux"], kernels=False)
            self.optimizer = torch.optim.AdamW(self.lopt.param_groups(lr, lr * o["lr_lower"]), weight_decay=0.0)
            self.answer_pad = answer_pad
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if self.optimizer is not None:
            self.peaks = [g["lr"] for g in self.optimizer.param_groups]
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.trainable = sum(p.numel() for p in params)

    def persistent(self) -> list[torch.Tensor]:
        held = [*self.model.parameters(), *self.model.buffers()]
        if self.method.kind == "zo":
            held += list(_tensors(self.engine.state))
        if self.method.kind == "lopt":
            held += list(self.lopt.aux_decoders.parameters())
        if self.optimizer is not None:
            held += list(_tensors(self.optimizer.state))
        return held

    def step(self, batch: dict, t: int) -> float | None:
        kind = self.method.kind
        if kind == "zo":
            from lopt.errors import NonFiniteLossError

            try:
                return self.engine.step(batch, t).loss
            except NonFiniteLossError:
                return None
        if kind == "mezo":
            from benchmarks.zo.impls import published_loss
            from lopt.zo.reference import mezo_step

            out = mezo_step(self.model, published_loss, batch, 1_000_003 * self.seed + t, eps=EPS, lr=self.lr)
            loss = (out.loss_plus + out.loss_minus) / 2
            return loss if _finite(loss) and _finite(out.projected_grad) else None
        factor = min(1.0, (t + 1) / WARMUP_STEPS)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak * factor
        if kind == "lopt":
            loss = self.lopt.train_step(answer_batch(batch, self.answer_pad)).task_loss
            params = list(self.lopt.parameters())
        else:
            from lopt.measures.classification import candidate_loss

            self.model.train()
            loss = candidate_loss(self.model, batch)
            loss.backward()
            params = [p for p in self.model.parameters() if p.requires_grad]
        value = float(loss.detach())
        if not _finite(value):
            return None
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def scoring_model(self):
        if self.method.kind == "zo":
            return self.engine.merged_model()  # lowrank: A·Vᵀ folded in (rounding only, training may go on)
        return self.model


def answer_batch(batch: dict, pad: int) -> dict:
    """A classification batch as LoPT's causal-LM batch: the prompt, then the right candidate's token; only that
    token is a label (the step shifts the labels, so it is predicted from the last prompt position)."""
    input_ids, mask, last = batch["input_ids"], batch["attention_mask"], batch["last_index"]
    rows = torch.arange(input_ids.shape[0])
    answer = batch["candidate_ids"][rows, batch["label"]]
    ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], pad)], dim=1)
    ids[rows, last + 1] = answer
    attention = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    attention[rows, last + 1] = 1
    labels = torch.full_like(ids, -100)
    labels[rows, last + 1] = answer
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
