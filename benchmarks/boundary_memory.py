"""Memory and step time of the LoPT step under each BoundaryMemory mode, on one GPU.

A Llama-3.2-1B-shaped model (random init, bf16) trains through ``lopt.LoPTModel`` with sequence
lengths drawn from [--min-len, --max-len]; every mode sees the same lengths and tokens. Modes:
``extension`` and ``torch`` (the two implementations of the boundary release) and ``none`` (the
engine with the boundary scope switched off: plain autograd freeing, the baseline). Each mode runs
in its own process, so one mode's allocator cache cannot feed the next. Per mode: peak allocated,
peak reserved, reserved minus allocated at the peak, median step time, tokens/s, and the bytes the
boundary released beyond autograd's own freeing. Writes JSON and a markdown table to
benchmarks/results/.

    python benchmarks/boundary_memory.py                       # all modes, defaults below
    python benchmarks/boundary_memory.py --modes torch,none --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("extension", "torch", "none")
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--config", default="llama-3.2-1b", help="a shipped config name (lopt/models/model_configs)")
    p.add_argument("--num-blocks", type=int, default=4, help="LoPT blocks (num_blocks - 1 boundaries)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before measuring")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/boundary_memory_<device>.json)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print its row
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if not 1 <= args.min_len <= args.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    return args


class _NoBoundary:
    """The engine's boundary scope switched off: autograd's own freeing only."""

    mode = "none"
    released_bytes = 0

    def block(self, keep=()):
        return contextlib.nullcontext()


def run_mode(args) -> dict:
    """One mode, in this process: warm up, then measure ``args.steps`` optimizer steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from lopt.models.shapes import shipped_config
    from lopt.engine.model import LoPTModel

    if not torch.cuda.is_available():
        raise SystemExit("boundary_memory.py needs a CUDA GPU")
    mode = args.worker
    config = shipped_config(args.config)
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    engine = LoPTModel(hf_model, num_blocks=args.num_blocks, boundary_memory="torch" if mode == "none" else mode)
    if mode == "none":
        engine.boundary = _NoBoundary()
    optimizer = torch.optim.AdamW(engine.parameters(), lr=1e-5)

    gen = torch.Generator().manual_seed(args.seed)
    released = []

    def step():
        seq_len = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, config.vocab_size, (args.batch_size, seq_len), generator=gen).cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step({"input_ids": ids}, on_boundary=lambda b: released.append(engine.boundary.released_bytes))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start, ids.numel()

    for _ in range(args.warmup):
        step()
    released.clear()
    torch.cuda.reset_peak_memory_stats()
    timed = [step() for _ in range(args.steps)]
    peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    seconds = [t for t, _ in timed]
    return dict(
        mode=mode,
        resolved_mode=engine.boundary.mode,
        steps=args.steps,
        tokens=sum(n for _, n in timed),
        peak_allocated_gib=round(peak_allocated / GIB, 3),
        peak_reserved_gib=round(peak_reserved / GIB, 3),
        reserved_minus_allocated_at_peak_gib=round((peak_reserved - peak_allocated) / GIB, 3),
        median_step_ms=round(1e3 * statistics.median(seconds), 2),
        tokens_per_s=round(sum(n for _, n in timed) / sum(seconds)),
        released_by_boundary_gib=round(sum(released) / GIB, 4),
    )


def metadata() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("LOPT_COMMIT", "unknown")
    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton_version,
        commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def markdown(result: dict) -> str:
    cols = ["mode", "peak_allocated_gib", "peak_reserved_gib", "reserved_minus_allocated_at_peak_gib",
            "median_step_ms", "tokens_per_s", "released_by_boundary_gib"]
    lines = [
        f"# BoundaryMemory modes: {result['device']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, commit {result['commit']}, {result['date']}; "
        f"{result['args']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in result["rows"]:
        cells = [row["mode"], f"failed: {row['error']}"] if "error" in row else [row[c] for c in cols]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_mode(args)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", mode]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            rows.append(dict(mode=mode, error=(proc.stderr.strip().splitlines() or ["failed"])[-1]))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(metadata(), args=" ".join(passthrough) or "defaults", rows=rows)
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
    output = args.output or ROOT / "benchmarks" / "results" / f"boundary_memory_{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {output} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    main()
