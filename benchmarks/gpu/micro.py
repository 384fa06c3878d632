"""Part 3: microbenchmarks of the two fused losses, forward + backward, against their alternatives.

    python -m benchmarks.gpu.micro        (from benchmarks/gpu_session.sh; writes $OUT/micro.json)

- Linear cross-entropy at Llama-3.2-1B's head (h 2048, V 128256), 8192 tokens (batch 4 x 2048), bf16, 10%
  of the labels ignored: ``fused`` (lopt_kernels.linear_cross_entropy), ``eager`` (its PyTorch reference:
  full logits, fp32 cross-entropy), ``liger`` (Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where it
  imports) and ``compiled-chunked`` (below: the chunk-over-tokens algorithm in plain PyTorch, each chunk's
  loss and gradients one ``torch.compile``-d function).
- recon_loss at h 2048 (the decoder's middle h/4), 8192 tokens, bf16, 10% masked: ``fused``, ``eager``
  (recon_loss_reference) and ``compiled`` (torch.compile of the reference).

Per implementation: median / 20th / 80th percentile time (``triton.testing.do_bench``), tokens/s, peak
memory over the inputs (one step, CUDA), the time of its first call (compile, autotune), and its error against
the eager reference on the same inputs (loss, and the gradients' relative norm), so a wrong implementation is
not timed unseen. The cheap rows come first, the two that compile last. The dry run: toy sizes in fp32 on the
CPU, ``torch.compile(backend="eager")`` (Dynamo traces, nothing is compiled to C++), perf_counter timings.
"""

from __future__ import annotations

import time

from .common import Part, bench, blocked_by, cuda_peak_over, dry_run, log, time_left

GPU_SIZES = dict(tokens=8192, hidden=2048, vocab=128256, chunk=1024, recon_hidden=2048)
DRY_SIZES = dict(tokens=96, hidden=64, vocab=1000, chunk=32, recon_hidden=128)
IGNORED = 0.1
MIN_ROW_S = 8


def chunked_linear_cross_entropy(compile_backend: str):
    """Mean cross-entropy of ``hidden @ weight.T`` over the labels that are not -100, token chunk by token chunk:
    each chunk's loss and its gradients are computed in the forward (softmax - one-hot, then two matmuls) by one
    compiled function; the weight gradient accumulates in fp32. Returns ``fn(hidden, weight, labels, chunk)``."""
    import torch

    def chunk_grads(h, w, labels):
        logits = (h @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = labels != -100
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
        hit = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == safe.unsqueeze(1)
        d = (torch.exp(logits - lse.unsqueeze(1)) - hit.float()) * valid.unsqueeze(1).float()
        d = d.to(h.dtype)
        return loss, d @ w, d.t() @ h

    compiled = torch.compile(chunk_grads, backend=compile_backend, dynamic=False)

    class _Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk):
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                loss, gh, gw = compiled(hidden[start:start + chunk], weight, labels[start:start + chunk])
                total += loss
                grad_hidden[start:start + chunk] = gh
                grad_weight += gw
            count = (labels != -100).sum().clamp(min=1).float()
            ctx.save_for_backward(grad_hidden, grad_weight, count)
            ctx.weight_dtype = weight.dtype
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            grad_hidden, grad_weight, count = ctx.saved_tensors
            scale = grad_out / count
            return (grad_hidden * scale).to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None

    return lambda hidden, weight, labels, chunk: _Chunked.apply(hidden, weight, labels, chunk)


def _errors(loss, grads, ref_loss, ref_grads) -> dict:
    import torch

    rel = max(float(torch.linalg.vector_norm((g.float() - r.float())) / torch.linalg.vector_norm(r.float()).clamp(min=1e-30))
              for g, r in zip(grads, ref_grads))
    return {"loss_abs_err": abs(float(loss.detach()) - float(ref_loss)), "grad_rel_err": rel}


def measure(part: Part, op: str, impl: str, fn, leaves, sizes: dict, ref, *, cuda: bool, **info) -> dict:
    """Time ``fn()`` (forward + backward, the leaves' gradients dropped before each call); one row."""
    row = {"op": op, "impl": impl, "tokens": sizes["tokens"], **info}
    left = time_left()
    if left < MIN_ROW_S:
        row.update(status="skipped", reason=f"no time left ({left:.0f} s)")
        return part.add("rows", row)

    def step():
        for t in leaves:
            t.grad = None
        loss = fn()
        loss.backward()
        return loss

    try:
        start = time.perf_counter()
        loss = step()
        if cuda:
            import torch

            torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 2)
        if ref is not None:
            row.update(_errors(loss, [t.grad for t in leaves], *ref))
        if cuda:
            row.update(cuda_peak_over(step))
        row.update(bench(step, cuda=cuda))
        row["tokens_per_s"] = sizes["tokens"] / (row["median_ms"] / 1e3)
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - the row says what broke; the next one runs
        row.update(status="failed", reason=f"{type(error).__name__}: {error}"[:400])
    log(f"micro: {op} {impl}: {row.get('status')} {row.get('median_ms', '')}")
    return part.add("rows", row)


