"""The byte model: what one LoPT training step needs on the GPU, from the model's config alone.

``estimate_memory`` predicts the peak of ``memory_allocated`` during one optimizer step of
``LoPTModel.train_step`` (+ the trainer's optimizer), or of ``LoPTModel.sequential_step`` with per-block
optimizers and ``lopt.training.offload``'s paging, the host memory and traffic of that paging, and what one
rank of data parallel (``ranks``; FSDP2 with ``shard``) holds and sends. ``model_shape`` reads what it needs
of a transformers config; ``lopt.planning.plan`` searches the settings with it.

The pieces, in the order the estimate uses them: ``StepSettings``, ``count_sizes``, ``count_activations``,
``decoder_bytes`` and ``head_bytes``, ``FsdpUnits``, then the phases of the step (``interleaved_phases`` /
``sequential_phases``) in a ``PhaseLog``, whose largest phase is the peak; each function's docstring derives
its bytes. Notation: ``s`` bytes per element of the parameter dtype, ``N = batch * seq_len`` tokens of a
micro-batch, hidden size ``h``, ``H``/``Hkv`` query/key-value heads of size ``d`` (``qd = H*d``, ``kvd =
Hkv*d``), MLP width ``I``, vocabulary ``V``, ``k`` blocks, ``M = grad_accum``. All sizes are exact byte
counts of tensors: the allocator's rounding is the plan's margin (docs/plan.md).
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

from lopt.config import GRAD_BUCKET_BYTES
from lopt.engine.model import split_layers
from lopt.settings import OPTIMIZERS, refuse

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
    """Bytes per token one decoder layer saves for backward without recomputation, by part.

    Derived op by op from the Hugging Face Llama/Qwen2/Qwen3/Mistral layer with SDPA in its flash /
    memory-efficient form (no ``T^2`` tensor: what CUDA runs in bf16 without padding, and what the CPU runs
    too: torch's CPU flash kernel):

    - RMSNorm (twice): the fp32 copy of its input that ``x.to(float32)`` makes (the input itself when it
      is fp32 already: ``4h`` either way), the fp32 ``rstd`` (4), the normalised row cast back (``s*h``) and
      the weighted output that the next linear saves (``s*h``): ``4h + 4 + 2sh``.
    - Attention: RoPE saves only cos/sin (shared by all layers, counted once); SDPA saves the rotated
      q and k, v, its output (which is also o_proj's input: ``transpose(1, 2).contiguous()`` of flash's
      output is a no-op) and the fp32 log-sum-exp: ``s*(2qd + 2kvd) + 4H``. Qwen3's per-head q/k norms add
      ``(4 + s)*(qd + kvd) + 4*(H + Hkv)``. With padding (an explicit mask) k and v are repeated to H
      heads before SDPA: ``s*4qd + 4H``, plus the ``[B, 1, T, T]`` mask once (``count_activations``).
    - MLP: gate, silu(gate), up and their product (down_proj's input): ``4sI``.

    With ``kernels`` (lopt_kernels.patch): the fused RMSNorm saves its input and rstd (``2sh + 4`` with the
    output), the fused SwiGLU saves gate and up (``3sI`` with the product), the fused RoPE cos/sin only.
    """
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
    """Bytes per token a layer keeps from its forward to its backward under ``recompute``.

    Recomputation is ``torch.utils.checkpoint`` (non-reentrant), as ``LoPTModel`` wraps it:

    - ``none``: all of ``layer_activation_bytes``, for every layer of the block.
    - ``selective`` (MLPs checkpointed): the MLP's ``4sI`` (``3sI``) is not kept (its input, the norm's
      output, is kept by the checkpoint and already counted); during an MLP's backward its intermediates
      are recomputed and live (``recomputed_per_layer``).
    - ``full`` (layers checkpointed): each layer keeps only its input, ``s*h``; during a layer's backward
      that layer's ``none`` activations are recomputed and live.
    """
    parts = layer_activation_bytes(shape, s, kernels=kernels, padded=padded)
    if recompute == "none":
        return sum(parts.values())
    if recompute == "selective":
        return parts["norms"] + parts["attention"]
    if recompute == "full":
        return s * shape.hidden
    refuse({"recompute": recompute})  # a value outside lopt.settings.RECOMPUTE
    raise AssertionError(f"lopt.settings.RECOMPUTE has a mode the byte model does not count: {recompute!r}")


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
    """Bytes per token of gradients live at once inside a layer's backward (MLP's, residual stream's).

    The backward of a layer needs a workspace on top of what it saved. Its peak is in the MLP: down_proj's
    backward frees the saved product as it creates its gradient, then the product's backward creates the
    gradients of silu(gate) and up at once (``2sI`` more than was saved), while the incoming ``[N, h]``
    gradient lives on for the residual branch (``sh``): ``2sI + sh`` per token. Of the layer's own
    parameter gradients only down_proj's exists by then (``layers_backward`` counts it).
    """
    return 2 * s * shape.intermediate + s * shape.hidden


def optimizer_state_bytes(optimizer: str, numels: list[int], s: int) -> int:
    """Optimizer state of tensors with these sizes, parameters of ``s`` bytes per value.

    ``adamw``: 12 B per bf16 parameter (fp32 moments + fp32 master), 8 B per fp32 one; ``adamw-bf16``: 4 B;
    ``adamw-8bit``: 2 B + one fp32 absmax per 256 values per moment for tensors of >= 4096 values, 8 B for the
    smaller ones; ``torch-adamw`` (what the benchmark runs for every method): two moments in the parameter
    dtype, ``2*s``.
    """
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

    ``fused``: ``lopt.training.optim.AdamW`` runs lopt_kernels' fused step (the GPU), which makes none. Its
    reference goes tensor by tensor: the fp32 gradient, ``sqrt`` and the division, 12 B per value for
    ``adamw`` on bf16; 20 B for ``adamw-bf16``'s stochastic rounding; its locals (``denom``) keep the previous
    tensor's denominator alive while the next one's is computed (``previous_tensor``: the size of that one).
    ``torch-adamw`` on CUDA runs foreach: one ``sqrt`` of the whole parameter group's second moment.
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


# ---------------------------------------------------------------------------------------------- the result


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


# ---------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class StepSettings:
    """The inputs of ``estimate_memory`` (its docstring says what each means); ``s``: bytes per parameter value."""

    seq_len: int
    batch_size: int
    num_blocks: int
    recompute: str
    optimizer: str
    kernels: bool
    early_lower_step: bool
    grad_accum: int
    dtype: object
    s: int
    padded: bool
    foreach: bool
    fused_optimizer: bool
    schedule: str
    offload: str
    stream_state: bool
    ranks: int
    shard: bool

    @property
    def tokens(self) -> int:
        """``N``: the tokens of one micro-batch."""
        return self.batch_size * self.seq_len

    @property
    def last(self) -> int:
        return self.num_blocks - 1

    @property
    def sequential(self) -> bool:
        return self.schedule == "sequential"

    @property
    def shards(self) -> int:
        """Into how many pieces FSDP2 cuts each unit's tensors: ``ranks`` under ``shard``, else none (1)."""
        return self.ranks if self.shard else 1

    @property
    def data_parallel(self) -> bool:
        """Plain (unsharded) data parallel: every rank holds everything and sums the gradients in buckets."""
        return self.ranks > 1 and not self.shard

    @property
    def overlapped(self) -> bool:
        """Plain data parallel with one optimizer (interleaved, no early step, k >= 2): the lower blocks' sums
        overlap the blocks above."""
        return self.data_parallel and not self.sequential and not self.early_lower_step and self.num_blocks > 1

    def as_dict(self) -> dict:
        """What ``MemoryEstimate.settings`` records."""
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, num_blocks=self.num_blocks,
                    recompute=self.recompute, optimizer=self.optimizer, kernels=self.kernels,
                    early_lower_step=self.early_lower_step, grad_accum=self.grad_accum,
                    dtype=str(self.dtype).replace("torch.", ""), padded=self.padded, schedule=self.schedule,
                    offload=self.offload, stream_state=self.stream_state, ranks=self.ranks, shard=self.shard)


