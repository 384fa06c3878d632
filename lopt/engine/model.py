"""The LoPT engine: a Hugging Face causal LM split into blocks at stop-gradient boundaries.

Block b < k-1 learns only from its auxiliary decoder's reconstruction of its own input; the last
block, the final norm and the head learn only from the task loss. The paper's code adds the two
losses and runs one backward, so every lower-block activation lives until the end of the step. Here
each lower block runs forward, reconstruction loss and backward before the next block starts, so its
activations die at the boundary: peak activation memory is the largest block's, not the sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

import lopt_kernels
from lopt_kernels.boundary import BoundaryMemory

from lopt.settings import API, Say, refuse
from lopt.models.shapes import SUPPORTED_FAMILIES
from lopt.data.sft import IGNORE_INDEX
from lopt.engine import attention
from lopt.engine.batch import unpack_batch
from lopt.engine.head import head_loss
from lopt.engine.param_groups import adamw_groups, split_by_block
from lopt.engine.recompute import apply_recompute, hf_checkpoints

# How the step functions' callbacks that step a lower block are named in their messages (lopt.settings).
_ON_BOUNDARY = Say("api", {"block_step": "on_boundary"})
_ON_BLOCK_DONE = Say("api", {"block_step": "on_block_done"})


class StepOutput(NamedTuple):
    """What one ``train_step`` reports; all detached."""

    loss: torch.Tensor  # task_loss + lambda_aux * aux_loss
    task_loss: torch.Tensor  # mean cross-entropy over the micro-batch's label tokens
    aux_loss: torch.Tensor  # mean over the boundaries of each block's reconstruction loss
    num_tokens: torch.Tensor  # label tokens in the micro-batch (int64)


class AuxDecoder(nn.Module):
    """LayerNorm(h) -> Linear(h, h/4) -> GELU -> Linear(h/4, h): rebuilds a block's input from its output."""

    def __init__(self, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_size // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size // 4, hidden_size)
        # Small init: the decoder starts near zero so the first reconstruction loss is ~ E[x^2], not huge.
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, block_output: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(block_output))))

    def recon_loss(self, block_output, target, mask=None, *, fused: bool) -> torch.Tensor:
        """Mean squared error of the reconstruction over hidden units and unmasked positions."""
        op = lopt_kernels.recon_loss if fused else lopt_kernels.recon_loss_reference
        return op(
            block_output, target, self.norm.weight, self.norm.bias,
            self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            mask=mask, eps=self.norm.eps,
        )