def main() -> int:
    import torch

    cuda = torch.cuda.is_available() and not dry_run()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = DRY_SIZES if dry_run() else GPU_SIZES
    backend = "inductor" if cuda else "eager"
    part = Part("micro", "Microbenchmarks: linear cross-entropy and recon_loss, forward + backward",
                sizes=sizes, dtype=str(dtype).replace("torch.", ""), compile_backend=backend, rows=[],
                zo="see zo.json")
    from lopt_kernels import current_backend
    from lopt_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
    from lopt_kernels.recon_loss import recon_loss, recon_loss_reference

    part["kernels_backend"] = current_backend(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n, h, v = sizes["tokens"], sizes["hidden"], sizes["vocab"]

    # ---- linear cross-entropy
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    labels[torch.rand(n, device=device, generator=gen) < IGNORED] = -100
    leaves = [hidden, weight]
    eager = lambda: linear_cross_entropy_reference(hidden, weight, labels)  # noqa: E731
    ref_loss = eager()
    ref_loss.backward()
    ref = (ref_loss.detach(), [hidden.grad.clone(), weight.grad.clone()])
    info = dict(hidden=h, vocab=v)
    blocked = blocked_by("lce:fused")
    if blocked:
        part.add("rows", {"op": "linear_cross_entropy", "impl": "fused", "status": "skipped", "reason": blocked})
    else:
        measure(part, "linear_cross_entropy", "fused", lambda: linear_cross_entropy(hidden, weight, labels), leaves,
                sizes, ref, cuda=cuda, backend=current_backend(device), **info)
    measure(part, "linear_cross_entropy", "eager", eager, leaves, sizes, ref, cuda=cuda, **info)
    liger = _liger(cuda)
    if isinstance(liger, str):
        part.add("rows", {"op": "linear_cross_entropy", "impl": "liger", "status": "skipped", "reason": liger})
    else:
        measure(part, "linear_cross_entropy", "liger", lambda: liger(weight, hidden, labels), leaves, sizes, ref,
                cuda=cuda, **info)

    # ---- recon_loss
    rh = sizes["recon_hidden"]
    d = rh // 4

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, device=device, generator=gen) * std + mean).to(dtype)

    h_out = randn(n, rh).requires_grad_()
    target = randn(n, rh)
    params = [randn(rh, std=0.1, mean=1.0), randn(rh, std=0.1), randn(d, rh, std=0.02), randn(d, std=0.02),
              randn(rh, d, std=0.02), randn(rh, std=0.02)]
    for p in params:
        p.requires_grad_()
    mask = torch.rand(n, device=device, generator=gen) >= IGNORED
    recon_leaves = [h_out, *params]
    recon_eager = lambda: recon_loss_reference(h_out, target, *params, mask)  # noqa: E731
    r_loss = recon_eager()
    r_loss.backward()
    recon_ref = (r_loss.detach(), [t.grad.clone() for t in recon_leaves])
    rinfo = dict(hidden=rh)
    blocked = blocked_by("recon:fused")
    if blocked:
        part.add("rows", {"op": "recon_loss", "impl": "fused", "status": "skipped", "reason": blocked})
    else:
        measure(part, "recon_loss", "fused", lambda: recon_loss(h_out, target, *params, mask), recon_leaves, sizes,
                recon_ref, cuda=cuda, backend=current_backend(device), **rinfo)
    measure(part, "recon_loss", "eager", recon_eager, recon_leaves, sizes, recon_ref, cuda=cuda, **rinfo)

    # ---- the two that compile, last
    chunked = chunked_linear_cross_entropy(backend)
    measure(part, "linear_cross_entropy", "compiled-chunked", lambda: chunked(hidden, weight, labels, sizes["chunk"]),
            leaves, sizes, ref, cuda=cuda, chunk=sizes["chunk"], compile_backend=backend, **info)
    compiled_recon = torch.compile(recon_loss_reference, backend=backend)
    measure(part, "recon_loss", "compiled", lambda: compiled_recon(h_out, target, *params, mask), recon_leaves, sizes,
            recon_ref, cuda=cuda, compile_backend=backend, **rinfo)

    failed = [f"{r['op']} {r['impl']}" for r in part["rows"] if r.get("status") == "failed"]
    return part.done("ok", ("failed: " + ", ".join(failed)) if failed else None)


def _liger(cuda: bool):
    if not cuda:
        return "Liger-Kernel runs on CUDA only"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as error:  # noqa: BLE001 - any import failure is a skip reason
        return f"liger_kernel not importable: {type(error).__name__}: {error}"[:300]
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")


def markdown(data: dict) -> str:
    s = data.get("sizes") or {}
    lines = [f"{s.get('tokens')} tokens, {data.get('dtype')}; LCE h {s.get('hidden')} V {s.get('vocab')}, recon_loss "
             f"h {s.get('recon_hidden')}; forward + backward; compile backend {data.get('compile_backend')}.", "",
             "| op | impl | median ms | p20-p80 ms | tokens/s | peak over inputs GiB | first call s | loss err "
             "| grad rel err | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    for r in data.get("rows") or []:
        status = r.get("status", "?") + (f": {r['reason'][:70]}" if r.get("reason") else "")
        spread = f"{f(r.get('p20_ms'), '.2f')}-{f(r.get('p80_ms'), '.2f')}" if r.get("p20_ms") is not None else "-"
        lines.append(f"| {r.get('op')} | {r.get('impl')} | {f(r.get('median_ms'), '.2f')} | {spread} "
                     f"| {f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('peak_over_inputs_gb'), '.3f')} "
                     f"| {f(r.get('first_call_s'), '.1f')} | {f(r.get('loss_abs_err'), '.1e')} "
                     f"| {f(r.get('grad_rel_err'), '.1e')} | {status} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