def check_step_settings(shape: ModelShape, st: StepSettings) -> None:
    """``ValueError`` for a setting the trainer does not run (``lopt.settings``' rules) or the estimate cannot count."""
    if st.ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {st.ranks}")
    values = dict(recompute=st.recompute, schedule=st.schedule, offload=st.offload, stream_state=st.stream_state,
                  num_blocks=st.num_blocks, layers=shape.layers, tied_head=shape.tied,
                  early_lower_step=st.early_lower_step, rank_micro_batches=st.grad_accum, ranks=st.ranks,
                  shard=st.shard, pipeline=False)
    if st.optimizer in OPTIMIZERS:  # torch's AdamW (the benchmarks') is no lopt train setting
        values["optimizer"] = st.optimizer
    refuse(values)


# ---------------------------------------------------------------------------------------------- parameters and state


@dataclass(frozen=True)
class Sizes:
    """One rank's parameters, gradients and optimizer state (``count_sizes``): values, and bytes where named so.
    A block's gradients have the bytes of its weights."""

    ranges: list[tuple[int, int]]  # each block's [start, end) decoder layers (``split_layers``)
    embed_numel: int
    head_numel: int  # the lm_head's matrix, tied or not
    largest_layer: int  # the largest tensor of any decoder layer
    decoder_matrix: int  # an aux decoder's largest tensor
    block_numel: list[int]
    layer_grads: list[int]  # bytes of each decoder layer's gradients
    embed_grads: int
    decoder_grads: int  # one aux decoder's
    upper_grads: int  # the final norm's and, untied, the head's
    params: int  # bytes of all parameters, wherever they live (and of all gradients)
    weights: list[int]  # bytes of each block's parameters
    block_state: list[int]  # bytes of each block's optimizer state
    block_step_temp: list[int]  # temporaries of each block's own optimizer step (``block_step_temp_bytes``)
    all_step_temp: int  # temporaries of one optimizer step over everything
    largest_tensor: int

    @property
    def opt_state(self) -> int:
        return sum(self.block_state)


def block_tensor_values(ranges, embed: list[int], layers: list[list[int]], decoder: list[int],
                        upper: list[int]) -> list[list[int]]:
    """What each block owns (as ``LoPTModel.block_param_groups`` splits it), tensor by tensor (8-bit state depends
    on the sizes): its layers, its decoder (the last block: the final norm and head), block 0 the embeddings."""
    last = len(ranges) - 1
    blocks = []
    for b, (start, end) in enumerate(ranges):
        sizes = [n for i in range(start, end) for n in layers[i]]
        sizes += decoder if b < last else upper
        sizes += embed if b == 0 else []
        blocks.append(sizes)
    return blocks