def split_layers(num_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of near-equal size; earlier blocks take the remainder."""
    base, extra = divmod(num_layers, num_blocks)
    ranges, start = [], 0
    for b in range(num_blocks):
        end = start + base + (1 if b < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _check_architecture(hf_model: nn.Module) -> None:
    decoder = getattr(hf_model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not hasattr(hf_model, "lm_head") or not all(hasattr(decoder, n) for n in needed):
        arch = type(hf_model).__name__
        raise ValueError(
            f"unsupported architecture {arch}: LoPT needs a decoder-only causal LM exposing model.embed_tokens, "
            f"model.layers, model.norm, model.rotary_emb and lm_head "
            f"(supported families: {', '.join(SUPPORTED_FAMILIES)})"
        )


def _untie_embeddings(hf_model: nn.Module) -> None:
    """Give lm_head its own weight: with two or more blocks the embeddings learn from block 0's local loss
    only and the head from the task loss, so one shared matrix cannot serve both. The cost: one more
    vocab x hidden matrix, its gradient and its optimizer state (SmolLM2-135M: 49152 x 576 = 28.3M)."""
    embed, head = hf_model.model.embed_tokens, hf_model.lm_head
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    hf_model.config.tie_word_embeddings = False
    text_config = getattr(hf_model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False


class LoPTModel(nn.Module):
    """Wraps a Hugging Face causal LM (in place) for LoPT training.

    Args:
        hf_model: a Llama / Qwen2 / Qwen3 / Mistral-style causal LM; ``.model`` keeps pointing at it.
        num_blocks: how many blocks the layers are split into (1 = plain end-to-end training).
        lambda_aux: weight of the mean reconstruction loss in the objective.
        recompute: ``"none"``; ``"full"`` (every layer's activations recomputed in backward);
            ``"selective"`` (only the MLPs', the largest intermediates).
        kernels: run through lopt_kernels' fused ops (default: where CUDA and Triton are present).
        boundary_memory: how lower-block memory is returned at the boundary
            (``"auto" | "extension" | "torch"``, see ``lopt_kernels.boundary``).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        num_blocks: int = 2,
        lambda_aux: float = 10.0,
        recompute: str = "none",
        kernels: bool | None = None,
        boundary_memory: str = "auto",
    ):
        super().__init__()
        _check_architecture(hf_model)
        num_layers = len(hf_model.model.layers)
        refuse(dict(num_blocks=num_blocks, layers=num_layers, recompute=recompute), API)
        if lambda_aux < 0:
            raise ValueError(f"lambda_aux must be >= 0, got {lambda_aux}")

        if num_blocks > 1:  # one block is plain fine-tuning: a tied head stays tied
            _untie_embeddings(hf_model)
        self.model = hf_model
        self.num_blocks = num_blocks
        self.lambda_aux = float(lambda_aux)
        self.recompute = recompute
        self.block_ranges = split_layers(num_layers, num_blocks)
        hidden_size = hf_model.config.hidden_size
        param = next(hf_model.parameters())
        self.aux_decoders = nn.ModuleList(AuxDecoder(hidden_size) for _ in range(num_blocks - 1)).to(
            device=param.device, dtype=param.dtype
        )

        if kernels is None:
            kernels = param.device.type == "cuda" and lopt_kernels.current_backend(param.device) == "triton"
        self.kernels = bool(kernels)
        if self.kernels:
            lopt_kernels.patch(hf_model)
        self.boundary = BoundaryMemory(boundary_memory)
        apply_recompute(hf_model.model.layers, recompute)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None, **kwargs):
        """Load what ``lopt train --model`` takes (a Hugging Face directory, a ``.gguf`` file,
        ``smollm2-135m-instruct``, ``tiny``; see ``lopt.models.loading``) and wrap it. ``lopt.models.loading.load_model``
        also returns the tokenizer."""
        from lopt.models.loading import load_model

        return cls(load_model(model, dtype=dtype, device=device).model, **kwargs)

    # ------------------------------------------------------------------ the training step

    def train_step(
        self,
        batch: Mapping[str, torch.Tensor],
        loss_scale: float = 1.0,
        total_tokens: torch.Tensor | int | None = None,
        total_positions: torch.Tensor | int | None = None,
        on_boundary: Callable[[int], None] | None = None,
        boundary: str = "stale",
    ) -> StepOutput:
        """Forward and backward of one micro-batch; gradients accumulate in ``.grad`` (no optimizer step).

        ``batch`` holds ``input_ids``, optionally ``attention_mask`` (1 = real token), ``labels``
        (default: the input ids with padding set to -100; the step shifts them) and, for rows that pack
        several examples, ``document_ids`` (which example each token belongs to: attention stays
        inside an example and positions restart at each one).

        For gradient accumulation pass the optimizer step's totals over all its micro-batches:
        ``total_tokens`` (label tokens) and ``total_positions`` (unmasked positions). The
        micro-batches' gradients then add up to exactly those of one large batch.

        ``on_boundary(b)`` runs right after lower block b's backward, while its gradients are complete
        and before the next block runs: an optimizer can step that block there and free its gradients.

        ``boundary`` says what the next block trains on. ``"stale"`` (the paper's released code): block
        b's output from the forward pass, computed before its update. ``"fresh"`` (the paper's text):
        after ``on_boundary(b)`` has stepped block b, its output is recomputed under no_grad from its
        input (block 0: the updated embeddings), one extra forward of the block without stored activations.
        """
        refuse(dict(boundary=boundary, block_step=on_boundary is not None, num_blocks=self.num_blocks), _ON_BOUNDARY)
        input_ids, attention_mask, labels, document_ids = self.unpack(batch)
        positions = attention_mask.bool() if attention_mask is not None else None
        num_tokens = (labels != IGNORE_INDEX).sum()
        if positions is not None:
            num_positions = positions.sum()
        else:
            num_positions = torch.tensor(input_ids.numel(), device=input_ids.device)
        task_weight = loss_scale * share(num_tokens, total_tokens)
        aux_weight = loss_scale * share(num_positions, total_positions)

        layer_inputs = self.layer_inputs(input_ids.shape, input_ids.device, attention_mask, document_ids)
        hidden = self.model.model.embed_tokens(input_ids)
        hidden, aux_losses = self.lower_blocks(hidden, layer_inputs, positions, aux_weight=aux_weight,
                                               on_boundary=on_boundary, boundary=boundary, input_ids=input_ids)

        # Last block: task loss only. Its activations (or, with recompute, only the layer inputs) live
        # until this backward, so the step's peak is the largest block's, not the sum over blocks.
        block_output = self.run_block(self.num_blocks - 1, hidden, layer_inputs)
        task_loss = self.task_loss(self.model.model.norm(block_output), labels)
        if task_loss.requires_grad:
            (task_loss * task_weight).backward()
        loss, task_loss, aux_loss = self.lopt_loss(task_loss.detach(), aux_losses)
        return StepOutput(loss, task_loss, aux_loss, num_tokens)

    def objective(self, batch: Mapping[str, torch.Tensor]):
        """The LoPT objective in one graph, as the paper's released code computes it.

        ``task + lambda_aux * mean_b(aux_b)`` with stop-gradients at the boundaries: one backward of it
        gives the same gradients as ``train_step`` but keeps every block's activations alive until the
        end. It is the reference for tests and the ``lopt-paper`` benchmark method.
        """
        input_ids, attention_mask, labels, document_ids = self.unpack(batch)
        positions = attention_mask.bool() if attention_mask is not None else None
        layer_inputs = self.layer_inputs(input_ids.shape, input_ids.device, attention_mask, document_ids)
        hidden = self.model.model.embed_tokens(input_ids)
        hidden, aux_losses = self.lower_blocks(hidden, layer_inputs, positions)
        block_output = self.run_block(self.num_blocks - 1, hidden, layer_inputs)
        task_loss = self.task_loss(self.model.model.norm(block_output), labels)
        return self.lopt_loss(task_loss, aux_losses)

    def lower_blocks(self, hidden, layer_inputs, positions, *, aux_weight=None, on_boundary=None,
                     boundary: str = "stale", input_ids=None):
        """Run blocks 0..k-2 from the embeddings ``hidden``; returns the last block's input and the aux losses.

        With ``aux_weight`` (the step's schedule) each block's reconstruction loss, times
        ``aux_weight * lambda_aux / (k-1)``, is backpropagated at once and the returned losses are
        detached. Without it (the one-graph objective) the losses keep their graphs. Either way each
        boundary is a stop-gradient: block b+1 gets block b's output detached.
        """
        aux_losses = []
        for b, decoder in enumerate(self.aux_decoders):
            if aux_weight is None:
                block_output = self.run_block(b, hidden, layer_inputs)
                aux_losses.append(decoder.recon_loss(block_output, hidden.detach(), positions, fused=self.kernels))
                hidden = block_output.detach()
                continue
            block_input = hidden.detach()
            hidden, aux = self.local_step(b, hidden, layer_inputs, positions, aux_weight)
            aux_losses.append(aux)
            if on_boundary is not None:
                on_boundary(b)
            if boundary == "fresh":  # block b has stepped: hand on what its updated weights compute
                with torch.no_grad():
                    if b == 0:  # block 0 owns the embeddings, which have stepped too
                        block_input = self.model.model.embed_tokens(input_ids)
                    hidden = self.run_block(b, block_input, layer_inputs)
            del block_input  # not held through the next block's step
        return hidden, aux_losses

    def local_step(self, b: int, hidden, layer_inputs, positions, aux_weight):
        """Lower block b: forward, reconstruction loss and its backward (times ``aux_weight * lambda / (k-1)``)
        now. The block's saved activations are freed here, before the next block allocates its own; only
        the detached output crosses the boundary. Returns it and the loss, detached."""
        block_input = hidden.detach()
        with self.boundary.block(keep=[hidden]):
            block_output = self.run_block(b, hidden, layer_inputs)
            aux = self.aux_decoders[b].recon_loss(block_output, block_input, positions, fused=self.kernels)
            if aux.requires_grad:
                (aux * (aux_weight * self.lambda_aux / (self.num_blocks - 1))).backward()
        return block_output.detach(), aux.detach()

    def sequential_step(self, micro_batches, on_block_done: Callable[[int], None] | None = None,
                        boundary: str = "stale", loss_scale: float = 1.0,
                        total_tokens: torch.Tensor | int | None = None,
                        total_positions: torch.Tensor | int | None = None) -> StepOutput:
        """All of one optimizer step's micro-batches, one block at a time.

        Block b runs every micro-batch (forward, its loss, backward) before block b+1 starts, and
        ``on_block_done(b)`` (lower blocks) can step block b and free its gradients there: only one block's
        gradients need to exist at a time, with any number of micro-batches. The price is the stash: each
        micro-batch's detached boundary activations, kept until the next block has used them (M + 1 of them at
        once with the stale boundary; the fresh one keeps a block's M inputs until its outputs are recomputed).

        ``boundary="stale"``: each block sees the weights and inputs ``train_step`` would, so the gradients
        equal ``train_step``'s over the same micro-batches with their totals. ``"fresh"``: after block b's
        step its outputs are recomputed under no_grad with the updated weights (block 0: from the updated
        embeddings), the paper's described schedule with gradient accumulation. The last block is left
        for the caller to step. Returns the token-weighted task loss and the position-weighted aux loss.

        ``total_tokens`` / ``total_positions`` default to these micro-batches' own; pass the step's when the
        step's other micro-batches run elsewhere (another rank).
        """
        refuse(dict(boundary=boundary, block_step=on_block_done is not None, num_blocks=self.num_blocks),
               _ON_BLOCK_DONE)
        parts = [self.unpack(mb) for mb in micro_batches]
        tokens = [(labels != IGNORE_INDEX).sum() for _, _, labels, _ in parts]
        positions = [torch.tensor(ids.numel(), device=ids.device) if mask is None else mask.sum()
                     for ids, mask, _, _ in parts]
        total_tokens = sum(tokens) if total_tokens is None else total_tokens
        total_positions = sum(positions) if total_positions is None else total_positions
        layer_inputs = [self.layer_inputs(ids.shape, ids.device, mask, docs) for ids, mask, _, docs in parts]
        stash, aux_loss = self._lower_blocks_in_turn(parts, layer_inputs, positions, total_positions, loss_scale,
                                                     on_block_done, boundary)
        task_loss = self._upper_block_in_turn(parts, stash, layer_inputs, tokens, total_tokens, loss_scale)
        # the inputs' device: under weight offload the embeddings may be on the host by now
        device = parts[0][0].device if parts else self.model.model.embed_tokens.weight.device
        task_loss, aux_loss = (torch.as_tensor(x, device=device, dtype=torch.float32) for x in (task_loss, aux_loss))
        return StepOutput(task_loss + self.lambda_aux * aux_loss, task_loss, aux_loss, torch.as_tensor(sum(tokens)))

    def _lower_blocks_in_turn(self, parts, layer_inputs, positions, total_positions, loss_scale, on_block_done,
                              boundary):
        """``sequential_step``'s lower blocks, each over every micro-batch (weighted by its share of the
        positions); returns the last block's inputs (the stash) and the aux loss."""
        masks = [None if mask is None else mask.bool() for _, mask, _, _ in parts]
        stash = [None] * len(parts)  # each micro-batch's input to the current block (None: the embeddings)
        aux_loss = 0.0
        for b in range(self.num_blocks - 1):
            inputs, stash, aux_b = stash, [None] * len(parts), 0.0
            for i, (input_ids, *_) in enumerate(parts):
                hidden = self.model.model.embed_tokens(input_ids) if b == 0 else inputs[i]
                weight = share(positions[i], total_positions)
                stash[i], aux = self.local_step(b, hidden, layer_inputs[i], masks[i], loss_scale * weight)
                aux_b = aux_b + aux * weight
                if boundary == "stale" and b > 0:  # used: fresh recomputes from it after the step, stale is done
                    inputs[i] = None
            aux_loss = aux_loss + aux_b / (self.num_blocks - 1)
            if on_block_done is not None:
                on_block_done(b)
            if boundary == "fresh":
                with torch.no_grad():
                    stash = [self.run_block(b, self.model.model.embed_tokens(ids) if b == 0 else inputs[i],
                                             layer_inputs[i]) for i, (ids, *_) in enumerate(parts)]
            del inputs  # block b's inputs are not held through block b+1
        return stash, aux_loss

    def _upper_block_in_turn(self, parts, stash, layer_inputs, tokens, total_tokens, loss_scale):
        """``sequential_step``'s last block over every micro-batch (weighted by its share of the label tokens),
        each input freed from ``stash`` as it is used; returns the weighted task loss."""
        task_loss = 0.0
        for i, (input_ids, _, labels, _) in enumerate(parts):
            hidden = self.model.model.embed_tokens(input_ids) if self.num_blocks == 1 else stash[i]
            stash[i] = None
            block_output = self.run_block(self.num_blocks - 1, hidden, layer_inputs[i])
            task = self.task_loss(self.model.model.norm(block_output), labels)
            weight = share(tokens[i], total_tokens)
            if task.requires_grad:
                (task * (loss_scale * weight)).backward()
            task_loss = task_loss + task.detach() * weight
        return task_loss

    def lopt_loss(self, task_loss, aux_losses):
        """The objective's formula, its one definition: ``(task + lambda_aux * mean_b(aux_b), task, mean aux)``."""
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else torch.zeros_like(task_loss)
        return task_loss + self.lambda_aux * aux_loss, task_loss, aux_loss

    # ------------------------------------------------------------------ the pieces of a step, one block at a time
    # (public: lopt.parallel.pipeline runs one block of each micro-batch through them, lopt.engine.integration the model's forward)

    def unpack(self, batch):
        """``(input_ids, attention_mask, labels, document_ids)`` of a batch, the labels shifted (position t's is
        token t+1) and ignored (-100) past each row's end and across packed examples' borders."""
        return unpack_batch(batch)

    def layer_inputs(self, shape, device, attention_mask, document_ids=None, position_ids=None) -> dict:
        """What every decoder layer takes besides the hidden states: positions, rotary cos/sin, mask.

        Positions count from 0 in each row, restart where a packed example starts (``document_ids``), or
        are the caller's ``position_ids``.
        """
        decoder = self.model.model
        position_ids = attention.position_ids(shape, device, document_ids, position_ids)
        dtype = decoder.embed_tokens.weight.dtype
        with torch.no_grad():
            probe = torch.empty(0, device=device, dtype=dtype)
            position_embeddings = decoder.rotary_emb(probe, position_ids)
        masks = attention.layer_masks(self.model.config, len(decoder.layers), attention_mask, document_ids, shape[1],
                                      device, dtype)
        return dict(position_ids=position_ids, position_embeddings=position_embeddings, masks=masks)

    def run_block(self, b: int, hidden, layer_inputs):
        """Block b's layers on ``hidden``; ``layer_inputs`` from ``layer_inputs``. No loss, no backward."""
        start, end = self.block_ranges[b]
        if torch.is_grad_enabled() and not hidden.requires_grad and hf_checkpoints(self.model.model.layers[start]):
            # A reentrant checkpoint (Hugging Face's, with use_reentrant=True) gives a layer's weights gradients
            # only when its input requires grad; a detached boundary does not, and the block would not learn.
            hidden = hidden.detach().requires_grad_()
        for i in range(start, end):
            out = self.model.model.layers[i](
                hidden,
                attention_mask=layer_inputs["masks"][attention.layer_type(self.model.config, i)],
                position_ids=layer_inputs["position_ids"],
                position_embeddings=layer_inputs["position_embeddings"],
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def task_loss(self, normed_hidden, labels):
        """Mean cross-entropy over the label tokens (``lopt.engine.head``: a plain linear head fused, any other
        head, a LoRA adapter or a quantised linear, run as a module)."""
        return head_loss(self.model.lm_head, normed_hidden, labels, fused=self.kernels)

    # ------------------------------------------------------------------ inference, optimizer, saving

    def forward(self, input_ids, attention_mask=None):
        """Inference: the wrapped model's logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def lower_parameters(self):
        """Parameters trained by the local losses: embeddings, lower blocks, decoders."""
        params = list(self.model.model.embed_tokens.parameters()) if self.num_blocks > 1 else []
        for start, end in self.block_ranges[:-1]:
            for layer in self.model.model.layers[start:end]:
                params += list(layer.parameters())
        return params + list(self.aux_decoders.parameters())

    def upper_parameters(self):
        """Parameters trained by the task loss: last block, final norm, head (everything when k = 1)."""
        lower = {id(p) for p in self.lower_parameters()}
        return [p for p in self.parameters() if id(p) not in lower]

    def param_groups(self, lr: float, lr_lower: float | None = None, weight_decay: float = 0.0):
        """AdamW groups: lower half at ``lr_lower`` (default ``lr``); no decay on vectors (norms, biases)."""
        return adamw_groups((("upper", self.upper_parameters(), lr),
                             ("lower", self.lower_parameters(), lr if lr_lower is None else lr_lower)), weight_decay)

    def block_param_groups(self, lr: float, lr_lower: float | None = None, weight_decay: float = 0.0):
        """``param_groups`` split by the block that owns each parameter: one list of groups per block.

        Block b < k-1 owns its layers and decoder (block 0 also the embeddings); the last block owns the
        rest. One optimizer per block can then step a lower block at its boundary (``on_boundary``).
        """
        owner = {}
        for b, (start, end) in enumerate(self.block_ranges[:-1]):
            members = [*self.aux_decoders[b].parameters()]
            members += [p for layer in self.model.model.layers[start:end] for p in layer.parameters()]
            if b == 0:
                members += list(self.model.model.embed_tokens.parameters())
            owner.update({id(p): b for p in members})
        return split_by_block(self.param_groups(lr, lr_lower, weight_decay), owner, self.num_blocks)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """A plain Hugging Face checkpoint: the decoders are dropped, the kernels' patches are not saved."""
        self.model.save_pretrained(directory, **kwargs)


def share(part: torch.Tensor, total) -> torch.Tensor | float:
    """part / total as a weight, or 1 when there is no total (a single micro-batch): a micro-batch's weight in its
    step (label tokens for the task loss, positions for the reconstruction loss)."""
    if total is None:
        return 1.0
    return part / torch.as_tensor(total, device=part.device).clamp(min=1)
