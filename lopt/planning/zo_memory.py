"""ZO's byte model: what one ``lopt.zo.ZOEngine.step`` holds on the device, from the model's shape alone.

``estimate_zo_memory`` predicts the peak of ``memory_allocated`` during one ZO step (``--method zo``) and its
parts; ``lopt plan --method zo`` (``lopt.planning.plan.zo_plan``) searches the micro-batch and the number of
directions with it. The step, as ``lopt.zo`` runs it (``engine.py``, ``state.py``, ``scoring.py``,
``linears.py``, ``directions.py``), in three phases, each a phase of the estimate:

- ``draw``: the step's factors (lowrank U: P·ΣN·r fp32; highrank U and V: P·Σ(N+K)·r; fullrank: none, its
  noise is regenerated from seeds); a lowrank refresh also draws the new basis V (ΣK·r, a flat draw and its
  copies) while the old one is alive.
- ``scoring`` (one micro-batch at a time, the others' tensors waiting): one no-grad forward. The embeddings
  and the layers below ``first_layer`` K run on the B·T tokens once; their output is repeated for the G = 2P
  evaluations, and the layers from K on run on R = 2P·B·T rows, one layer at a time (``layer_peak``: the
  largest moment inside a layer, op by op); then the head scores: the label tokens (causal LM: the final norm
  and the head on those rows only, a group at a time) or C candidates at one position (classification).
- ``update``: θ −= lr·(1/P)·Σ g_p·Z_p in fp32, linear by linear, the factors still alive.

Persistent: the weights (the model's dtype), the fp32 state (``TrainedState``: an fp32 master of every trained
linear of a 16-bit model, for every kind; lowrank A (N×r) and V (K×r) fp32 per trained linear) and every
micro-batch's tensors (the trainer puts the step's micro-batches on the device before it scores them).

``kernels``: the GPU's path (``lopt_kernels``: fused RMSNorm / SwiGLU / RoPE, the grouped low-rank kernel
adding in place, the perturbed GEMM that makes fullrank noise in registers, the fused head) or the PyTorch
references the CPU runs (``kernels=False``, what ``tests/planning/test_zo_plan.py`` counts byte for byte).
The references hold more, counted as ``workspace``: the grouped low-rank reference makes fp32 [R, N] copies
for a 16-bit output; the fullrank reference materialises each direction's Z (N×K fp32) with the Philox
reference's int64 words (``PHILOX_REFERENCE_BYTES`` per element of a 2^20 chunk) and two perturbed copies
of W. Notation: ``s`` bytes per weight value, h hidden, qd = H·d, kvd = Hkv·d, I the MLP width, V the
vocabulary, R rows (tokens) through a layer. Tiny tensors (scalars, per-group losses) are left out.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch

from lopt_kernels.linear_cross_entropy import logits_block_elements
from lopt_kernels.zo_matmul import NOISE_CHUNK_ELEMENTS

from lopt.planning.memory_model import GiB, ModelShape, dtype_bytes, model_shape
from lopt.settings import ZO_KINDS
from lopt.zo.engine import DEFAULT_RANK

LOSSES = ("causal-lm", "classification")  # what a step scores (lopt.zo.scoring)
# The Philox reference (``lopt_kernels.philox``): the int64 counters, the four words and _philox's
# temporaries of one chunk, per element, on top of the fp32 noise it returns (counted: test_zo_plan.py).
PHILOX_REFERENCE_BYTES = 168


# ---------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class ZOStepShape:
    """What ``estimate_zo_memory`` is given (its docstring says what each means); ``s`` bytes per weight."""

    batch_size: int
    seq_len: int
    kind: str
    directions: int
    rank: int
    first_layer: int
    micro_batches: int
    loss: str
    candidates: int
    label_tokens: int
    padded: bool
    s: int
    kernels: bool

    @property
    def groups(self) -> int:
        return 2 * self.directions

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch: the rows of the layers below ``first_layer``."""
        return self.batch_size * self.seq_len

    @property
    def rows(self) -> int:
        """Rows of the stacked forward through the trained layers: 2P copies of the micro-batch."""
        return self.groups * self.tokens