def block_step_temp_bytes(st: StepSettings, b: int, block_numel: int, *, largest_layer: int, embed_numel: int,
                          head_numel: int) -> int:
    """Temporaries of block b's own optimizer step (early_lower_step, sequential); a streamed step updates
    one parameter per call, so nothing of the previous one is alive."""
    if b < st.last:
        largest = max(largest_layer, embed_numel if b == 0 else 0)
    else:
        largest = max(head_numel, largest_layer, embed_numel if st.num_blocks == 1 else 0)
    group = largest if st.stream_state else block_numel
    previous = 0 if st.stream_state else largest_layer
    return optimizer_step_temp_bytes(st.optimizer, largest, group, st.s, foreach=st.foreach,
                                     fused=st.fused_optimizer, previous_tensor=previous)


def count_sizes(shape: ModelShape, st: StepSettings) -> Sizes:
    """Parameters, gradients and optimizer state of one rank, in all and per block.

    Persistent (``memory_allocated()`` just before a step): the parameters (the lm_head is untied under
    LoPT, so it adds ``V*h``; plus the ``k-1`` auxiliary decoders) and the optimizer state
    (``optimizer_state_bytes``). Gradients have the parameter dtype; they are persistent too when gradients
    accumulate over micro-batches.

    Sharded (``shard``: FSDP2 ``fully_shard`` over ``R = ranks``, as ``lopt.parallel.sharding`` cuts the model): each
    decoder layer, the input embeddings, and the final norm with the lm_head are a unit each. A rank keeps of
    every unit's parameter, its gradient and its optimizer state ``ceil(rows/R)`` rows (``shard_values``); the
    aux decoders stay whole on every rank, with their gradients and state.
    """
    k, s, shards = st.num_blocks, st.s, st.shards
    ranges = split_layers(shape.layers, k)
    embed_held = shard_values(shape.embed_tensors, shards)
    layer_held = [shard_values(tensors, shards) for tensors in shape.layer_tensors]
    # a tied head (k = 1) is the embeddings' matrix
    upper_held = shard_values((shape.head_tensors if shape.own_head(k) else ()) + shape.final_norm_tensors, shards)
    embed_numel, head_numel = sum(embed_held), sum(shard_values(shape.head_tensors, shards))
    largest_layer = max(n for sizes in layer_held for n in sizes)
    n_params = embed_numel + sum(sum(sizes) for sizes in layer_held) + sum(upper_held) + (k - 1) * shape.decoder_params
    dec_tensors = shape.decoder_tensors()
    tensors = block_tensor_values(ranges, embed_held, layer_held, dec_tensors, upper_held)
    block_numel = [sum(sizes) for sizes in tensors]
    largest_tensor = max(embed_numel, head_numel, largest_layer)
    lower_numel = sum(block_numel[: st.last])
    all_step_temp = optimizer_step_temp_bytes(
        st.optimizer, largest_tensor, max(lower_numel, n_params - lower_numel), s, foreach=st.foreach,
        fused=st.fused_optimizer, previous_tensor=largest_layer)
    step_temps = [block_step_temp_bytes(st, b, block_numel[b], largest_layer=largest_layer, embed_numel=embed_numel,
                                        head_numel=head_numel) for b in range(k)]
    return Sizes(
        ranges=ranges, embed_numel=embed_numel, head_numel=head_numel, largest_layer=largest_layer,
        decoder_matrix=dec_tensors[2], block_numel=block_numel, layer_grads=[sum(sizes) * s for sizes in layer_held],
        embed_grads=embed_numel * s, decoder_grads=shape.decoder_params * s, upper_grads=sum(upper_held) * s,
        params=n_params * s, weights=[n * s for n in block_numel],
        block_state=[optimizer_state_bytes(st.optimizer, sizes, s) for sizes in tensors],
        block_step_temp=step_temps, all_step_temp=all_step_temp, largest_tensor=largest_tensor,
    )


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activations:
    """Activation bytes of a micro-batch (``count_activations``): per token of one layer (``*_tok``) and per
    micro-batch (``*_mb``)."""

    tokens: int  # N
    saved_tok: int  # what a layer keeps for its backward (``saved_per_layer``)
    recomputed_tok: int  # recomputed and live during a layer's backward
    workspace_tok: int  # a layer's backward workspace
    input_tok: int  # of ``saved_tok``: the layer's input tensor itself (``input_saved_per_layer``)
    detached_tok: int  # what a block's first layer does not save when its input is detached (blocks after 0)
    final_norm_tok: int  # the final norm's saved tensors besides the block output
    inputs_mb: int  # rotary cos/sin, input ids and shifted labels, the mask
    hidden_mb: int  # one [N, h] boundary tensor

    @property
    def boundary(self) -> int:
        """While a block runs: its input and its output (``train_step`` holds both)."""
        return self.inputs_mb + 2 * self.hidden_mb

    @property
    def boundary_end(self) -> int:
        return self.boundary - self.hidden_mb

    def of_layers(self, count: int, b: int) -> int:
        """Saved by ``count`` layers of block b, less the first one's input (counted with the boundary) and,
        after block 0, what a detached input spares."""
        return (count * self.saved_tok - self.input_tok - (self.detached_tok if b > 0 else 0)) * self.tokens


