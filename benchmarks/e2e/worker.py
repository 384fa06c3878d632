"""One configuration of the end-to-end benchmark, in its own process: prints one JSON row.

    python -m benchmarks.e2e.worker '{"method": "lopt", "model": "llama-3.2-1b", "seq_len": 2048, ...}'

A full training step is timed: forward, backward and optimizer step (``zero_grad(set_to_none=True)``
after it), on random tokens from a fixed seed, the same model init, ``torch.optim.AdamW`` (by default)
and precision (bf16 parameters on CUDA, fp32 on the CPU) for every method:

- ``hf``: the Hugging Face model (SDPA), ``model(input_ids, labels).loss.backward()``; recomputation by
  ``gradient_checkpointing_enable()`` (full layers only).
- ``hf+liger``: the same model patched by Liger-Kernel (RMSNorm, RoPE, SwiGLU, fused linear
  cross-entropy); skipped, with the reason, where liger_kernel does not import.
- ``lopt-paper``: ``LoPTModel.objective()`` and one backward (the paper's released schedule), kernels off.
- ``lopt``: ``LoPTModel.train_step`` in pure PyTorch (``kernels=False``, ``boundary_memory="torch"``).
- ``lopt+kernels``: ``kernels=True``, ``boundary_memory="auto"`` (on the CPU the fused ops run their
  PyTorch references unless ``TRITON_INTERPRET=1``: the row says which backend ran). A spec's
  ``boundary_memory`` overrides the LoPT methods' release mode (e.g. ``"torch"`` where the extension is wrong).

Memory on CUDA: ``persistent_gb`` is ``memory_allocated()`` just before a step (parameters and
optimizer state), ``transient_peak_gb`` the step's ``max_memory_allocated()`` minus that (the largest
over the timed steps), ``peak_reserved_gb`` the allocator's reserved peak. A cap
(``set_per_process_memory_fraction``) emulates a smaller card. On the CPU the same numbers come from
counting bytes (``benchmarks.e2e.bytecount``) over one more step, ``memory_source: "cpu-bytes"``; a cap
there is emulated: the row is an OOM when the counted peak passes it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

ROW_PREFIX = "@@E2E_ROW "
METHODS = ("hf", "hf+liger", "lopt-paper", "lopt", "lopt+kernels")
LOPT_METHODS = ("lopt-paper", "lopt", "lopt+kernels")
GiB = 1 << 30
# Dense bf16 peak (no sparsity) of the GPUs MFU is reported for, FLOP/s.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}

DEFAULTS = dict(
    method="lopt", model="tiny", seq_len=512, batch_size=1, mem_cap_gb=None, recompute="none",
    optimizer="torch-adamw", steps=10, warmup=3, num_blocks=2, seed=0, lr=1e-5, device="auto", dtype="auto",
    early_lower_step=False, predict=True, lambda_aux=10.0, boundary_memory=None,
)


def _emit(row: dict) -> None:
    sys.stdout.flush()
    print(ROW_PREFIX + json.dumps(row), flush=True)


def bf16_peak_flops(device_name: str) -> float | None:
    for key in sorted(BF16_PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return BF16_PEAK_FLOPS[key]
    return None


def model_flops_per_token(config, seq_len: int) -> float:
    """6 N (N: the parameters that multiply, i.e. all but the input embedding lookup; the lm_head
    counted once even where it is tied) + the attention scores and values, 12 L H d T (PaLM's
    convention, no causal discount). The same for every method: recomputation and LoPT's small
    decoders are not counted as useful work."""
    h, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    qd, kvd, inter = heads * head_dim, kv * head_dim, config.intermediate_size
    per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * inter
    matmul_params = L * per_layer + V * h
    return 6 * matmul_params + 12 * L * qd * seq_len


def _load_config(name: str):
    from lopt.models.shapes import shipped_config, tiny_config

    if name == "tiny":
        config = tiny_config("llama", hidden_size=64, num_hidden_layers=4, vocab_size=256)
    elif name.startswith("tiny-"):
        config = tiny_config(name.split("-", 1)[1], hidden_size=64, num_hidden_layers=4, vocab_size=256)
    else:
        config = shipped_config(name)
    config._attn_implementation = "sdpa"
    return config


def _liger_patch(model):
    """Apply Liger-Kernel to this instance; returns a reason string if it cannot."""
    try:
        import liger_kernel.transformers as liger
    except Exception as error:  # noqa: BLE001 - any import failure is a skip reason
        return f"liger_kernel not importable: {type(error).__name__}: {error}"
    model_type = model.config.model_type
    fn = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
          "qwen3": "apply_liger_kernel_to_qwen3", "mistral": "apply_liger_kernel_to_mistral"}.get(model_type)
    try:
        if fn is not None and hasattr(liger, fn):
            getattr(liger, fn)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                               fused_linear_cross_entropy=True, model=model)
        else:
            liger._apply_liger_kernel_to_instance(model=model)
    except Exception as error:  # noqa: BLE001
        return f"liger_kernel could not patch {model_type}: {type(error).__name__}: {error}"
    return None


def _make_optimizer(name, params, lr):
    import torch

    if name == "torch-adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from lopt.training.optim import build_optimizer

    return build_optimizer(name, params if isinstance(params[0], dict) else [{"params": params}])


def _early_optimizers(lm, name, lr):
    """One optimizer per lower block (stepped at its boundary) and one for the upper, as lopt.train does."""
    return [_make_optimizer(name, g, lr) for g in lm.block_param_groups(lr)]


def run(spec: dict) -> dict:
    import torch

    args = {**DEFAULTS, **spec}
    row = {k: args[k] for k in ("method", "model", "seq_len", "batch_size", "mem_cap_gb", "recompute", "optimizer",
                                "num_blocks", "early_lower_step")}
    row.update(tokens_per_s=None, step_ms=None, persistent_gb=None, transient_peak_gb=None, peak_allocated_gb=None,
               peak_reserved_gb=None, mfu=None, oom=False, skipped=None, error=None)
    method = args["method"]
    if method not in METHODS:
        row["error"] = f"unknown method {method!r}"
        return row

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args["device"] == "auto" else args["device"])
    cuda = device.type == "cuda"
    if not cuda and method == "lopt+kernels" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ.setdefault("LOPT_KERNELS_BACKEND", "torch")  # the fused ops' PyTorch references
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args["dtype"]]
    row.update(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(dtype).replace("torch.", ""),
               memory_source="cuda" if cuda else "cpu-bytes")
    cap = args["mem_cap_gb"]
    if cuda and cap is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        if cap * GiB > total:
            row["skipped"] = f"cap {cap} GiB exceeds the device's {total / GiB:.1f} GiB"
            return row
        torch.cuda.set_per_process_memory_fraction(cap * GiB / total, device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    if method == "hf" and args["recompute"] == "selective":
        row["skipped"] = "Hugging Face offers full-layer gradient checkpointing only"
        return row
    if method not in LOPT_METHODS and args["early_lower_step"]:
        row["skipped"] = "early_lower_step is a LoPT lever"
        return row

    from lopt.models.shapes import build_model

    config = _load_config(args["model"])
    seq_len, batch_size = args["seq_len"], args["batch_size"]
    try:
        torch.manual_seed(args["seed"])
        with torch.device(device):  # initialised where it trains: a 3B init on the CPU alone takes minutes
            hf_model = build_model(config, seed=args["seed"], dtype=dtype)
        hf_model.train()
        lm = None
        if method in ("hf", "hf+liger"):
            if method == "hf+liger":
                reason = _liger_patch(hf_model)
                if reason:
                    row["skipped"] = reason
                    return row
            if args["recompute"] == "full":
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf_model.config.use_cache = False
            optimizers = [_make_optimizer(args["optimizer"], list(hf_model.parameters()), args["lr"])]
            trained = hf_model
        else:
            from lopt import LoPTModel

            kernels = method == "lopt+kernels"
            boundary_memory = args["boundary_memory"] or ("auto" if kernels else "torch")
            row["boundary_memory"] = boundary_memory
            lm = LoPTModel(hf_model, num_blocks=args["num_blocks"], lambda_aux=args["lambda_aux"],
                           recompute=args["recompute"], kernels=kernels, boundary_memory=boundary_memory)
            lm.train()
            if args["early_lower_step"]:
                if method != "lopt" and method != "lopt+kernels":
                    row["skipped"] = "early_lower_step needs train_step (not the paper's one backward)"
                    return row
                optimizers = _early_optimizers(lm, args["optimizer"], args["lr"])
            else:
                optimizers = [_make_optimizer(args["optimizer"], lm.param_groups(args["lr"]), args["lr"])]
            trained = lm
            if kernels:
                import lopt_kernels

                row["kernels_backend"] = lopt_kernels.current_backend(device)
                row["extension"] = lopt_kernels.has_extension()

        generator = torch.Generator().manual_seed(args["seed"] + 1)
        input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        batch = {"input_ids": input_ids}

        def on_boundary(b):
            optimizers[b].step()
            optimizers[b].zero_grad(set_to_none=True)

        def step():
            if method in ("hf", "hf+liger"):
                loss = trained(input_ids=input_ids, labels=input_ids, use_cache=False).loss
                loss.backward()
            elif method == "lopt-paper":
                loss = trained.objective(batch)[0]
                loss.backward()
            else:
                loss = trained.train_step(batch, on_boundary=on_boundary if args["early_lower_step"] else None).loss
            optimizers[-1].step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return loss.detach()

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(args["warmup"]):
            last_loss = step()
        sync()
        times, persistent, transient, peak_alloc, peak_reserved = [], [], [], [], []
        for _ in range(args["steps"]):
            if cuda:
                gc.collect()
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            last_loss = step()
            sync()
            times.append(time.perf_counter() - start)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                persistent.append(before)
                transient.append(peak - before)
                peak_alloc.append(peak)
                peak_reserved.append(torch.cuda.max_memory_reserved(device))
        if not cuda:  # one more step under the byte counter
            from benchmarks.e2e.bytecount import ByteCounter, tensors_of

            gc.collect()
            with ByteCounter() as counter:
                counter.track(tensors_of(trained))
                for opt in optimizers:
                    counter.track(tensors_of(optimizer=opt))
                counter.track([input_ids])
                before = counter.current
                counter.reset_peak()
                last_loss = step()
            persistent, transient, peak_alloc = [before], [counter.peak - before], [counter.peak]
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()):
            raise
        row["oom"] = True
        row["error"] = (str(error).splitlines() or ["out of memory"])[0][:300]
        return row

    step_s = statistics.median(times)
    tokens = batch_size * seq_len
    row.update(
        step_ms=step_s * 1e3,
        tokens_per_s=tokens / step_s,
        persistent_gb=statistics.median(persistent) / GiB,
        transient_peak_gb=max(transient) / GiB,
        peak_allocated_gb=max(peak_alloc) / GiB,
        peak_reserved_gb=max(peak_reserved) / GiB if peak_reserved else None,
        loss=float(last_loss),
        step_ms_all=[t * 1e3 for t in times],
    )
    if cuda:
        peak_flops = bf16_peak_flops(row["device"])
        if peak_flops and dtype == torch.bfloat16:
            row["mfu"] = model_flops_per_token(config, seq_len) * tokens / step_s / peak_flops
    elif cap is not None and max(peak_alloc) > cap * GiB:
        row["oom"] = True
        row["error"] = f"emulated cap: counted peak {max(peak_alloc) / GiB:.3f} GiB > {cap} GiB"
    if args["predict"] and method in ("lopt", "lopt+kernels"):
        from lopt.planning.memory_model import estimate_memory

        est = estimate_memory(
            config, seq_len=seq_len, batch_size=batch_size, num_blocks=args["num_blocks"], recompute=args["recompute"],
            optimizer=args["optimizer"], early_lower_step=args["early_lower_step"],
            kernels=method == "lopt+kernels" and row.get("kernels_backend") == "triton",  # what ran
            dtype=dtype, foreach=cuda,
        )
        row.update(predicted_peak_gb=est.peak / GiB, predicted_persistent_gb=est.persistent / GiB,
                   predicted_transient_gb=est.transient / GiB, predicted_phase=est.peak_phase)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.e2e.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    try:
        row = run(spec)
    except Exception as error:  # noqa: BLE001 - the row carries the failure
        row = {**{k: spec.get(k, DEFAULTS.get(k)) for k in ("method", "model", "seq_len", "batch_size", "mem_cap_gb",
                                                            "recompute", "optimizer")},
               "oom": False, "error": f"{type(error).__name__}: {error}"[:500],
               "traceback": traceback.format_exc()[-2000:]}
    for key, value in list(row.items()):
        if isinstance(value, float) and not math.isfinite(value):
            row[key] = None
    _emit(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
