"""Compile every Triton kernel of lopt_kernels for a GPU architecture, on a machine without a GPU.

Triton lowers a kernel to PTX and a cubin without a driver, so a CPU machine can check what the
interpreter cannot: that each kernel compiles for Hopper (sm_90) at the block sizes its launcher
picks, that its shared memory fits an SM, how many registers a thread uses and whether ptxas spills
them to local memory (a spill in a memory-bound kernel is lost bandwidth). Nothing runs: these are
compile-time facts, not timings.

The launch configurations are recorded, not listed by hand. The ops run once on the CPU under the
Triton interpreter with the kernels' execution skipped (only the launches are wanted); each launch's
arguments become a signature (tensor -> pointer to its dtype, int -> i32/i64, float -> fp32) plus its
constexprs and num_warps; a child process without the interpreter compiles each distinct one.

    python -m benchmarks.kernel_compile                      # Llama-3.2-1B and Qwen2.5-1.5B shapes
    python -m benchmarks.kernel_compile --out kernels.json   # also write the table as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

if __name__ == "__main__" and "--compile-stdin" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the recording needs it

import torch

# Per-SM limits of Hopper: shared memory one program may use (227 KiB), registers, resident warps and
# programs (CUDA occupancy tables for compute capability 9.0).
ARCHES = {90: {"max_shared_bytes": 227 * 1024, "registers": 65536, "warps": 64, "programs": 32, "shared_bytes": 228 * 1024}}

# Layer shapes of two shipped configs: (hidden, intermediate, q heads, kv heads, head_dim, vocab).
MODEL_SHAPES = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 128256),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128, 151936),
}

_DTYPE_CODES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it: no grid, no tensor contents."""

    kernel: str  # "module:function"
    signature: tuple[tuple[str, str], ...]  # (parameter, type), "constexpr" for constexprs
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    def as_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "signature": dict(self.signature),
            "constexprs": dict(self.constexprs),
            "num_warps": self.num_warps,
        }


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE_CODES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def recorded_launches(execute: bool = False):
    """Yield a list that fills with a :class:`Launch` per kernel launch; kernels are skipped unless ``execute``.

    Needs the interpreter (``TRITON_INTERPRET=1`` before lopt_kernels was imported).
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        kwargs.pop("num_stages", None)
        params = dict(zip(self.arg_names, args))
        params.update(kwargs)
        constexpr_names = {name for name, p in _parameters(self.fn).items() if _is_constexpr(p)}
        signature = tuple((name, "constexpr" if name in constexpr_names else _arg_type(params[name]))
                          for name in self.arg_names)
        constexprs = tuple((name, params[name]) for name in self.arg_names if name in constexpr_names)
        launches.append(Launch(f"{self.fn.__module__}:{self.fn.__name__}", signature, constexprs, num_warps))
        if execute:
            return original_run(self, *args, grid=grid, warmup=warmup, num_warps=num_warps, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original_run


def _parameters(fn):
    import inspect

    return inspect.signature(fn).parameters


def _is_constexpr(parameter) -> bool:
    # Kernel modules use ``from __future__ import annotations``: the annotation may be the string.
    annotation = parameter.annotation
    return "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation)))


def exercise_ops(hidden: int, intermediate: int, q_heads: int, kv_heads: int, head_dim: int, vocab: int,
                 dtype: torch.dtype, tokens: int = 8) -> None:
    """Run every op of lopt_kernels forward and backward once on the CPU at a model's layer shapes."""
    from lopt_kernels import adamw_step, apply_rope, linear_cross_entropy, recon_loss, rms_norm, swiglu

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_()

    x = leaf(tokens, hidden)
    rms_norm(x, leaf(hidden)).sum().backward()
    rms_norm(leaf(tokens * q_heads, head_dim), leaf(head_dim)).sum().backward()  # Qwen3's per-head norm
    swiglu(leaf(tokens, intermediate), leaf(tokens, intermediate)).sum().backward()
    cos, sin = torch.randn(1, tokens, head_dim).to(dtype), torch.randn(1, tokens, head_dim).to(dtype)
    q = leaf(1, tokens, q_heads, head_dim).transpose(1, 2)  # a projection's [B, T, H, D] memory
    k = leaf(1, tokens, kv_heads, head_dim).transpose(1, 2)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    (q_rot.sum() + k_rot.sum()).backward()
    d = hidden // 4
    mask = torch.ones(tokens, dtype=torch.long)
    mask[0] = 0
    decoder = [leaf(hidden), leaf(hidden), leaf(d, hidden, scale=0.02), leaf(d), leaf(hidden, d, scale=0.02),
               leaf(hidden)]
    recon_loss(leaf(tokens, hidden), torch.randn(tokens, hidden).to(dtype), *decoder, mask=mask).backward()
    labels = torch.randint(0, vocab, (tokens,))
    labels[0] = -100
    linear_cross_entropy(leaf(tokens, hidden), leaf(vocab, hidden, scale=0.02), labels).backward()
    # The optimizer step: fp32 moments (with an fp32 master copy of a low-precision parameter), and bf16
    # moments with stochastic rounding.
    param, grad = torch.randn(hidden, 8).to(dtype), torch.randn(hidden, 8).to(dtype)
    steps = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1)
    master = param.float() if dtype != torch.float32 else None
    adamw_step(param, grad, torch.zeros(hidden, 8), torch.zeros(hidden, 8), master, **steps)
    if dtype == torch.bfloat16:
        adamw_step(param, grad, torch.zeros_like(param), torch.zeros_like(param), None, **steps)
    # Zeroth-order: one direction's +/- evaluations through a perturbed linear (a few rows, and the
    # largest row tile), then an fp32 master updated along two directions.
    from lopt_kernels.zo_matmul import apply_directions_, perturbed_linear

    for rows in (tokens, 16 * tokens):
        perturbed_linear(torch.randn(2, rows, hidden).to(dtype), torch.randn(intermediate, hidden).to(dtype), [1],
                         1e-3, base=2**33)
    apply_directions_(torch.randn(hidden, 8), [1, 2], [1e-3, -1e-3], base=2**33)
    # The low-rank ZO term: 2 directions x +-eps (4 groups) at LoZO's rank and r = 128, into both widths,
    # for a few rows and for full 64-row tiles.
    from lopt_kernels.zo_lowrank import grouped_lowrank

    index, eps = torch.tensor([0, 0, 1, 1]), torch.tensor([1e-3, -1e-3, 1e-3, -1e-3])
    for rows in (tokens, 8 * tokens):
        for r in (8, 128):
            for n in (hidden, intermediate):
                grouped_lowrank(torch.randn(4, rows, hidden).to(dtype), torch.randn(2, hidden, r).to(dtype),
                                torch.randn(2, n, r).to(dtype), index, index, eps, torch.zeros(4, rows, n, dtype=dtype))