def count_activations(shape: ModelShape, st: StepSettings) -> Activations:
    """The per-token and per-micro-batch activation terms of the step.

    The boundary, while a block runs: its input (the previous block's detached output, or the embeddings) and
    its output, which ``train_step`` holds (``2sh`` per token), the rotary cos/sin (``2*s*d``), input ids and
    shifted labels (int64), and with padding the ``[B, 1, T, T]`` mask. Where a layer saves its input tensor
    itself (the first norm in fp32 or fused, a checkpointed layer) the block's first layer saves the boundary
    tensor, counted once. A block after the first starts from a detached tensor, so its first RMSNorm records
    no fp32 copy and no rstd (nothing upstream needs its gradient); the fused norm saves its rstd regardless.
    The final norm saves, besides the block output, what a layer's norm saves (``layer_activation_bytes``).
    """
    s, h, N = st.s, shape.hidden, st.tokens
    kernels, recompute = st.kernels, st.recompute
    return Activations(
        tokens=N,
        saved_tok=saved_per_layer(shape, s, recompute, kernels=kernels, padded=st.padded),
        recomputed_tok=recomputed_per_layer(shape, s, recompute, kernels=kernels, padded=st.padded),
        workspace_tok=backward_workspace_per_layer(shape, s),
        input_tok=input_saved_per_layer(shape, s, recompute, kernels=kernels),
        detached_tok=0 if (kernels or recompute == "full") else (4 * h if s < 4 else 0) + 4,
        final_norm_tok=(s * h + 4) if kernels else ((4 * h if s < 4 else 0) + 4 + 2 * s * h),
        inputs_mb=N * (2 * s * shape.head_dim + 2 * 8) + (st.batch_size * st.seq_len * st.seq_len * s
                                                           if st.padded else 0),
        hidden_mb=N * s * h,
    )


@dataclass(frozen=True)
class HeadAndDecoder:
    """Bytes of the aux decoder's loss (a lower block's) and of the head's (the last block's)."""

    decoder_saved: int
    decoder_forward: int  # peak of its forward
    decoder_backward: int  # peak of its backward
    head_forward: int
    head_backward: int


def decoder_bytes(shape: ModelShape, st: StepSettings) -> tuple[int, int, int]:
    """The aux decoder of a lower block (LayerNorm -> h/4 -> GELU -> h): saved, forward peak, backward peak.

    Kernels off it saves its input (the block output, counted with the boundary), LayerNorm's mean/rstd, its
    output, the ``h/4`` pre-activation and activation and the fp32 residual: ``sh + 8 + 2s(h/4) + 4h``; its
    backward adds three fp32 ``[N, h]`` temporaries (the squared error's). Kernels on, the fused op keeps only
    the finished ``[N, h]`` gradient ``s*h`` (plus fp32 gradients of its own parameters), and chunk buffers
    while it runs (``recon_loss.tokens_per_chunk`` tokens each).
    """
    N, s, h = st.tokens, st.s, shape.hidden
    d = h // 4
    if st.kernels:
        saved = N * s * h + shape.decoder_params * 4
        chunk = min(N, tokens_per_chunk(h))
        forward = saved + chunk * (2 * h + 2 * d) * s + N * s * h  # buffers + the result being scaled
        return saved, forward, saved + N * s * h
    saved = N * (s * h + 8 + 2 * s * d + 4 * h)  # its input is the block output (boundary)
    forward = saved + N * (s * h + 4 * h)  # y and its fp32 copy before the residual
    return saved, forward, saved + N * 12 * h  # the squared error's backward: three fp32 [N, h] temporaries


def head_bytes(shape: ModelShape, st: StepSettings) -> tuple[int, int]:
    """The head (final norm, lm_head, cross-entropy) of the last block: its forward and backward peaks.

    - kernels off (``linear_cross_entropy_reference``): the ``[N, V]`` logits (``sV``) are upcast to fp32
      (``4V``) and log-softmaxed (``4V``, saved): ``8V`` per token at the forward's peak, ``4V`` kept; in the
      backward the gradient of the log-probabilities (``4V``) and of the logits (``4V``) coexist with the
      saved ``4V``: ``12V`` per token. Then the head's weight gradient ``V*h*s`` (``last_block_phases``).
    - kernels on (``linear_cross_entropy``): one reused logits block of
      ``linear_cross_entropy.logits_block_elements`` (~64 MiB in bf16) and the fp32 log-sum-exp; in the
      backward an fp32 ``[N, h]`` accumulator, the weight gradient and the block.
    """
    N, s, h, V = st.tokens, st.s, shape.hidden, shape.vocab
    if not st.kernels:
        return N * 8 * V, N * 12 * V
    block = logits_block_elements(N, V)
    saved = N * 4 * 3  # lse, loss, target
    return saved + block * s, saved + block * s + N * 4 * h + shape.head_params * s + N * s * h


def count_head_and_decoder(shape: ModelShape, st: StepSettings) -> HeadAndDecoder:
    saved, forward, backward = decoder_bytes(shape, st)
    head_forward, head_backward = head_bytes(shape, st)
    return HeadAndDecoder(decoder_saved=saved, decoder_forward=forward, decoder_backward=backward,
                          head_forward=head_forward, head_backward=head_backward)


# ---------------------------------------------------------------------------------------------- FSDP2