def check_zo_step(shape: ModelShape, st: ZOStepShape) -> None:
    """``ValueError`` for inputs the engine does not run (``ZOSettings``' and ``trained_linears``' checks)."""
    problems = [(st.kind in ZO_KINDS, f"kind must be one of {', '.join(ZO_KINDS)}, got {st.kind!r}"),
                (st.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {st.loss!r}"),
                (0 <= st.first_layer < shape.layers,
                 f"first_layer must be in [0, {shape.layers}), got {st.first_layer}"),
                (st.directions >= 1 and st.batch_size >= 1 and st.micro_batches >= 1 and st.seq_len >= 2,
                 "directions, batch_size and micro_batches must be >= 1, seq_len >= 2"),
                (st.kind == "fullrank" or st.rank >= 1, f"rank must be >= 1, got {st.rank}"),
                (st.loss != "classification" or st.candidates >= 1, "classification needs candidates >= 1")]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


# ---------------------------------------------------------------------------------------------- the trained linears


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` of a decoder layer: ``out`` x ``inp`` (N x K), with or without a bias."""

    name: str
    out: int
    inp: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out * self.inp


@functools.lru_cache(maxsize=64)
def layer_linears(shape: ModelShape) -> tuple[Linear, ...]:
    """A decoder layer's linears in ``named_modules`` order (Llama / Qwen2 / Qwen3 / Mistral). Biases are
    read off the parameter count: what is left besides the weights, the norms (and Qwen3's q/k norms) is
    Qwen2's q/k/v biases, or nothing."""
    h, I, qd, kvd = shape.hidden, shape.intermediate, shape.qd, shape.kvd
    weights = [("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd),
               ("gate_proj", I, h), ("up_proj", I, h), ("down_proj", h, I)]
    norms = 2 * h + (2 * shape.head_dim if shape.qk_norm else 0)
    qkv_bias = shape.layer_params[0] - sum(n * k for _, n, k in weights) - norms == qd + 2 * kvd
    return tuple(Linear(name, n, k, qkv_bias and name in ("q_proj", "k_proj", "v_proj")) for name, n, k in weights)


def trained_layers(shape: ModelShape, st: ZOStepShape) -> int:
    return shape.layers - st.first_layer


# ---------------------------------------------------------------------------------------------- persistent bytes


def weight_bytes(shape: ModelShape, st: ZOStepShape) -> int:
    """Every parameter in the model's dtype: the engine runs LoPT with one block, so a tied head stays tied."""
    return shape.total_params(1) * st.s


def state_bytes(shape: ModelShape, st: ZOStepShape) -> dict[str, int]:
    """``TrainedState``: fp32 masters of a 16-bit model's trained linears (every kind); lowrank's A and V."""
    linears, layers = layer_linears(shape), trained_layers(shape, st)
    master = 4 * layers * sum(lin.numel for lin in linears) if st.s != 4 else 0
    lowrank = 4 * st.rank * layers * sum(lin.out + lin.inp for lin in linears) if st.kind == "lowrank" else 0
    return {"fp32 masters": master, "lowrank A, V": lowrank}


def batch_bytes(st: ZOStepShape) -> int:
    """One micro-batch's tensors (int64): input ids, labels (causal LM) or the last index, candidates and label
    (classification), and the attention mask where the batch pads."""
    B, T = st.batch_size, st.seq_len
    per_batch = B * T * 8 * (1 + st.padded)
    if st.loss == "causal-lm":
        return per_batch + B * T * 8
    return per_batch + B * 8 * (2 + st.candidates)


# ---------------------------------------------------------------------------------------------- factors


def factor_bytes(shape: ModelShape, st: ZOStepShape) -> int:
    """The step's directions, fp32: lowrank U (P, N, r) per trained linear; highrank U and V; fullrank none."""
    sizes = trained_layers(shape, st) * sum(
        lin.out + (lin.inp if st.kind == "highrank" else 0) for lin in layer_linears(shape))
    return 0 if st.kind == "fullrank" else 4 * st.directions * st.rank * sizes


def basis_draw_bytes(shape: ModelShape, st: ZOStepShape) -> int:
    """A lowrank refresh: the new basis's flat draw (ΣK·r fp32) and its per-linear copies, the old V alive."""
    if st.kind != "lowrank":
        return 0
    return 2 * 4 * st.rank * trained_layers(shape, st) * sum(lin.inp for lin in layer_linears(shape))


# ---------------------------------------------------------------------------------------------- a linear's forward


def noise_workspace(numel: int) -> int:
    """``zo_noise_like`` of ``numel`` values: the fp32 Z and, per chunk, the Philox reference's int64 words."""
    return 4 * numel + PHILOX_REFERENCE_BYTES * min(numel, NOISE_CHUNK_ELEMENTS)


def fullrank_reference_workspace(st: ZOStepShape, lin: Linear) -> int:
    """``perturbed_linear_reference`` beyond its output, at its largest: the noise of direction p (with
    direction p−1's Z and its two perturbed copies of W still alive from p = 1 on), or the fp32 round trip of
    εZ (Z, its float64 copy and product: 20 B per weight value; 16-bit: then Z, εZ, W in fp32, W+εZ, W±εZ), or
    the product of one group (M·N) beside Z and the two copies."""
    n, s = lin.numel, st.s
    previous = (4 + 2 * s) * n if st.directions > 1 else 0
    group_product = st.tokens * lin.out * s + (4 + 2 * s) * n
    return max(noise_workspace(n) + previous, 20 * n, group_product)


def grouped_lowrank_workspace(st: ZOStepShape, lin: Linear, rows: int) -> int:
    """``grouped_lowrank_reference`` beyond ``out``: x·V (R, r fp32) beside the gathered V (G, K, r) copy and,
    16-bit, x in fp32 (R, K); its scaled copy; then the gathered U (G, N, r) beside it and, for a 16-bit
    ``out`` (it adds in place only in fp32), the fp32 term, ``out`` in fp32 and their sum (R, N each). The
    kernel adds in place: nothing."""
    if st.kernels:
        return 0
    G, r, wide = st.groups, st.rank, 4 if st.s < 4 else 0
    shrink = wide * rows * lin.inp + 4 * G * r * lin.inp + 4 * rows * r
    expand = 4 * rows * r + 4 * G * r * lin.out + (12 * rows * lin.out if st.s < 4 else 0)
    return max(shrink, 8 * rows * r, expand)


def lowrank_engine_workspace(st: ZOStepShape, lin: Linear) -> int:
    """The lowrank forward's U = A ± εU_p per group (``ZOEngine._lowrank_forward``): εU, A + εU, A − εU and their
    stack (2P, N, r), fp32; εU and the stack stay while the op runs."""
    if st.kind != "lowrank":
        return 0
    return 4 * st.directions * lin.out * st.rank * 5


def linear_workspace(st: ZOStepShape, lin: Linear, rows: int, trained: bool) -> int:
    """Bytes a linear's forward holds beyond its output at its largest (``lopt.zo.linears``): a trained linear's
    low-rank term (lowrank: beside εU and the stacked U, 3·P·N·r fp32) or perturbed GEMM, and fullrank's
    separate bias add; a frozen linear (below K) nothing."""
    if not trained:
        return 0
    if st.kind == "fullrank":
        bias = rows * lin.out * st.s if lin.bias else 0
        return max(bias, 0 if st.kernels else fullrank_reference_workspace(st, lin))
    during_op = grouped_lowrank_workspace(st, lin, rows) + (
        3 * 4 * st.directions * lin.out * st.rank if st.kind == "lowrank" else 0)
    return max(lowrank_engine_workspace(st, lin), during_op)


# ---------------------------------------------------------------------------------------------- a layer, op by op


def norm_workspace(shape: ModelShape, st: ZOStepShape) -> int:
    """Per row, an RMSNorm beyond its input, its output included: the fused op's output and fp32 rstd; Hugging
    Face's fp32 copy of a 16-bit input, x², the normalised row and the weighted output, never more than two
    [h] fp32 tensors at once beside the 16-bit ones (8h + the fp32 statistics)."""
    if st.kernels:
        return st.s * shape.hidden + 4
    return 8 * shape.hidden + (4 if st.s < 4 else 0)


def attention_moments(shape: ModelShape, st: ZOStepShape, rows: int, trained: bool) -> list[tuple[int, int]]:
    """(activations, workspace) beyond the layer input at each of the attention's ops: the input norm; q, k, v
    made one by one beside the normed input N (each with its linear's workspace); RoPE (Hugging Face: q·cos,
    rotate_half(q) and its product beside q, k, v, then k's beside the rotated q; fused: the rotated q and k);
    SDPA (q, k, v, its output and fp32 log-sum-exp; with a mask k and v repeated to H heads); o_proj beside q,
    k, v and the attention's output."""
    s, h, qd, kvd = st.s, shape.hidden, shape.qd, shape.kvd
    q, k, v, o = layer_linears(shape)[:4]
    N, a, b = rows * s * h, rows * s * qd, rows * s * kvd
    ws = {lin.name: linear_workspace(st, lin, rows, trained) for lin in (q, k, v, o)}
    qk_norm = rows * s * (qd + kvd) if shape.qk_norm else 0  # Qwen3's normed q, k (their temporaries: not counted)
    rope = a + b if st.kernels else max(3 * a, a + 3 * b)
    held = N + 2 * a + 2 * b + (2 * a if st.padded else 0)  # for SDPA: the rotated q and k, v, (repeated k, v)
    return [(rows * norm_workspace(shape, st), 0), (N + a, ws["q_proj"]), (N + a + b, ws["k_proj"]),
            (N + a + 2 * b, ws["v_proj"]), (N + a + 2 * b + qk_norm + rope, 0), (held + 4 * rows * shape.heads, 0),
            (N + 2 * a + 2 * b + rows * s * h, ws["o_proj"])]


def mlp_moments(shape: ModelShape, st: ZOStepShape, rows: int, trained: bool) -> list[tuple[int, int]]:
    """(activations, workspace) beyond the layer input and the attention's residual sum at each of the MLP's
    ops: the post-attention norm; beside its output N2: gate (with its workspace), up beside silu(gate) (fused:
    beside gate), the product beside both, down_proj beside the product."""
    s, h, I = st.s, shape.hidden, shape.intermediate
    gate, up, down = layer_linears(shape)[4:]
    N2, i = rows * s * h, rows * s * I
    ws = {lin.name: linear_workspace(st, lin, rows, trained) for lin in (gate, up, down)}
    return [(rows * norm_workspace(shape, st), 0), (N2 + i, ws["gate_proj"]), (N2 + 2 * i, ws["up_proj"]),
            (N2 + 3 * i, 0), (N2 + i + rows * s * h, ws["down_proj"])]


def layer_peak(shape: ModelShape, st: ZOStepShape, rows: int, trained: bool) -> tuple[int, int]:
    """(activations, workspace) at one decoder layer's largest moment, the layer's input X (R·h·s) included and,
    from the attention's residual sum on, that sum too (the caller's hold on X lasts the whole layer)."""
    X = rows * st.s * shape.hidden
    moments = [(X + acts, ws) for acts, ws in attention_moments(shape, st, rows, trained)]
    moments += [(2 * X + acts, ws) for acts, ws in mlp_moments(shape, st, rows, trained)]
    return max(moments, key=sum)


# ---------------------------------------------------------------------------------------------- the scoring forward


def layer_input_bytes(shape: ModelShape, st: ZOStepShape, sequences: int) -> int:
    """What every layer of a block takes besides the hidden states (``LoPTModel.layer_inputs``): rotary cos and
    sin (``sequences`` x T x d, the weights' dtype), the positions, and with padding the additive [n, 1, T, T]
    mask; plus the micro-batch's shifted labels (int64), which the scoring keeps."""
    T = st.seq_len
    mask = sequences * T * T * st.s if st.padded else 0
    return 2 * sequences * T * shape.head_dim * st.s + T * 8 + mask + st.tokens * 8


def head_moments(shape: ModelShape, st: ZOStepShape) -> list[tuple[int, int]]:
    """(activations, workspace) of the scoring's head beside the last layer's output F (R·h·s).

    Causal LM (``causal_lm_scores``), n label tokens: F's label rows gathered (G·n·h) and their index, the final
    norm over them, then a group at a time the loss (the reference: [n, V] logits, fp32, and their log-softmax,
    8·n·V; the fused op: one logits block and fp32 per-token sums). Classification (``classification_scores``):
    the G·B last positions, their norm, the head's C candidate rows per example (fp32 copies where 16-bit) and
    the [G, B, C] fp32 logits and log-probabilities."""
    s, h, G, B = st.s, shape.hidden, st.groups, st.batch_size
    F = st.rows * s * h
    if st.loss == "classification":
        last, up = G * B * h * s, 4 if s < 4 else 0
        return [(F + last + G * B * norm_workspace(shape, st), 0),
                (F + 2 * last + B * st.candidates * h * (s + up) + G * B * h * up + 8 * G * B * st.candidates, 0)]
    n = st.label_tokens
    gathered = G * n * h * s + 8 * n
    if st.kernels:  # _lce_fwd: the block; valid, its range check, running max, sum and target; lse and the loss
        loss = logits_block_elements(n, shape.vocab) * s + 29 * n
    else:
        loss = 8 * n * shape.vocab + 4 * n
    return [(F + gathered + G * n * norm_workspace(shape, st), 0), (F + 2 * gathered, loss)]


def scoring_moments(shape: ModelShape, st: ZOStepShape) -> dict[str, dict[str, int]]:
    """The scoring forward's moments (``stacked_scores``), parts beyond the persistent bytes and the factors:
    the layers below K on the B·T tokens, the embeddings' (or the lower block's) output beside its 2P-fold
    repetition, a trained layer (beside the stacked input, which the scoring holds while the block runs), the
    head."""
    s, h, K, R = st.s, shape.hidden, st.first_layer, st.rows
    stacked, tokens = R * s * h, st.tokens * s * h
    upper_inputs = layer_input_bytes(shape, st, st.groups * st.batch_size)
    out = {}
    if K > 0:
        acts, ws = layer_peak(shape, st, st.tokens, trained=False)
        out["lower layers"] = {"layer inputs": layer_input_bytes(shape, st, st.batch_size),
                               "activations": acts + (tokens if K > 1 else 0), "workspace": ws}
    out["2P-fold repeat"] = {"layer inputs": st.tokens * 8, "activations": tokens + stacked}
    acts, ws = layer_peak(shape, st, R, trained=True)
    out["trained layers"] = {"layer inputs": upper_inputs,
                             "activations": acts + (stacked if shape.layers - K > 1 else 0), "workspace": ws}
    acts, ws = max(head_moments(shape, st), key=sum)
    out["head"] = {"layer inputs": upper_inputs, "head": acts, "workspace": ws}
    return out


# ---------------------------------------------------------------------------------------------- the update


def highrank_update_workspace(shape: ModelShape, st: ZOStepShape) -> int:
    """``TrainedState.highrank_update``, linear by linear: the scaled U (P, N, r) and its (N, P·r) copy, then V's
    (K, P·r) copy (both views for P = 1), fp32; the loop's ``left`` and ``right`` of the linear before stay
    alive until the next ones replace them (the last layer's down_proj before the next layer's q_proj)."""
    P, r = st.directions, st.rank
    order = list(layer_linears(shape)) * min(2, trained_layers(shape, st))
    best = 0
    for before, lin in zip([None] + order[:-1], order):
        held = 0 if before is None else before.out + (before.inp if P > 1 else 0)
        if P == 1:
            moment = held + lin.out
        else:
            held_right = 0 if before is None else before.inp
            moment = max(held + 2 * lin.out, lin.out + held_right + lin.inp)
        best = max(best, 4 * P * r * moment)
    return best


def update_workspace(shape: ModelShape, st: ZOStepShape) -> int:
    """The update's temporaries at its largest (``TrainedState``): lowrank Σ_p c_p·U_p (N×r); highrank
    ``highrank_update_workspace``; fullrank the fused kernel none, its reference the fp32 update and each
    direction's Z with the Philox words."""
    linears = layer_linears(shape)
    if st.kind == "lowrank":
        return 4 * st.rank * max(lin.out for lin in linears)
    if st.kind == "highrank":
        return highrank_update_workspace(shape, st)
    if st.kernels:
        return 0
    return max(4 * lin.numel + max(noise_workspace(lin.numel), 20 * lin.numel) for lin in linears)


# ---------------------------------------------------------------------------------------------- the estimate

PART_LABELS = {
    "weights": "weights",
    "fp32 masters": "fp32 masters (16-bit model)",
    "lowrank A, V": "lowrank A, V (fp32)",
    "batches": "micro-batches' tensors",
    "directions": "the step's factors (fp32)",
    "layer inputs": "rotary, mask, labels",
    "activations": "stacked activations",
    "head": "head / scores",
    "workspace": "op workspace",
}


@dataclass
class ZOMemoryEstimate:
    """Predicted bytes of one ZO step; ``breakdown`` (the parts live at the peak) sums to ``peak``; ``phases``
    the largest moment of each phase of the step."""

    peak: int
    peak_phase: str
    breakdown: dict[str, int]
    phases: dict[str, int]
    persistent: int
    weights: int
    state: int  # the fp32 masters and the lowrank A, V
    factors: int  # the step's directions
    activation_peak: int  # the scoring's largest activations, head included
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [(PART_LABELS[p], n) for p, n in self.breakdown.items() if n]
        width = max(len(label) for label, _ in rows + [("predicted peak", 0)])
        lines = [f"  {label:<{width}}  {n / GiB:8.3f} GiB" for label, n in rows]
        lines += [f"  {'-' * width}  {'-' * 12}",
                  f"  {'predicted peak':<{width}}  {self.peak / GiB:8.3f} GiB   (during: {self.peak_phase})",
                  f"  {'  persistent':<{width}}  {self.persistent / GiB:8.3f} GiB   "
                  "(weights, fp32 state, micro-batches)",
                  "  peak of each phase of the step:"]
        lines += [f"    {name:<{width + 10}} {total / GiB:8.3f} GiB" + ("  <- peak" if name == self.peak_phase else "")
                  for name, total in self.phases.items()]
        return "\n".join(lines)


def zo_phases(shape: ModelShape, st: ZOStepShape) -> dict[str, dict[str, int]]:
    """Every phase of the step, each as the parts live at its largest moment."""
    state = state_bytes(shape, st)
    persistent = {"weights": weight_bytes(shape, st), **state, "batches": st.micro_batches * batch_bytes(st)}
    factors = factor_bytes(shape, st)
    phases = {"draw": {**persistent, "directions": max(factors, basis_draw_bytes(shape, st))}}
    for name, parts in scoring_moments(shape, st).items():
        phases[f"scoring: {name}"] = {**persistent, "directions": factors, **parts}
    phases["update"] = {**persistent, "directions": factors, "workspace": update_workspace(shape, st)}
    return phases


def estimate_zo_memory(
    config,
    *,
    seq_len: int,
    batch_size: int,
    kind: str = "lowrank",
    directions: int = 1,
    rank: int | None = None,
    first_layer: int = 0,
    micro_batches: int = 1,
    loss: str = "causal-lm",
    candidates: int = 2,
    label_tokens: int | None = None,
    padded: bool = False,
    dtype=torch.bfloat16,
    kernels: bool = True,
) -> ZOMemoryEstimate:
    """Predict the device memory of one ``ZOEngine.step`` (the pieces: the module docstring).

    ``config``: a transformers config or a ``ModelShape``. ``batch_size``: sequences per micro-batch, of
    ``seq_len`` tokens; ``micro_batches``: the step's (all on the device, scored one after the other).
    ``kind``, ``directions`` (P), ``rank`` (r; None: the engine's default, 2 lowrank / 128 highrank) and
    ``first_layer`` (K): ``lopt.zo.ZOSettings``'. ``loss``: ``causal-lm`` (``label_tokens`` per micro-batch
    scored, default every position but each row's last) or ``classification`` (``candidates`` C single-token
    answers scored at one position). ``padded``: the batches pad (an attention mask, the [n, 1, T, T] additive
    mask and k/v repeated to H heads). ``dtype``: the weights'. ``kernels``: the GPU's fused ops, else the
    PyTorch references the CPU runs. Returns bytes."""
    shape = model_shape(config)
    rank = (rank or DEFAULT_RANK.get(kind, 0)) if kind != "fullrank" else 0
    st = ZOStepShape(batch_size=batch_size, seq_len=seq_len, kind=kind, directions=directions, rank=rank,
                     first_layer=first_layer, micro_batches=micro_batches, loss=loss, candidates=candidates,
                     label_tokens=batch_size * (seq_len - 1) if label_tokens is None else label_tokens,
                     padded=padded, s=dtype_bytes(dtype), kernels=kernels)
    check_zo_step(shape, st)
    phases = zo_phases(shape, st)
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    state = sum(state_bytes(shape, st).values())
    return ZOMemoryEstimate(
        peak=totals[peak_phase], peak_phase=peak_phase,
        breakdown={k: v for k, v in phases[peak_phase].items() if v}, phases=totals,
        persistent=weight_bytes(shape, st) + state + micro_batches * batch_bytes(st),
        weights=weight_bytes(shape, st), state=state, factors=factor_bytes(shape, st),
        activation_peak=max(p.get("activations", 0) + p.get("head", 0) for p in phases.values()),
        settings={**asdict(st), "dtype": "bf16" if st.s == 2 else "fp32"})
