"""The zeroth-order (ZO) step against MeZO's reference loop and the best plain PyTorch loop (issue 22, item 5).

    python -m benchmarks.zo.run                       the CPU run on SmolLM2-135M (~15 minutes on 2 cores)
    python -m benchmarks.zo.run --model tiny --quick  a toy run (seconds; tests/benchmarks/test_zo_bench.py)

``impls``: the implementations compared (same weights, batch, objective and trained parameters), the loss
functions, and the byte counting; ``run``: the sections (speed, memory, boundary, scaling, bf16) and the
JSON + Markdown report. ``benchmarks/gpu/zo.py`` times the same implementations on a GPU.
"""