@dataclass(frozen=True)
class FsdpUnits:
    """What FSDP2 (``torch.distributed.fsdp._fully_shard``, read for torch 2.14) gathers under ``shard``, per unit,
    as the engine calls the units one by one; every part is empty (``{}``) without ``shard``:

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
    """

    shard: bool
    ranges: list[tuple[int, int]]
    layer_full: list[int]  # bytes of each decoder layer, unsharded
    embed_full: int
    head_unit_full: int  # the final norm and the lm_head (sharded, the head is its own matrix)

    @classmethod
    def of(cls, shape: ModelShape, st: StepSettings, ranges) -> FsdpUnits:
        s = st.s
        return cls(shard=st.shard, ranges=ranges, layer_full=[n * s for n in shape.layer_params],
                   embed_full=shape.embed_params * s, head_unit_full=(shape.head_params + shape.final_norm_params) * s)

    @property
    def last(self) -> int:
        return len(self.ranges) - 1

    def parts(self, gathered: int = 0, unsharded: int = 0) -> dict[str, int]:
        return {"gathered": gathered, "unsharded_grads": unsharded} if self.shard else {}

    def layer_forward(self, b: int) -> dict[str, int]:
        """Block b's forward: the running layer's weights and its all-gather buffer."""
        start, end = self.ranges[b]
        return self.parts(2 * max(self.layer_full[start:end]))

    def head(self) -> dict[str, int]:
        """The norm + head unit's weights and its all-gather buffer, from the norm's forward on."""
        return self.parts(2 * self.head_unit_full)

    def layer_backward(self, b: int, i: int) -> dict[str, int]:
        """Layer i's backward in block b: its weights, the unit it prefetches (the layer below in its block, the
        embeddings below layer 0) and the full gradients of the unit before it, still in their reduce-scatter;
        in the last block also the head's all-gather buffer."""
        start, end = self.ranges[b]
        head_buffer = self.head_unit_full if b == self.last else 0
        below = self.layer_full[i - 1] if i > start else (self.embed_full if b == 0 else 0)
        before = self.layer_full[i + 1] if i + 1 < end else head_buffer
        return self.parts(self.layer_full[i] + below + head_buffer, before)

    def block_end(self, b: int) -> dict[str, int]:
        """The end of block b's backward: block 0 ends with the embeddings' (their weights gathered, their full
        gradient) while layer 0's reduce-scatter runs; the last block still holds the head's all-gather buffer."""
        head_buffer = self.head_unit_full if b == self.last else 0
        if b == 0:
            return self.parts(head_buffer + self.embed_full, self.embed_full + self.layer_full[0])
        return self.parts(head_buffer)


# ---------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class StepBytes:
    """Everything the phases of a step are made of."""

    shape: ModelShape
    st: StepSettings
    sizes: Sizes
    acts: Activations
    head: HeadAndDecoder
    units: FsdpUnits


@dataclass
class PhaseLog:
    """The phases of a step, in order: each the bytes of the parts live at its peak (zero parts left out).

    Under plain data parallel an optimizer step's phase is preceded by the sum of its gradients
    (``World.sum_grads``: one bucket at a time, up to GRAD_BUCKET_BYTES or one larger tensor, whose copy is
    live): ``bucket`` is the largest such copy."""

    data_parallel: bool
    bucket: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, name: str, base: dict[str, int], **parts: int) -> None:
        self.phases[name] = {**base, **{key: value for key, value in parts.items() if value}}

    def add_step(self, name: str, base: dict[str, int], summed: int | None = None, **parts: int) -> None:
        """An optimizer step's phase; under plain data parallel the sum of its gradients (``summed`` bytes, by
        default all it holds) before it is a phase too, with the copy of the bucket in flight."""
        if self.data_parallel:
            summed = parts["gradients"] if summed is None else summed
            self.add(f"gradient sum before {name}", base, **{**parts, "optimizer_step": 0},
                     collective=min(summed, self.bucket))
        self.add(name, base, **parts)


def everything(step: StepBytes) -> dict[str, int]:
    """All parameters and optimizer state on the device."""
    return {"parameters": step.sizes.params, "optimizer_state": step.sizes.opt_state}


def layers_backward(step: StepBytes, b: int, extra_grads: int, boundary: int, accum: bool) -> dict[str, int]:
    """Peak over the backward of block b's layers, top layer first (at each one's MLP backward): the remaining
    ``L-j`` layers' activations, the ``j`` finished layers' gradients (none new with ``accum``), the recomputed
    layer, the workspace and down_proj's fresh gradient (with accumulation: before it is added to ``.grad``)."""
    sizes, acts = step.sizes, step.acts
    start, end = sizes.ranges[b]
    down_proj_grad = step.shape.hidden * step.shape.intermediate * step.st.s
    best = None
    done_grads = 0
    for j in range(end - start):
        layer = end - 1 - j
        total = dict(
            gradients=extra_grads + done_grads + down_proj_grad,
            activations=acts.of_layers(end - start - j, b),
            recompute=acts.recomputed_tok * acts.tokens,
            workspace=acts.workspace_tok * acts.tokens,
            boundary=boundary,
            **step.units.layer_backward(b, layer),
        )
        if best is None or sum(total.values()) > sum(best.values()):
            best = total
        done_grads += 0 if accum else sizes.layer_grads[layer]
    return best


