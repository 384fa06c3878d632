"""The byte model: what one LoPT training step needs on the GPU, from the model's config alone.

``estimate_memory`` predicts the peak of ``memory_allocated`` during one optimizer step of
``LoPTModel.train_step`` (+ the trainer's optimizer), or of ``LoPTModel.sequential_step`` with per-block
optimizers and ``lopt.offload``'s paging, and the host memory and traffic of that paging; ``model_shape`` reads what it needs of a
transformers config. ``lopt.plan`` searches the settings with it.

How the bytes are counted
-------------------------
Notation: ``s`` bytes per element of the parameter dtype (2 for bf16, 4 for fp32), ``N = batch * seq_len``
tokens of a micro-batch, hidden size ``h``, ``H``/``Hkv`` query/key-value heads of size ``d``
(``qd = H*d``, ``kvd = Hkv*d``), MLP width ``I``, vocabulary ``V``, decoder width ``h/4``.

Persistent (``memory_allocated()`` just before a step): the parameters (the lm_head is untied under
LoPT, so it adds ``V*h``; plus the ``k-1`` auxiliary decoders) and the optimizer state
(``optimizer_state_bytes``: ``adamw`` 12 B per bf16 parameter = fp32 moments + fp32 master, 8 B per
fp32 one; ``adamw-bf16`` 4 B; ``adamw-8bit`` 2 B + one fp32 absmax per 256 values per moment for
tensors of >= 4096 values, 8 B for the smaller ones; ``torch-adamw``, what the benchmark runs for
every method: two moments in the parameter dtype, ``2*s``). Gradients have the parameter dtype; they
are persistent too when gradients accumulate over micro-batches.

Activations saved for backward, per token and per decoder layer, derived op by op from the Hugging
Face Llama/Qwen2/Qwen3/Mistral layer with SDPA in its flash / memory-efficient form (no ``T^2``
tensor: what CUDA runs in bf16 without padding, and what the CPU runs too: torch's CPU flash kernel):

- RMSNorm (twice): the fp32 copy of its input that ``x.to(float32)`` makes (the input itself when it
  is fp32 already: ``4h`` either way), the fp32 ``rstd`` (4), the normalised row cast back (``s*h``) and
  the weighted output that the next linear saves (``s*h``): ``4h + 4 + 2sh``.
- Attention: RoPE saves only cos/sin (shared by all layers, counted once); SDPA saves the rotated
  q and k, v, its output (which is also o_proj's input: ``transpose(1, 2).contiguous()`` of flash's
  output is a no-op) and the fp32 log-sum-exp: ``s*(2qd + 2kvd) + 4H``. Qwen3's per-head q/k norms add
  ``(4 + s)*(qd + kvd) + 4*(H + Hkv)``. With padding (an explicit mask) k and v are repeated to H
  heads before SDPA: ``s*4qd + 4H``, plus the ``[B, 1, T, T]`` mask once.
- MLP: gate, silu(gate), up and their product (down_proj's input): ``4sI``.

With ``kernels`` (lopt_kernels.patch): the fused RMSNorm saves its input and rstd (``2sh + 4`` with the
output), the fused SwiGLU saves gate and up (``3sI`` with the product), the fused RoPE cos/sin only.

Per recomputation mode (``torch.utils.checkpoint``, non-reentrant, as ``LoPTModel`` wraps it):

- ``none``: all of the above, for every layer of the block.
- ``selective`` (MLPs checkpointed): the MLP's ``4sI`` (``3sI``) is not kept (its input, the norm's
  output, is kept by the checkpoint and already counted); during an MLP's backward its intermediates
  are recomputed and live.
- ``full`` (layers checkpointed): each layer keeps only its input, ``s*h``; during a layer's backward
  that layer's ``none`` activations are recomputed and live.

The backward of a layer needs a workspace on top of what it saved. Its peak is in the MLP: down_proj's
backward frees the saved product as it creates its gradient, then the product's backward creates the
gradients of silu(gate) and up at once (``2sI`` more than was saved), while the incoming ``[N, h]``
gradient lives on for the residual branch (``sh``): ``2sI + sh`` per token. Of the layer's own
parameter gradients only down_proj's exists by then.

The head (final norm, lm_head, cross-entropy) of the last block:

- kernels off (``linear_cross_entropy_reference``): the ``[N, V]`` logits (``sV``) are upcast to fp32
  (``4V``) and log-softmaxed (``4V``, saved): ``8V`` per token at the forward's peak, ``4V`` kept; in the
  backward the gradient of the log-probabilities (``4V``) and of the logits (``4V``) coexist with the
  saved ``4V``: ``12V`` per token. Then the head's weight gradient ``V*h*s``.
- kernels on (``linear_cross_entropy``): one reused logits block of
  ``linear_cross_entropy.logits_block_elements`` (~64 MiB in bf16) and the fp32 log-sum-exp; in the
  backward an fp32 ``[N, h]`` accumulator, the weight gradient and the block.

The auxiliary decoder of a lower block (LayerNorm -> h/4 -> GELU -> h): kernels off it saves its
input (the block output, counted with the boundary), LayerNorm's mean/rstd, its output, the ``h/4``
pre-activation and activation and the fp32 residual: ``sh + 8 + 2s(h/4) + 4h``; its backward adds
three fp32 ``[N, h]`` temporaries (the squared error's). Kernels on, the fused op keeps only the
finished ``[N, h]`` gradient ``s*h`` (plus fp32 gradients of its own parameters), and chunk buffers
while it runs (``recon_loss.tokens_per_chunk`` tokens each).

The boundary, while a block runs: its input (the previous block's detached output, or the
embeddings) and its output, which ``train_step`` holds (``2sh`` per token), the rotary cos/sin
(``2*s*d``), input ids and shifted labels (int64). Where a layer saves its input tensor itself (the
first norm in fp32 or fused, a checkpointed layer) the block's first layer saves the boundary tensor,
counted once. A block after the first starts from a detached tensor, so its first RMSNorm records no
fp32 copy and no rstd.

The step, phase by phase (``LoPTModel.train_step`` runs each lower block's forward and backward before
the next block starts): the peak is the largest of

- lower block b: persistent + the gradients still held (those of the blocks before it, none with
  ``early_lower_step``, all with gradient accumulation) + boundary + its layers' activations + its
  decoder's, then during the backward of its layers from the top, layer j: the remaining ``L-j``
  layers' activations, the ``j`` finished layers' gradients, the recomputed layer, the workspace;
- the last block: the same with the head's forward and backward peaks, then the head's gradient held
  through the layers' backward;
- the optimizer step: persistent + all gradients + the optimizer's temporaries for its largest
  tensor. ``lopt.optim.AdamW`` on the GPU runs lopt_kernels' fused step, which makes none; its
  PyTorch reference (``fused_optimizer=False``) works tensor by tensor: the fp32 gradient, ``sqrt`` and
  the division, 12 B per value for ``adamw`` on bf16; 20 B for ``adamw-bf16``'s stochastic rounding.
  ``torch-adamw`` on CUDA runs foreach: one ``sqrt`` of the whole parameter group's second moment.

The sequential schedule (``schedule="sequential"``: ``LoPTModel.sequential_step`` over the step's
``M = grad_accum`` micro-batches, one optimizer per block stepped as the block finishes) holds only the
running block's gradients (accumulated over the micro-batches; the phases are its last micro-batch's,
and the last block's first and later ones) and, instead of one boundary tensor, the stash: every
micro-batch's rotary cos/sin, ids and labels for the whole step, and ``M`` boundary tensors (``M*N*s*h``)
between blocks; a block after the first holds its ``M`` inputs until after its step while it makes its
``M`` outputs (``2*M*N*s*h``). Each block's step is a phase of its own, with that block's temporaries.
``offload`` (``lopt.offload.BlockOffload``): ``optimizer`` keeps only the running block's state on the
device, from the block's start to the end of its step; ``params`` keeps only the running block's weights
(block 0's with the embeddings, the last one's with the norm and head), plus the next block's from the
running block's step until the next block starts (a phase of its own); the last block's weights are what
persists between steps. ``stream_state``: a block's state is on the device only in its step, one
parameter's at a time. The estimate reports the host bytes (every block's state, and with ``params``
every block's weights) and the bytes moved per step (each up and back once; with one block under
``params`` its weights only go back).

Data parallel (``ranks`` processes under torchrun, ``lopt.distributed``): rank r runs micro-batches r, r+N,
... of the step, so the estimate is one rank's with ``grad_accum`` its own micro-batches; every rank holds
everything. The ranks sum the gradients in flat buckets. With one optimizer (interleaved, no early step,
k >= 2) a lower block's sum starts at its boundary on the rank's last micro-batch, all its buckets at once
(``World.start_sum_grads``), and runs while the blocks above compute, so each later block's phases hold the
copies of the blocks below; the rest is summed before the step one bucket at a time (``World.sum_grads``: a
phase ``gradient sum before ...`` holding one bucket's copy), as is each block's sum before its own step. The step's all-reduce moves ``2 (R-1)/R`` of the gradients per rank (``link``, ring).

Sharded (``shard``: FSDP2 ``fully_shard`` over ``R = ranks``, as ``lopt.sharding`` cuts the model): each
decoder layer, the input embeddings, and the final norm with the lm_head are a unit each. A rank keeps of
every unit's parameter, its gradient and its optimizer state ``ceil(rows/R)`` rows (``shard_values``:
``torch.chunk``'s first chunk; FSDP2 pads the shorter ones to it); the aux decoders stay whole on every rank,
with their gradients and state. On top, what FSDP2 (``torch.distributed.fsdp._fully_shard``, read for torch
2.14) gathers, per unit, as the engine calls the units one by one:

- a unit's forward: its full weights and its all-gather buffer, both freed when its forward ends (two
  layers; counted beside the whole block's activations, a bound);
- the norm + head unit: ``lm_head``'s forward never runs (the loss reads its weight), so FSDP2 never
  finishes that grouped unit's forward: it stays gathered until its backward ends and its all-gather buffer
  until the next micro-batch's embedding forward: through the last block's backward and the optimizer step;
- a layer's backward: its weights, the unit it prefetches (the layer below in the same block, the
  embeddings below layer 0: each block's backward is a backward of its own, which ends FSDP2's
  bookkeeping), and the full gradients of the unit before it, whose reduce-scatter input lives until the
  next reduce-scatter (FSDP2's default of one in flight); the embeddings' backward holds their weights and
  full gradient while layer 0's reduce-scatter runs. A layer's fresh gradients are full-size, as unsharded.

Each micro-batch all-gathers every unit twice and reduce-scatters its gradients once: ``3 M (R-1)`` times a
rank's shard bytes (``link``). The gradient-sum buckets of the (tiny) aux decoders are not counted.

All sizes are exact byte counts of tensors; the CUDA caching allocator rounds blocks up (512 B) and
fragments, which ``lopt.plan`` covers with a safety margin. ``tests/test_plan.py`` checks the activation,
parameter, gradient and optimizer terms and the whole step's peak against bytes counted on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

import torch

from lopt_kernels.adamw import STEP_CHUNK_ELEMENTS
from lopt_kernels.linear_cross_entropy import logits_block_elements
from lopt_kernels.recon_loss import tokens_per_chunk

from .config import GRAD_BUCKET_BYTES, OFFLOAD, OPTIMIZERS, RECOMPUTE, SCHEDULES
from .model import split_layers

GiB = 1 << 30
COUNTED_OPTIMIZERS = OPTIMIZERS + ("torch-adamw",)  # and torch's own AdamW, which the benchmarks run

BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a decoder-only model, with its exact parameter counts."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool
    embed_params: int
    layer_params: tuple[int, ...]  # per decoder layer
    final_norm_params: int
    head_params: int  # the lm_head as its own matrix (LoPT unties it from the embeddings for k >= 2)
    tied: bool  # the checkpoint ties lm_head to the embeddings
    # (rows, values) of each parameter, in the module's order: what FSDP2 shards along dim 0 (``shard_values``)
    embed_tensors: tuple[tuple[int, int], ...]
    layer_tensors: tuple[tuple[tuple[int, int], ...], ...]  # per decoder layer
    final_norm_tensors: tuple[tuple[int, int], ...]
    head_tensors: tuple[tuple[int, int], ...]
    name: str = ""

    @property
    def qd(self) -> int:
        return self.heads * self.head_dim

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def decoder_params(self) -> int:
        h, d = self.hidden, self.hidden // 4
        return 2 * h + h * d + d + d * h + h  # LayerNorm, fc1, fc2 (with biases)

    def decoder_tensors(self) -> list[int]:
        h, d = self.hidden, self.hidden // 4
        return [h, h, h * d, d, d * h, h]

    def own_head(self, num_blocks: int) -> bool:
        """Whether the head is a matrix of its own: untied, or untied by LoPT (k >= 2; k = 1 keeps the tie)."""
        return not self.tied or num_blocks > 1

    def total_params(self, num_blocks: int, *, untie: bool | None = None) -> int:
        own = self.own_head(num_blocks) if untie is None else (untie or not self.tied)
        head = self.head_params if own else 0
        return (self.embed_params + sum(self.layer_params) + self.final_norm_params + head
                + (num_blocks - 1) * self.decoder_params)


@functools.lru_cache(maxsize=32)
def _shape_from_json(config_json: str, name: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers 5.0 leaves a model built on the meta device untied until asked
    decoder = model.model
    layers = decoder.layers
    layer_params = tuple(sum(p.numel() for p in layer.parameters()) for layer in layers)
    head = model.lm_head.weight
    tied = head is decoder.embed_tokens.weight
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=len(layers),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        qk_norm=hasattr(layers[0].self_attn, "q_norm"),
        embed_params=sum(p.numel() for p in decoder.embed_tokens.parameters()),
        layer_params=layer_params,
        final_norm_params=sum(p.numel() for p in decoder.norm.parameters()),
        head_params=sum(p.numel() for p in model.lm_head.parameters()),
        tied=tied,
        embed_tensors=_rows_and_values(decoder.embed_tokens),
        layer_tensors=tuple(_rows_and_values(layer) for layer in layers),
        final_norm_tensors=_rows_and_values(decoder.norm),
        head_tensors=_rows_and_values(model.lm_head),
        name=name,
    )


def _rows_and_values(module) -> tuple[tuple[int, int], ...]:
    return tuple((p.shape[0] if p.dim() else 1, p.numel()) for p in module.parameters())


def shard_values(tensors, ranks: int) -> list[int]:
    """Values of each ``(rows, values)`` tensor that one rank holds when FSDP2 (``fully_shard``) splits it along
    dim 0 over ``ranks``: ``ceil(rows / ranks)`` rows, ``torch.chunk``'s first chunk, to which FSDP2 pads the
    shorter ones (every rank's storage has that size). ``ranks=1``: the whole tensors."""
    return [math.ceil(rows / ranks) * (values // rows) for rows, values in tensors]


def model_shape(config) -> ModelShape:
    """The ``ModelShape`` of a transformers config (counted on the meta device; cached)."""
    if isinstance(config, ModelShape):
        return config
    fields = config.to_dict()
    fields["model_type"] = config.model_type
    for key in ("_attn_implementation_autoset", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    name = getattr(config, "name_or_path", "") or config.model_type
    return _shape_from_json(json.dumps(fields, sort_keys=True, default=str), name)


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype or its name (``bf16``, ``fp32``, ...)."""
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}[dtype]
    return torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- per-token terms


def layer_activation_bytes(shape: ModelShape, s: int, *, kernels: bool, padded: bool = False) -> dict[str, int]:
    """Bytes per token one decoder layer saves for backward without recomputation, by part."""
    h, I, H, Hkv = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads
    qd, kvd = shape.qd, shape.kvd
    if kernels:
        norm = 2 * s * h + 4
        mlp = 3 * s * I
        qk_norm = s * (qd + kvd) + 4 * (H + Hkv) if shape.qk_norm else 0
    else:
        norm = 4 * h + 4 + 2 * s * h
        mlp = 4 * s * I
        qk_norm = (4 + s) * (qd + kvd) + 4 * (H + Hkv) if shape.qk_norm else 0
    attn = s * 4 * qd + 4 * H if padded else s * (2 * qd + 2 * kvd) + 4 * H
    return {"norms": 2 * norm, "attention": attn + qk_norm, "mlp": mlp}


def saved_per_layer(shape: ModelShape, s: int, recompute: str, *, kernels: bool, padded: bool = False) -> int:
    """Bytes per token a layer keeps from its forward to its backward under ``recompute``."""
    parts = layer_activation_bytes(shape, s, kernels=kernels, padded=padded)
    if recompute == "none":
        return sum(parts.values())
    if recompute == "selective":
        return parts["norms"] + parts["attention"]
    if recompute == "full":
        return s * shape.hidden
    raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")


def input_saved_per_layer(shape: ModelShape, s: int, recompute: str, *, kernels: bool) -> int:
    """Bytes per token of a layer's saved activations that are its input tensor itself.

    The first RMSNorm saves its input where it is used as is: the fused norm always, HF's when the
    input is fp32 already (``x.to(float32)`` is then a no-op); a checkpointed layer keeps its input.
    For a block's first layer that tensor is the block input, counted with the boundary tensors.
    """
    return s * shape.hidden if (recompute == "full" or kernels or s == 4) else 0


def recomputed_per_layer(shape: ModelShape, s: int, recompute: str, *, kernels: bool, padded: bool = False) -> int:
    """Bytes per token recomputed and live during one layer's backward (beyond what the layer kept)."""
    parts = layer_activation_bytes(shape, s, kernels=kernels, padded=padded)
    if recompute == "full":
        return sum(parts.values()) - input_saved_per_layer(shape, s, "none", kernels=kernels)
    return {"none": 0, "selective": parts["mlp"]}[recompute]


def backward_workspace_per_layer(shape: ModelShape, s: int) -> int:
    """Bytes per token of gradients live at once inside a layer's backward (MLP's, residual stream's)."""
    return 2 * s * shape.intermediate + s * shape.hidden


def optimizer_state_bytes(optimizer: str, numels: list[int], s: int) -> int:
    """Optimizer state of tensors with these sizes, parameters of ``s`` bytes per value."""
    total = sum(numels)
    if optimizer == "adamw":
        return total * (8 if s == 4 else 12)
    if optimizer == "adamw-bf16":
        return total * 4
    if optimizer == "torch-adamw":
        return total * 2 * s
    if optimizer == "adamw-8bit":
        out = 0
        for n in numels:
            out += 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 8 * n
        return out
    raise ValueError(f"optimizer must be one of {', '.join(COUNTED_OPTIMIZERS)}, got {optimizer!r}")


def optimizer_step_temp_bytes(optimizer: str, largest_tensor: int, largest_group: int, s: int, *,
                              foreach: bool, previous_tensor: int = 0, fused: bool = True) -> int:
    """Temporaries of one optimizer step at its largest tensor.

    ``fused``: ``lopt.optim.AdamW`` runs lopt_kernels' fused step (the GPU), which makes none. Its
    reference goes tensor by tensor; its locals (``denom``) keep the previous tensor's denominator
    alive while the next one's is computed (``previous_tensor``: the size of that one).
    """
    if optimizer in ("adamw", "adamw-bf16"):
        if fused:
            return 0
        # the reference updates large tensors piece by piece
        largest_tensor = min(largest_tensor, STEP_CHUNK_ELEMENTS)
        previous_tensor = min(previous_tensor, STEP_CHUNK_ELEMENTS)
    n, prev = largest_tensor, previous_tensor
    if optimizer == "adamw":
        return n * (12 if s < 4 else 8) + 4 * prev  # fp32 grad copy (bf16 only), sqrt, division
    if optimizer == "adamw-bf16":
        # fp32 weight copy, denominator, stochastic rounding's noise and sums (bf16); sqrt, division (fp32)
        return n * 20 if s < 4 else n * 8 + 4 * prev + 2 * n
    if optimizer == "adamw-8bit":
        return 0
    if optimizer == "torch-adamw":
        return largest_group * s if foreach else 2 * n * s + prev * s
    raise ValueError(f"optimizer must be one of {', '.join(COUNTED_OPTIMIZERS)}, got {optimizer!r}")


# ---------------------------------------------------------------------------------------------- the estimate


def shard_conflict(*, schedule: str = "interleaved", offload: str = "none", optimizer: str = "adamw") -> str | None:
    """The setting, as its flag, that ``lopt train --shard`` (FSDP2) does not combine with; None when it takes
    them all. Its owner is this function: ``estimate_memory``, ``lopt.plan`` and its flags' checks ask it."""
    if schedule == "sequential":
        return "--schedule sequential"
    if offload != "none":
        return f"--offload {offload}"
    if optimizer == "adamw-8bit":
        return "--optimizer adamw-8bit"
    return None


PARTS = ("parameters", "optimizer_state", "gradients", "activations", "recompute", "workspace", "boundary",
         "head", "decoders", "optimizer_step", "gathered", "unsharded_grads", "collective")
PART_LABELS = {
    "parameters": "parameters",
    "optimizer_state": "optimizer state",
    "gradients": "gradients (live)",
    "activations": "activations (saved)",
    "recompute": "recomputed layer",
    "workspace": "backward workspace",
    "boundary": "boundary tensors / stash",
    "head": "head / logits",
    "decoders": "aux decoder",
    "optimizer_step": "optimizer temporaries",
    "gathered": "all-gathered weights",
    "unsharded_grads": "full grads to reduce-scatter",
    "collective": "gradients being summed",
}


@dataclass
class MemoryEstimate:
    """Predicted bytes of one training step. ``breakdown`` sums to ``peak`` (the parts live at the peak).

    ``peak`` and ``phases`` are bytes on the device (of one rank); ``host`` what the offload keeps in host
    memory and ``transfer`` the bytes it moves between them per optimizer step (both directions); ``link`` the
    bytes one rank sends (and receives) in the step's collectives, as ring algorithms move them. Under
    ``shard`` the parameters, gradients and optimizer state are this rank's shards."""

    peak: int
    persistent: int
    peak_phase: str
    breakdown: dict[str, int]
    phases: dict[str, int]
    parameters: int  # all weights, wherever they live
    gradients: int  # the most gradients alive at once: all of them (interleaved), the largest block's (sequential)
    optimizer_state: int  # all of it, wherever it lives
    block_activations: int  # saved activations of the largest block (``recompute`` applied)
    boundary: int
    head_peak: int  # the head's largest transient (logits without kernels)
    decoders: int  # the decoder's saved activations in a lower block
    activations_per_block: list[int] = field(default_factory=list)  # saved by each block's layers
    host: int = 0
    transfer: int = 0
    transfer_exposed: int = 0  # of ``transfer``: what the compute waits for (block 0's weights under params)
    stash: int = 0  # sequential: the largest stash of boundary activations (all micro-batches)
    link: int = 0  # data parallel: bytes one rank sends per step in the all-gathers, reduce-scatters, all-reduces
    activation_peak: int = 0  # the most activations, head and decoder transients and workspace live at once
    per_block: list[dict] = field(default_factory=list)  # each block's parameters, optimizer_state, step_temp bytes
    settings: dict = field(default_factory=dict)

    @property
    def transient(self) -> int:
        return self.peak - self.persistent

    def gb(self, part: str = "peak") -> float:
        return getattr(self, part) / GiB

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["transient"] = self.transient
        return out

    def table(self) -> str:
        rows = [(PART_LABELS[p], self.breakdown.get(p, 0)) for p in PARTS if self.breakdown.get(p, 0)]
        width = max(len(label) for label, _ in rows + [("predicted peak", 0)])
        offload = self.settings.get("offload", "none")
        lines = [f"  {label:<{width}}  {n / GiB:8.3f} GiB" for label, n in rows]
        lines.append(f"  {'-' * width}  {'-' * 12}")
        lines.append(f"  {'predicted peak':<{width}}  {self.peak / GiB:8.3f} GiB   (during: {self.peak_phase})")
        kept = {"none": "parameters + optimizer state", "optimizer": "parameters",
                "params": "the last block's parameters"}[offload]
        if self.settings.get("shard"):
            kept = f"this rank's 1/{self.settings['ranks']} of {kept}; the aux decoders whole"
        lines.append(f"  {'  persistent':<{width}}  {self.persistent / GiB:8.3f} GiB   ({kept})")
        lines.append(f"  {'  transient':<{width}}  {self.transient / GiB:8.3f} GiB")
        if offload != "none":
            lines.append(f"  {'host memory':<{width}}  {self.host / GiB:8.3f} GiB   (pinned: "
                         f"{'optimizer state' if offload == 'optimizer' else 'parameters + optimizer state'})")
            lines.append(f"  {'moved per step':<{width}}  {self.transfer / GiB:8.3f} GiB   "
                         "(host <-> device, both ways)")
        lines.append("")
        lines.append("  totals: parameters {:.3f}, gradients {:.3f}, optimizer state {:.3f}, activations of the largest "
                     "block {:.3f}, head/logits peak {:.3f}, aux decoder {:.3f}, boundary {:.3f}{} GiB".format(
                         self.parameters / GiB, self.gradients / GiB, self.optimizer_state / GiB,
                         self.block_activations / GiB, self.head_peak / GiB, self.decoders / GiB, self.boundary / GiB,
                         f", stash {self.stash / GiB:.3f}" if self.stash else ""))
        lines.append("  peak of each phase of the step:")
        for name, total in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"    {name:<{width + 22}} {total / GiB:8.3f} GiB{mark}")
        return "\n".join(lines)


def estimate_memory(
    config,
    *,
    seq_len: int,
    batch_size: int,
    num_blocks: int = 2,
    recompute: str = "none",
    optimizer: str = "adamw",
    kernels: bool = True,
    early_lower_step: bool = False,
    grad_accum: int = 1,
    dtype=torch.bfloat16,
    padded: bool = False,
    foreach: bool = True,
    fused_optimizer: bool = True,
    schedule: str = "interleaved",
    offload: str = "none",
    stream_state: bool = False,
    ranks: int = 1,
    shard: bool = False,
) -> MemoryEstimate:
    """Predict the memory of one optimizer step of LoPT training (see the module docstring).

    ``config``: a transformers config (or a ``ModelShape``). ``dtype``: the parameters' (bf16 on the
    GPU). ``kernels``: lopt_kernels' fused ops (patch, fused head and decoder loss) or the PyTorch
    reference path. ``padded``: batches with padding (an explicit attention mask). ``foreach``: only
    for ``torch-adamw`` (its default on CUDA). ``fused_optimizer``: lopt's AdamW runs lopt_kernels' fused
    step (what runs on CUDA) rather than its PyTorch reference. ``schedule``: ``train_step`` per
    micro-batch (``interleaved``) or ``sequential_step`` with one optimizer per block stepped as the
    block finishes; ``offload`` (sequential only): what ``lopt.offload.BlockOffload`` keeps on the host;
    ``stream_state``: the offloaded state streams through each block's step one parameter at a time.
    ``ranks``: data-parallel processes (torchrun), of which this estimate is one; ``grad_accum`` is then the
    micro-batches this rank runs in a step. ``shard``: FSDP2 ``fully_shard`` over the ``ranks`` (this rank's
    shards; see the module docstring). Returns bytes (per rank).
    """
    shape = model_shape(config)
    s = dtype_bytes(dtype)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    if not 1 <= num_blocks <= shape.layers:
        raise ValueError(f"num_blocks must be between 1 and {shape.layers}, got {num_blocks}")
    if early_lower_step and grad_accum > 1:
        raise ValueError("early_lower_step needs grad_accum == 1")
    sequential = schedule == "sequential"
    if offload != "none" and not sequential:
        raise ValueError("offload pages one block at a time: it needs schedule='sequential'")
    if stream_state and offload == "none":
        raise ValueError("stream_state streams offloaded state: it needs offload 'optimizer' or 'params'")
    if early_lower_step and sequential:
        raise ValueError("the sequential schedule steps every block as it finishes: early_lower_step is for the "
                         "interleaved one")
    if ranks < 1 or (shard and ranks < 2):
        raise ValueError(f"ranks must be >= 1, and >= 2 to shard, got {ranks}")
    conflict = shard_conflict(schedule=schedule, offload=offload, optimizer=optimizer) if shard else None
    if conflict:
        raise ValueError(f"shard (lopt train --shard) does not run with {conflict}")
    if shard and not shape.own_head(num_blocks):
        raise ValueError("shard with one block of a model whose head is its embedding matrix: lopt train refuses it "
                         "(the two would be one unit, gathered for the whole step)")
    k = num_blocks
    M = grad_accum
    N = batch_size * seq_len
    h, V = shape.hidden, shape.vocab
    ranges = split_layers(shape.layers, k)
    last = k - 1

    # ---- parameters, gradients, optimizer state: this rank's shards of each FSDP2 unit under ``shard`` (the
    # aux decoders stay whole on every rank), every tensor whole otherwise
    shards = ranks if shard else 1
    dec_tensors = shape.decoder_tensors()
    own_head = shape.own_head(k)  # a tied head (k = 1) is the embeddings' matrix
    embed_held = shard_values(shape.embed_tensors, shards)
    layer_held = [shard_values(tensors, shards) for tensors in shape.layer_tensors]
    upper_held = shard_values((shape.head_tensors if own_head else ()) + shape.final_norm_tensors, shards)
    head_numel = sum(shard_values(shape.head_tensors, shards))  # the lm_head's matrix, tied or not
    embed_numel = sum(embed_held)
    layer_numels = [sum(sizes) for sizes in layer_held]
    largest_layer = max(n for sizes in layer_held for n in sizes)
    n_params = embed_numel + sum(layer_numels) + sum(upper_held) + (k - 1) * shape.decoder_params
    params = n_params * s
    grad_layer = [n * s for n in layer_numels]
    grad_embed = embed_numel * s
    grad_dec = shape.decoder_params * s
    grad_upper_fixed = sum(upper_held) * s
    grads_all = n_params * s

    # what each block owns (as LoPTModel.block_param_groups splits it), tensor by tensor (8-bit state depends
    # on the sizes): layers, its decoder, block 0 the embeddings, the last block the final norm and head
    block_sizes = []
    for b, (start, end) in enumerate(ranges):
        sizes_b = [n for i in range(start, end) for n in layer_held[i]]
        sizes_b += dec_tensors if b < last else upper_held
        sizes_b += embed_held if b == 0 else []
        block_sizes.append(sizes_b)
    block_numel = [sum(sizes_b) for sizes_b in block_sizes]
    weights = [n * s for n in block_numel]
    block_state = [optimizer_state_bytes(optimizer, sizes_b, s) for sizes_b in block_sizes]
    opt_state = sum(block_state)
    largest_tensor = max(embed_numel, head_numel, largest_layer)
    lower_numel = sum(block_numel[:last])
    upper_numel = n_params - lower_numel
    opt_temp_all = optimizer_step_temp_bytes(optimizer, largest_tensor, max(lower_numel, upper_numel), s,
                                             foreach=foreach, fused=fused_optimizer, previous_tensor=largest_layer)

    def block_step_temp(b: int) -> int:
        """Temporaries of block b's own optimizer step (early_lower_step, sequential); a streamed step updates
        one parameter per call, so nothing of the previous one is alive."""
        if b < last:
            largest = max(largest_layer, embed_numel if b == 0 else 0)
        else:
            largest = max(head_numel, largest_layer, embed_numel if k == 1 else 0)
        group = largest if stream_state else block_numel[b]
        previous = 0 if stream_state else largest_layer
        return optimizer_step_temp_bytes(optimizer, largest, group, s, foreach=foreach, fused=fused_optimizer,
                                         previous_tensor=previous)

    # ---- per-token terms
    saved_tok = saved_per_layer(shape, s, recompute, kernels=kernels, padded=padded)
    recompute_tok = recomputed_per_layer(shape, s, recompute, kernels=kernels, padded=padded)
    workspace_tok = backward_workspace_per_layer(shape, s)
    input_tok = input_saved_per_layer(shape, s, recompute, kernels=kernels)
    down_proj_grad = shape.hidden * shape.intermediate * s
    d = h // 4
    # per micro-batch, for the whole step: rotary cos/sin, input ids and shifted labels (int64), the mask
    inputs_mb = N * (2 * s * shape.head_dim + 2 * 8) + (batch_size * seq_len * seq_len * s if padded else 0)
    hidden_mb = N * s * h  # one [N, h] boundary tensor
    # during a block: its input and its output (train_step holds both)
    boundary = inputs_mb + 2 * hidden_mb
    boundary_end = boundary - hidden_mb
    # the final norm's saved tensors besides the block output (counted with the boundary)
    norm_tok = (s * h + 4) if kernels else ((4 * h if s < 4 else 0) + 4 + 2 * s * h)
    if kernels:
        dec_saved = N * s * h + shape.decoder_params * 4
        chunk = min(N, tokens_per_chunk(h))
        dec_fwd_peak = dec_saved + chunk * (2 * h + 2 * d) * s + N * s * h  # buffers + the result being scaled
        dec_bwd_peak = dec_saved + N * s * h
        block = logits_block_elements(N, V)
        head_saved = N * 4 * 3  # lse, loss, target
        head_fwd_peak = head_saved + block * s
        head_bwd_peak = head_saved + block * s + N * 4 * h + shape.head_params * s + N * s * h
    else:
        dec_saved = N * (s * h + 8 + 2 * s * d + 4 * h)  # its input is the block output (boundary)
        dec_fwd_peak = dec_saved + N * (s * h + 4 * h)  # y and its fp32 copy before the residual
        dec_bwd_peak = dec_saved + N * 12 * h  # the squared error's backward: three fp32 [N, h] temporaries
        head_saved = N * 4 * V
        head_fwd_peak = N * 8 * V
        head_bwd_peak = N * 12 * V

    # ---- FSDP2 (``shard``): a unit's full weights while it computes, its full gradients until their
    # reduce-scatter; plain data parallel: the buckets of the gradient sum
    layer_full = [n * s for n in shape.layer_params]
    embed_full = shape.embed_params * s
    head_unit_full = (shape.head_params + shape.final_norm_params) * s  # sharded, the head is its own matrix
    data_parallel = ranks > 1 and not shard
    # plain data parallel with one optimizer: the lower blocks' sums overlap the blocks above
    overlapped = data_parallel and not sequential and not early_lower_step and k > 1

    def fsdp(gathered: int = 0, unsharded: int = 0) -> dict[str, int]:
        return {"gathered": gathered, "unsharded_grads": unsharded} if shard else {}

    def fsdp_layer_backward(b: int, i: int) -> dict[str, int]:
        """Layer i's backward in block b: its weights, the unit it prefetches (the layer below in its block, the
        embeddings below layer 0) and the full gradients of the unit before it, still in their reduce-scatter;
        in the last block also the head's all-gather buffer."""
        start, end = ranges[b]
        below = layer_full[i - 1] if i > start else (embed_full if b == 0 else 0)
        before = layer_full[i + 1] if i + 1 < end else (head_unit_full if b == last else 0)
        return fsdp(layer_full[i] + below + (head_unit_full if b == last else 0), before)

    def fsdp_block_end(b: int) -> dict[str, int]:
        """The end of block b's backward: block 0 ends with the embeddings' (their weights gathered, their full
        gradient) while layer 0's reduce-scatter runs; the last block still holds the head's all-gather buffer."""
        head_buffer = head_unit_full if b == last else 0
        return fsdp(head_buffer + embed_full, embed_full + layer_full[0]) if b == 0 else fsdp(head_buffer)

    # ---- phases
    phases: dict[str, dict[str, int]] = {}
    everything = {"parameters": params, "optimizer_state": opt_state}

    def add(name, base, **parts):
        phases[name] = {**base, **{key: value for key, value in parts.items() if value}}

    def add_step(name, base, summed=None, **parts):
        """An optimizer step's phase; under plain data parallel the sum of its gradients (``summed`` bytes, by
        default all it holds) before it is a phase too, with the copy of the bucket in flight (``sum_grads`` sums
        one at a time: up to GRAD_BUCKET_BYTES, or one larger tensor)."""
        if data_parallel:
            summed = parts["gradients"] if summed is None else summed
            add(f"gradient sum before {name}", base, **{**parts, "optimizer_step": 0},
                collective=min(summed, max(GRAD_BUCKET_BYTES, largest_tensor * s)))
        add(name, base, **parts)

    def summing_below(b: int) -> dict[str, int]:
        """Overlapped sums: the copies of the lower blocks' gradients in flight while block b runs."""
        return {**everything, "collective": sum(weights[:b])} if overlapped and b > 0 else everything

    def held_grads(b: int) -> int:
        """Interleaved: gradients alive when block b starts."""
        if grad_accum > 1:
            return grads_all
        if early_lower_step or b == 0:
            return 0
        held = grad_embed + b * grad_dec + sum(grad_layer[: ranges[b][0]])
        return held

    def layers_backward(b, extra_grads, fixed, accum):
        """Peak over the backward of block b's layers, top layer first (at each one's MLP backward)."""
        start, end = ranges[b]
        L = end - start
        best = None
        acc_grads = 0
        for j in range(L):
            layer = end - 1 - j
            live_acts = ((L - j) * saved_tok - input_tok - (detached_tok if b > 0 else 0)) * N
            at_peak = down_proj_grad  # with accumulation: the fresh one, before it is added to .grad
            total = dict(
                gradients=extra_grads + acc_grads + at_peak,
                activations=live_acts,
                recompute=recompute_tok * N,
                workspace=workspace_tok * N,
                **fixed,
                **fsdp_layer_backward(b, layer),
            )
            if best is None or sum(total.values()) > sum(best.values()):
                best = total
            acc_grads += 0 if accum else grad_layer[layer]
        return best

    def lower_block(b, base, held, accum, run_boundary, end_boundary):
        """Lower block b's forward, decoder loss and backward over one micro-batch; ``held``: gradients alive
        before it, ``accum``: the block's own gradients exist already (each new one is added)."""
        # FSDP2: the running layer's weights and its all-gather buffer
        add(f"block {b} forward", base, gradients=held, boundary=run_boundary, activations=block_acts[b],
            decoders=dec_fwd_peak, **fsdp(2 * max(layer_full[ranges[b][0]: ranges[b][1]])))
        add(f"block {b} decoder backward", base, gradients=held, boundary=run_boundary, activations=block_acts[b],
            decoders=dec_bwd_peak)
        dec_grads = 0 if accum else grad_dec
        add(f"block {b} backward", base, **layers_backward(b, held + dec_grads, {"boundary": run_boundary}, accum))
        block_grads = 0 if accum else sum(grad_layer[ranges[b][0]: ranges[b][1]]) + dec_grads
        embed = 0 if b > 0 else grad_embed  # with accumulation: the fresh one, before it is added
        add(f"block {b} end", base, gradients=held + block_grads + embed, boundary=end_boundary,
            **fsdp_block_end(b))
        return block_grads + embed

    def last_block(suffix, base, held, accum, run_boundary, end_boundary):
        final_norm = N * norm_tok
        # FSDP2: the norm + head unit's weights and its all-gather buffer, from the norm's forward on
        add("last block forward + head" + suffix, base, gradients=held, boundary=run_boundary,
            activations=block_acts[last] + final_norm, head=head_fwd_peak, **fsdp(2 * head_unit_full))
        add("head backward" + suffix, base, gradients=held, boundary=run_boundary,
            activations=block_acts[last] + final_norm, head=head_bwd_peak, **fsdp(2 * head_unit_full))
        head_grads = 0 if accum else grad_upper_fixed
        add("last block backward" + suffix, base,
            **layers_backward(last, held + head_grads, {"boundary": run_boundary}, accum))
        embed_at_end = grad_embed if (k == 1 and not accum) else 0
        add("last block end" + suffix, base, gradients=held + head_grads
            + sum(grad_layer[ranges[last][0]:]) * (not accum) + embed_at_end, boundary=end_boundary,
            **fsdp_block_end(last))

    # Blocks after the first start from a detached tensor: their first RMSNorm records no fp32 copy
    # and no rstd (nothing upstream needs its gradient); the fused norm saves its rstd regardless.
    detached_tok = 0 if (kernels or recompute == "full") else (4 * h if s < 4 else 0) + 4
    block_acts = [((end - start) * saved_tok - input_tok - (detached_tok if b > 0 else 0)) * N
                  for b, (start, end) in enumerate(ranges)]
    host = transfer = transfer_exposed = stash = 0
    if not sequential:
        for b in range(k - 1):
            held = held_grads(b)
            block_grads = lower_block(b, summing_below(b), held, grad_accum > 1, boundary, boundary_end)
            if early_lower_step:
                largest = max(largest_layer, embed_numel if b == 0 else 0)
                temp = optimizer_step_temp_bytes(optimizer, largest, block_grads // s, s, foreach=foreach,
                                                 fused=fused_optimizer, previous_tensor=largest_layer)
                add_step(f"block {b} early optimizer step", everything, gradients=block_grads, boundary=boundary_end,
                         optimizer_step=temp)
        last_block("", summing_below(last), held_grads(last), grad_accum > 1, boundary, boundary_end)
        remaining = grads_all if not early_lower_step else grads_all - (grad_embed + (k - 1) * grad_dec
                                                                         + sum(grad_layer[: ranges[last][0]]))
        if early_lower_step:
            last_temp = optimizer_step_temp_bytes(optimizer, max(head_numel, largest_layer), upper_numel, s,
                                                  foreach=foreach, fused=fused_optimizer, previous_tensor=largest_layer)
        else:
            last_temp = opt_temp_all
        add_step("optimizer step", everything, gradients=remaining, optimizer_step=last_temp,
                 summed=remaining - sum(weights[:last]) * overlapped,  # the lower blocks' are summed already
                 **fsdp(head_unit_full))  # FSDP2: the head's all-gather buffer, until the next forward
        persistent = params + opt_state
        live_grads = grads_all
    else:
        # One block at a time over all M micro-batches (LoPTModel.sequential_step): only block b's gradients
        # (accumulated over the micro-batches) and the stash, every micro-batch's detached input to the
        # next block. Block b >= 1 holds its M inputs until after its step while it makes its M outputs.
        def on_device(b, weights_too=None, stepping=False):
            """What stays on the device while block b runs (``stepping``: in its step)."""
            w = weights[b] if offload == "params" else params
            state = opt_state if offload == "none" else block_state[b]
            if stream_state:  # one parameter's state at a time, in the step only
                state = optimizer_state_bytes(optimizer, [largest_in_block(b)], s) if stepping else 0
            return {"parameters": w + (weights_too or 0), "optimizer_state": state}

        def largest_in_block(b):
            own = embed_numel if b == 0 else 0
            own = max(own, head_numel if b == last else dec_tensors[2])
            return max(largest_layer, own)

        accum = M > 1
        # The stash (the stale boundary): block b's M outputs, and the input it is on; each input of b > 0 is
        # dropped once used (the fresh boundary keeps them for its recompute: M - 1 more, not modelled).
        lower_end = [inputs_mb * M + hidden_mb * (M if b == 0 else M + 1) for b in range(k - 1)]
        for b in range(k - 1):
            # the last micro-batch: the earlier ones' gradients and outputs are held, the current output is new
            run = inputs_mb * M + hidden_mb * (M + 1)
            lower_block(b, on_device(b), weights[b] if accum else 0, accum, run, lower_end[b])
            add_step(f"block {b} step", on_device(b, stepping=True), gradients=weights[b], boundary=lower_end[b],
                     optimizer_step=block_step_temp(b))
            if offload == "params":  # block b+1's weights arrive during b's step; b's gradients are gone by then
                add(f"block {b} step -> block {b + 1} weights", on_device(b, weights[b + 1]), boundary=lower_end[b])
        # the last block takes the stash's M inputs one by one (with k = 1 every micro-batch embeds anew)
        waiting = [0, 0] if k == 1 else [M - 1, M - 2]  # stashed inputs of the other micro-batches
        last_end = inputs_mb * M + hidden_mb
        first_run = inputs_mb * M + hidden_mb * (2 + waiting[0])  # + the current input and output
        if accum:
            last_block(" (first micro-batch)", on_device(last), 0, False, first_run, last_end)
            later_run = inputs_mb * M + hidden_mb * (2 + waiting[1])
            last_block(" (later micro-batches)", on_device(last), weights[last], True, later_run, last_end)
        else:
            last_block("", on_device(last), 0, False, first_run, last_end)
        add_step("optimizer step", on_device(last, stepping=True), gradients=weights[last],
                 boundary=M * N * 8, optimizer_step=block_step_temp(last))  # and the input ids
        stash = hidden_mb * (M + 1 if k > 2 else M if k == 2 else 0)
        live_grads = max(weights)
        persistent = {"none": params + opt_state, "optimizer": params, "params": weights[last]}[offload]
        if offload != "none":
            host = opt_state + (params if offload == "params" else 0)
            transfer = 2 * opt_state
            if offload == "params":  # each block's weights up and back; one block is always resident
                transfer += 2 * params if k > 1 else params
                transfer_exposed = weights[0] if k > 1 else 0
            if stream_state:  # inside the steps, not behind compute
                transfer_exposed += 2 * opt_state

    if shard:  # each micro-batch all-gathers every unit twice (forward, backward) and reduce-scatters its gradients
        link = 3 * M * (ranks - 1) * (n_params - (k - 1) * shape.decoder_params) * s
    else:  # one all-reduce of every gradient per step
        link = 2 * (ranks - 1) * grads_all // ranks
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    transient_parts = ("activations", "recompute", "workspace", "head", "decoders")
    activation_peak = max(sum(parts.get(p, 0) for p in transient_parts) for parts in phases.values())
    return MemoryEstimate(
        peak=totals[peak_phase],
        persistent=persistent,
        peak_phase=peak_phase,
        breakdown=phases[peak_phase],
        phases=totals,
        parameters=params,
        gradients=live_grads,
        optimizer_state=opt_state,
        block_activations=max(block_acts),
        boundary=boundary,
        head_peak=head_bwd_peak,
        decoders=dec_saved if k > 1 else 0,
        activations_per_block=block_acts,
        host=host,
        transfer=transfer,
        transfer_exposed=transfer_exposed,
        stash=stash,
        link=link,
        activation_peak=activation_peak,
        per_block=[dict(parameters=weights[b], optimizer_state=block_state[b], step_temp=block_step_temp(b))
                   for b in range(k)],
        settings=dict(seq_len=seq_len, batch_size=batch_size, num_blocks=k, recompute=recompute,
                      optimizer=optimizer, kernels=kernels, early_lower_step=early_lower_step,
                      grad_accum=grad_accum, dtype=str(dtype).replace("torch.", ""), padded=padded,
                      schedule=schedule, offload=offload, stream_state=stream_state, ranks=ranks, shard=shard),
    )
