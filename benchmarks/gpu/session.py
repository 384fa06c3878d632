"""The GPU session's bookkeeping, called by benchmarks/gpu_session.sh between its parts.

    python -m benchmarks.gpu.session env --out FILE        the machine and versions, once, at the start
    python -m benchmarks.gpu.session finish PART --rc RC --budget S --limit S --elapsed S
    python -m benchmarks.gpu.session summary --parts a,b,c  $OUT/summary.md from whatever parts finished
    python -m benchmarks.gpu.session check-out              what would not come back from $OUT

``finish`` makes ``$OUT/PART.json`` final whatever happened to the part: a part still ``running`` was cut short
(its limit: ``timeout`` exited 124 or 137) or died (any other status); a part that wrote nothing gets a file
saying so. Every file gets the environment's fields where it lacks them, and the part's budget, limit, time
and exit status. Stray temporary files are removed: the device tool brings back at most 8 files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

from .common import METADATA, environment, out_dir, read_json, work_dir, write_json

MAX_FILES = 8  # what the device tool brings back from $OUT
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def finish(name: str, rc: int, budget: float, limit: float, elapsed: float) -> dict:
    out = out_dir()
    for stray in out.glob(".*.tmp"):
        stray.unlink(missing_ok=True)
    path = out / f"{name}.json"
    data = read_json(path)
    if data is None and rc == -1:
        data = {"part": name, "status": "skipped", "reason": "no time left in the session for this part"}
    elif data is None:
        cut = ", cut at its time limit" if rc in (124, 137) else ""
        data = {"part": name, "status": "failed", "reason": f"wrote no results (exit status {rc}{cut})" + _log_hint(name)}
    elif data.get("status") in (None, "running"):
        if rc in (124, 137):
            data.update(status="failed", reason=f"cut at its time limit ({limit:.0f} s); the file keeps what it measured",
                        timed_out=True)
        else:
            data.update(status="failed", reason=f"exited with status {rc} before it finished" + _log_hint(name))
    env = environment()
    for key, value in env.items():
        if data.get(key) is None:
            data[key] = value
    data["session"] = {"budget_s": budget, "limit_s": limit, "elapsed_s": elapsed, "exit_status": rc}
    write_json(path, data)
    print(f"=== {name}: {data['status']}" + (f" ({data['reason']})" if data.get("reason") else "")
          + f" after {elapsed:.0f} s of {limit:.0f} s", flush=True)
    return data


def _log_hint(name: str) -> str:
    return f"; see session.log around '=== {name}'"


def summary(parts: list[str]) -> Path:
    out = out_dir()
    env = environment()
    lines = [f"# GPU session: {env.get('device')}", "",
             ", ".join(f"{k} {env.get(k)}" for k in (*METADATA, "transformers", "liger_kernel", "python", "source_digest")
                       if env.get(k) is not None) + ("; DRY RUN (toy shapes on the CPU)" if env.get("dry_run") else ""),
             "", "| part | status | time s (limit) | reason |", "|---|---|---:|---|"]
    found = {}
    for name in parts:
        data = read_json(out / f"{name}.json")
        found[name] = data
        if data is None:
            lines.append(f"| {name} | missing | - | - |")
            continue
        session = data.get("session") or {}
        lines.append(f"| {name} | {data.get('status')} | {session.get('elapsed_s', data.get('elapsed_s', '-'))} "
                     f"({session.get('limit_s', '-')}) | {(data.get('reason') or '').replace('|', '/')[:160]} |")
    for name, data in found.items():
        if data is None:
            continue
        lines += ["", f"## {name}: {data.get('title', '')}", ""]
        try:
            module = importlib.import_module(f"benchmarks.gpu.{name}")
            lines.append(module.markdown(data))
        except Exception as error:  # noqa: BLE001 - a summary of what is there, whatever broke
            lines.append(f"(no summary: {type(error).__name__}: {error})")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_out() -> list[str]:
    """Problems that would keep files in $OUT from coming back (device tool: at most 8 files, plain names)."""
    out = out_dir()
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in $OUT; at most {MAX_FILES} come back: {sorted(p.name for p in files)}")
    problems += [f"bad name: {p.name}" for p in files if not NAME.match(p.name)]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.session")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--out", required=True)
    fin = sub.add_parser("finish")
    fin.add_argument("part")
    fin.add_argument("--rc", type=int, required=True, help="the part's exit status; -1: not started (no time left)")
    fin.add_argument("--budget", type=float, required=True)
    fin.add_argument("--limit", type=float, required=True)
    fin.add_argument("--elapsed", type=float, required=True)
    summ = sub.add_parser("summary")
    summ.add_argument("--parts", required=True)
    sub.add_parser("check-out")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .common import compute_environment

        data = compute_environment()
        Path(args.out).write_text(json.dumps(data, indent=1))
        print("environment: " + ", ".join(f"{k} {data[k]}" for k in (*METADATA, "source_digest")), flush=True)
        work_dir()
        return 0
    if args.command == "finish":
        data = finish(args.part, args.rc, args.budget, args.limit, args.elapsed)
        return 3 if data["status"] == "failed" else 0
    if args.command == "summary":
        print(f"wrote {summary([p for p in args.parts.split(',') if p])}", flush=True)
        return 0
    problems = check_out()
    for problem in problems:
        print("check-out: " + problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