def lower_block_phases(step: StepBytes, log: PhaseLog, b: int, base: dict[str, int], held: int, accum: bool,
                       run_boundary: int, end_boundary: int) -> int:
    """Lower block b's forward, decoder loss and backward over one micro-batch; ``held``: gradients alive
    before it, ``accum``: the block's own gradients exist already (each new one is added). Returns the
    gradient bytes the block adds."""
    sizes, head = step.sizes, step.head
    start, end = sizes.ranges[b]
    activations = step.acts.of_layers(end - start, b)
    log.add(f"block {b} forward", base, gradients=held, boundary=run_boundary, activations=activations,
            decoders=head.decoder_forward, **step.units.layer_forward(b))
    log.add(f"block {b} decoder backward", base, gradients=held, boundary=run_boundary, activations=activations,
            decoders=head.decoder_backward)
    dec_grads = 0 if accum else sizes.decoder_grads
    log.add(f"block {b} backward", base, **layers_backward(step, b, held + dec_grads, run_boundary, accum))
    block_grads = 0 if accum else sum(sizes.layer_grads[start:end]) + dec_grads
    embed = 0 if b > 0 else sizes.embed_grads  # with accumulation: the fresh one, before it is added
    log.add(f"block {b} end", base, gradients=held + block_grads + embed, boundary=end_boundary,
            **step.units.block_end(b))
    return block_grads + embed


def last_block_phases(step: StepBytes, log: PhaseLog, suffix: str, base: dict[str, int], held: int, accum: bool,
                      run_boundary: int, end_boundary: int) -> None:
    """The last block's forward with the head's, the head's backward, then its layers' backward, holding the
    head's gradient (arguments as ``lower_block_phases``'s)."""
    sizes, st, acts = step.sizes, step.st, step.acts
    last = st.last
    start, end = sizes.ranges[last]
    activations = acts.of_layers(end - start, last) + acts.tokens * acts.final_norm_tok  # + the final norm's
    log.add("last block forward + head" + suffix, base, gradients=held, boundary=run_boundary,
            activations=activations, head=step.head.head_forward, **step.units.head())
    log.add("head backward" + suffix, base, gradients=held, boundary=run_boundary,
            activations=activations, head=step.head.head_backward, **step.units.head())
    head_grads = 0 if accum else sizes.upper_grads
    log.add("last block backward" + suffix, base,
            **layers_backward(step, last, held + head_grads, run_boundary, accum))
    embed_at_end = sizes.embed_grads if (st.num_blocks == 1 and not accum) else 0
    log.add("last block end" + suffix, base, gradients=held + head_grads
            + sum(sizes.layer_grads[start:]) * (not accum) + embed_at_end, boundary=end_boundary,
            **step.units.block_end(last))


@dataclass(frozen=True)
class Footprint:
    """What a schedule keeps besides its phases: see the ``MemoryEstimate`` fields of these names."""

    persistent: int
    gradients: int
    host: int = 0
    transfer: int = 0
    transfer_exposed: int = 0
    stash: int = 0


# ---------------------------------------------------------------------------------------------- interleaved


def held_gradients(step: StepBytes, b: int) -> int:
    """Interleaved: gradients alive when block b starts (all of them with accumulation, none before block 0 or
    with the early lower-block step, else those of the blocks below)."""
    sizes = step.sizes
    if step.st.grad_accum > 1:
        return sizes.params
    if step.st.early_lower_step or b == 0:
        return 0
    return sizes.embed_grads + b * sizes.decoder_grads + sum(sizes.layer_grads[: sizes.ranges[b][0]])


def summing_below(step: StepBytes, b: int) -> dict[str, int]:
    """Overlapped sums: the copies of the lower blocks' gradients in flight while block b runs."""
    if step.st.overlapped and b > 0:
        return {**everything(step), "collective": sum(step.sizes.weights[:b])}
    return everything(step)


def interleaved_phases(step: StepBytes, log: PhaseLog) -> Footprint:
    """``LoPTModel.train_step`` runs each lower block's forward and backward before the next block starts; the
    peak is the largest of

    - lower block b: persistent + the gradients still held (``held_gradients``) + boundary + its layers'
      activations + its decoder's, then the backward of its layers from the top (``layers_backward``);
    - the last block: the same with the head's forward and backward peaks, then the head's gradient held
      through the layers' backward;
    - the optimizer step: persistent + all gradients + the optimizer's temporaries for its largest tensor
      (``early_lower_step``: each lower block steps as it ends, the last one with what is left).

    Plain data parallel with one optimizer: a lower block's sum starts at its boundary on the rank's last
    micro-batch, all its buckets at once (``World.start_sum_grads``), and runs while the blocks above compute,
    so each later block's phases hold the copies of the blocks below (``summing_below``); the rest is summed
    before the step one bucket at a time (``PhaseLog.add_step``)."""
    st, sizes, acts = step.st, step.sizes, step.acts
    last, accum = st.last, st.grad_accum > 1
    for b in range(st.num_blocks - 1):
        block_grads = lower_block_phases(step, log, b, summing_below(step, b), held_gradients(step, b), accum,
                                         acts.boundary, acts.boundary_end)
        if st.early_lower_step:  # block_grads are the block's weights' bytes
            log.add_step(f"block {b} early optimizer step", everything(step), gradients=block_grads,
                         boundary=acts.boundary_end, optimizer_step=sizes.block_step_temp[b])
    last_block_phases(step, log, "", summing_below(step, last), held_gradients(step, last), accum, acts.boundary,
                      acts.boundary_end)
    remaining, temp = sizes.params, sizes.all_step_temp
    if st.early_lower_step:
        remaining -= sizes.embed_grads + last * sizes.decoder_grads + sum(sizes.layer_grads[: sizes.ranges[last][0]])
        temp = optimizer_step_temp_bytes(st.optimizer, max(sizes.head_numel, sizes.largest_layer),
                                         sizes.block_numel[last], st.s, foreach=st.foreach, fused=st.fused_optimizer,
                                         previous_tensor=sizes.largest_layer)
    log.add_step("optimizer step", everything(step), gradients=remaining, optimizer_step=temp,
                 summed=remaining - sum(sizes.weights[:last]) * st.overlapped,  # the lower blocks' are summed already
                 **step.units.parts(step.units.head_unit_full))  # FSDP2: the head's all-gather buffer
    return Footprint(persistent=sizes.params + sizes.opt_state, gradients=sizes.params)