def record(models: dict[str, tuple], dtypes: list[torch.dtype]) -> list[Launch]:
    """The distinct launches of every op at each model's shapes and dtype, in first-seen order."""
    from unittest import mock

    from lopt_kernels import adamw

    distinct: dict[Launch, None] = {}
    for shapes in models.values():
        for dtype in dtypes:
            # The AdamW launcher gives the interpreter larger blocks (CPU test speed): record the GPU's.
            with recorded_launches() as launches, mock.patch.object(adamw, "INTERPRETER_BLOCK", adamw.BLOCK):
                exercise_ops(*shapes, dtype=dtype)
            distinct.update(dict.fromkeys(launches))
    return list(distinct)


def compile_launches(launches: list[Launch], arch: int = 90, timeout: float = 900) -> list[dict]:
    """Compile each launch for ``sm_<arch>`` in a child process without the interpreter.

    Returns, per launch, its description plus ``ok``, ``error``, ``shared_bytes``, ``registers``,
    ``spill_store_bytes``, ``spill_load_bytes`` and ``fits_shared`` (against the SM's limit).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"arch": arch, "launches": [launch.as_dict() for launch in launches]})
    child = subprocess.run([sys.executable, "-m", "benchmarks.kernel_compile", "--compile-stdin"], input=payload,
                           capture_output=True, text=True, env=env, timeout=timeout,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if child.returncode != 0:
        raise RuntimeError(f"the compiling process failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout)


def _compile_one(launch: dict, arch: int) -> dict:
    """In the child: triton.compile for the target, then ptxas -v for registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, name = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module_name), name)
    result = dict(launch, ok=False, error=None)
    try:
        source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch["num_warps"]})
    except Exception as error:  # report it, compile the others
        result["error"] = f"{type(error).__name__}: {str(error)[-1500:]}"
        return result
    result.update(ok=True, shared_bytes=compiled.metadata.shared, **_ptxas_usage(compiled.asm["ptx"], arch))
    result["fits_shared"] = result["shared_bytes"] <= ARCHES[arch]["max_shared_bytes"]
    result["programs_per_sm"] = programs_per_sm(result["registers"], launch["num_warps"], result["shared_bytes"], arch)
    return result


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int = 90) -> int:
    """How many programs of this kernel one SM holds at once, limited by registers (allocated per warp
    in units of 256), warps, programs and shared memory."""
    limits = ARCHES[arch]
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits["registers"] // (registers_per_warp * num_warps)
    by_shared = limits["shared_bytes"] // shared_bytes if shared_bytes else limits["programs"]
    return min(by_registers, limits["warps"] // num_warps, limits["programs"], by_shared)


def _ptxas_usage(ptx: str, arch: int) -> dict:
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", path,
                              "-o", os.path.join(folder, "kernel.cubin")], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
    }


def _child_main() -> None:
    request = json.load(sys.stdin)
    json.dump([_compile_one(launch, request["arch"]) for launch in request["launches"]], sys.stdout)


def _table(results: list[dict]) -> str:
    lines = ["| kernel | constexprs | warps | ok | shared B | regs | spill B | programs/SM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        pointers = sorted({t for t in r["signature"].values() if t.startswith("*") and t != "*i64"})
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        spill = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
        lines.append(f"| {r['kernel'].split(':')[1]} ({'/'.join(pointers)}) | {consts} | {r['num_warps']} | "
                     f"{'yes' if r['ok'] else 'NO: ' + r['error'][:80]} | {r.get('shared_bytes', '')} | "
                     f"{r.get('registers', '')} | {spill if r['ok'] else ''} | {r.get('programs_per_sm', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHES))
    parser.add_argument("--models", default=",".join(MODEL_SHAPES), help="comma-separated: " + ", ".join(MODEL_SHAPES))
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--compile-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_stdin:
        _child_main()
        return 0
    models = {name: MODEL_SHAPES[name] for name in args.models.split(",")}
    launches = record(models, [torch.bfloat16, torch.float32])
    results = compile_launches(launches, args.arch)
    print(_table(results))
    if args.out:
        import triton

        with open(args.out, "w") as f:
            json.dump({"arch": f"sm_{args.arch}", "triton": triton.__version__, "torch": torch.__version__,
                       "models": models, "kernels": results}, f, indent=1)
    bad = [r for r in results if not r["ok"] or not r["fits_shared"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