# ---------------------------------------------------------------------------------------------- sequential


def largest_in_block(step: StepBytes, b: int) -> int:
    sizes = step.sizes
    own = sizes.embed_numel if b == 0 else 0
    own = max(own, sizes.head_numel if b == step.st.last else sizes.decoder_matrix)
    return max(sizes.largest_layer, own)


def on_device(step: StepBytes, b: int, weights_too: int = 0, stepping: bool = False) -> dict[str, int]:
    """Parameters and optimizer state on the device while block b runs (``stepping``: in its step).

    ``offload`` (``lopt.training.offload.BlockOffload``): ``optimizer`` keeps only the running block's state on the
    device, from the block's start to the end of its step; ``params`` keeps only the running block's weights
    (block 0's with the embeddings, the last one's with the norm and head), plus the next block's from the
    running block's step until the next block starts (``weights_too``). ``stream_state``: a block's state is on
    the device only in its step, one parameter's at a time."""
    st, sizes = step.st, step.sizes
    weights = sizes.weights[b] if st.offload == "params" else sizes.params
    state = sizes.opt_state if st.offload == "none" else sizes.block_state[b]
    if st.stream_state:
        state = optimizer_state_bytes(st.optimizer, [largest_in_block(step, b)], st.s) if stepping else 0
    return {"parameters": weights + weights_too, "optimizer_state": state}


def sequential_phases(step: StepBytes, log: PhaseLog) -> Footprint:
    """``LoPTModel.sequential_step``: one block at a time over the step's ``M`` micro-batches, one optimizer per
    block stepped as the block finishes. Only the running block's gradients are held (accumulated over the
    micro-batches; the phases are its last micro-batch's, and the last block's first and later ones) and,
    instead of one boundary tensor, the stash: every micro-batch's rotary cos/sin, ids and labels for the whole
    step, and ``M`` boundary tensors (``M*N*s*h``) between blocks; a block after the first holds its ``M`` inputs
    until after its step while it makes its ``M`` outputs (``2*M*N*s*h``). Each block's step is a phase of its
    own, with that block's temporaries; under ``offload=params`` the arrival of the next block's weights too."""
    st, sizes, acts = step.st, step.sizes, step.acts
    M, last, accum = st.grad_accum, st.last, st.grad_accum > 1
    inputs, hidden = acts.inputs_mb * M, acts.hidden_mb
    # The stash (the stale boundary): block b's M outputs, and the input it is on; each input of b > 0 is
    # dropped once used (the fresh boundary keeps them for its recompute: M - 1 more, not modelled).
    for b in range(st.num_blocks - 1):
        end_boundary = inputs + hidden * (M if b == 0 else M + 1)
        # the last micro-batch: the earlier ones' gradients and outputs are held, the current output is new
        lower_block_phases(step, log, b, on_device(step, b), sizes.weights[b] if accum else 0, accum,
                           inputs + hidden * (M + 1), end_boundary)
        log.add_step(f"block {b} step", on_device(step, b, stepping=True), gradients=sizes.weights[b],
                     boundary=end_boundary, optimizer_step=sizes.block_step_temp[b])
        if st.offload == "params":  # block b+1's weights arrive during b's step; b's gradients are gone by then
            log.add(f"block {b} step -> block {b + 1} weights", on_device(step, b, sizes.weights[b + 1]),
                    boundary=end_boundary)
    # the last block takes the stash's M inputs one by one (with k = 1 every micro-batch embeds anew)
    waiting = [0, 0] if st.num_blocks == 1 else [M - 1, M - 2]  # stashed inputs of the other micro-batches
    first_run = inputs + hidden * (2 + waiting[0])  # + the current input and output
    if accum:
        last_block_phases(step, log, " (first micro-batch)", on_device(step, last), 0, False, first_run,
                          inputs + hidden)
        last_block_phases(step, log, " (later micro-batches)", on_device(step, last), sizes.weights[last], True,
                          inputs + hidden * (2 + waiting[1]), inputs + hidden)
    else:
        last_block_phases(step, log, "", on_device(step, last), 0, False, first_run, inputs + hidden)
    log.add_step("optimizer step", on_device(step, last, stepping=True), gradients=sizes.weights[last],
                 boundary=M * st.tokens * 8, optimizer_step=sizes.block_step_temp[last])  # and the input ids
    return sequential_footprint(step)


def sequential_footprint(step: StepBytes) -> Footprint:
    """The sequential schedule's persistent bytes, stash, and what ``offload`` keeps on the host and moves: every
    block's state (and with ``params`` every block's weights), each up and back once per step (with one block
    under ``params`` its weights only go back); the last block's weights are what persists between steps. What
    the compute waits for: block 0's weights under ``params``, all the state with ``stream_state``."""
    st, sizes = step.st, step.sizes
    k, params, opt_state = st.num_blocks, sizes.params, sizes.opt_state
    host = transfer = exposed = 0
    if st.offload != "none":
        host = opt_state + (params if st.offload == "params" else 0)
        transfer = 2 * opt_state
        if st.offload == "params":  # each block's weights up and back; one block is always resident
            transfer += 2 * params if k > 1 else params
            exposed = sizes.weights[0] if k > 1 else 0
        if st.stream_state:  # inside the steps, not behind compute
            exposed += 2 * opt_state
    persistent = {"none": params + opt_state, "optimizer": params, "params": sizes.weights[st.last]}[st.offload]
    return Footprint(persistent=persistent, gradients=max(sizes.weights), host=host, transfer=transfer,
                     transfer_exposed=exposed, stash=step.acts.hidden_mb * (st.grad_accum + 1 if k > 2 else
                                                                            st.grad_accum if k == 2 else 0))


# ---------------------------------------------------------------------------------------------- the estimate


def link_bytes(step: StepBytes) -> int:
    """Bytes one rank sends per step. Sharded: each micro-batch all-gathers every unit twice (forward, backward)
    and reduce-scatters its gradients once: ``3 M (R-1)`` times a rank's shard bytes (the gradient sums of the
    tiny aux decoders are not counted). Plain data parallel: one ring all-reduce of every gradient, ``2 (R-1)/R``
    of them."""
    st, sizes = step.st, step.sizes
    if st.shard:
        return 3 * st.grad_accum * (st.ranks - 1) * (sizes.params - (st.num_blocks - 1) * sizes.decoder_grads)
    return 2 * (st.ranks - 1) * sizes.params // st.ranks


def summarize(step: StepBytes, log: PhaseLog, kept: Footprint) -> MemoryEstimate:
    """The ``MemoryEstimate`` of a step's phases: its peak is the largest phase."""
    st, sizes, acts, phases = step.st, step.sizes, step.acts, log.phases
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    transient_parts = ("activations", "recompute", "workspace", "head", "decoders")
    block_acts = [acts.of_layers(end - start, b) for b, (start, end) in enumerate(sizes.ranges)]
    return MemoryEstimate(
        peak=totals[peak_phase],
        persistent=kept.persistent,
        peak_phase=peak_phase,
        breakdown=phases[peak_phase],
        phases=totals,
        parameters=sizes.params,
        gradients=kept.gradients,
        optimizer_state=sizes.opt_state,
        block_activations=max(block_acts),
        boundary=acts.boundary,
        head_peak=step.head.head_backward,
        decoders=step.head.decoder_saved if st.num_blocks > 1 else 0,
        activations_per_block=block_acts,
        host=kept.host,
        transfer=kept.transfer,
        transfer_exposed=kept.transfer_exposed,
        stash=kept.stash,
        link=link_bytes(step),
        activation_peak=max(sum(parts.get(p, 0) for p in transient_parts) for parts in phases.values()),
        per_block=[dict(parameters=sizes.weights[b], optimizer_state=sizes.block_state[b],
                        step_temp=sizes.block_step_temp[b]) for b in range(st.num_blocks)],
        settings=st.as_dict(),
    )


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
    """Predict the memory of one optimizer step of LoPT training (the pieces: the module docstring).

    ``config``: a transformers config (or a ``ModelShape``). ``dtype``: the parameters' (bf16 on the
    GPU). ``kernels``: lopt_kernels' fused ops (patch, fused head and decoder loss) or the PyTorch
    reference path. ``padded``: batches with padding (an explicit attention mask). ``foreach``: only
    for ``torch-adamw`` (its default on CUDA). ``fused_optimizer``: lopt's AdamW runs lopt_kernels' fused
    step (what runs on CUDA) rather than its PyTorch reference. ``schedule``: ``train_step`` per
    micro-batch (``interleaved``) or ``sequential_step`` with one optimizer per block stepped as the
    block finishes; ``offload`` (sequential only): what ``lopt.training.offload.BlockOffload`` keeps on the host;
    ``stream_state``: the offloaded state streams through each block's step one parameter at a time.
    ``ranks``: data-parallel processes (torchrun), of which this estimate is one; ``grad_accum`` is then the
    micro-batches this rank runs in a step (rank r runs micro-batches r, r+R, ...; every rank holds
    everything). ``shard``: FSDP2 ``fully_shard`` over the ``ranks`` (this rank's shards: ``count_sizes``,
    ``FsdpUnits``). Returns bytes (per rank).
    """
    shape = model_shape(config)
    st = StepSettings(
        seq_len=seq_len, batch_size=batch_size, num_blocks=num_blocks, recompute=recompute, optimizer=optimizer,
        kernels=kernels, early_lower_step=early_lower_step, grad_accum=grad_accum, dtype=dtype, s=dtype_bytes(dtype),
        padded=padded, foreach=foreach, fused_optimizer=fused_optimizer, schedule=schedule, offload=offload,
        stream_state=stream_state, ranks=ranks, shard=shard,
    )
    check_step_settings(shape, st)
    sizes = count_sizes(shape, st)
    step = StepBytes(shape=shape, st=st, sizes=sizes, acts=count_activations(shape, st),
                     head=count_head_and_decoder(shape, st), units=FsdpUnits.of(shape, st, sizes.ranges))
    log = PhaseLog(data_parallel=st.data_parallel, bucket=max(GRAD_BUCKET_BYTES, sizes.largest_tensor * st.s))
    kept = sequential_phases(step, log) if st.sequential else interleaved_phases(step, log)
    return summarize(step, log, kept)
