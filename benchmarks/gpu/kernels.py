"""Part 1: the carried wheels installed, ``lopt_kernels._C`` built, the kernel tests run on CUDA.

    python -m benchmarks.gpu.kernels        (from benchmarks/gpu_session.sh; writes $OUT/kernels.json)

1. Wheels: ``.whl/*.whl`` (or ``$LOPT_WHEELS_DIR``) installed with ``pip --no-index --no-deps --target
   $LOPT_GPU_SITE`` (a folder the script put on PYTHONPATH): the machine's torch is left alone.
2. The extension: ``python setup.py build_ext --inplace`` for this GPU's architecture only, with
   ``LOPT_REQUIRE_CUDA_BUILD=1`` (a failed compile is an error, not a notice), in the background while the
   first tests run (it needs the CPU, they need the GPU); then a fresh process says whether
   ``lopt_kernels.has_extension()``. The dry run sets ``LOPT_SKIP_CUDA_BUILD=1`` (same command, no compile).
3. The kernel tests, with the inputs on CUDA (tests/conftest.py), in three pytest runs: ``gpu`` the tests marked
   gpu that do not need the extension (bf16 at real shapes: Qwen2-1.5B's and Llama-3.2-1B's heads, h up to
   4096, memory bounds, torch.compile), during the build; ``boundary`` every test of the boundary release and the
   extension, once the build is done (the 200-step run among them); ``rest`` all the others. pytest-xdist
   spreads them over processes where it is installed (the Triton compiles are CPU-bound), pytest-timeout bounds
   each test where it is installed. Every outcome is recorded as it happens (``benchmarks.gpu.pytest_record``),
   so a run cut at the part's limit keeps what it ran.

Each test file (and, in test_layer_ops.py, each op) is a kernel group with a verdict: ``wrong`` (a test of its
numbers failed), ``suspect`` (only a memory-bound, compile or dispatch test failed), ``ok`` (tests passed, none
failed) or ``untested``. Later parts skip what runs a wrong group (``benchmarks.gpu.common.USES``); a suspect or
failed test fails the part (its reason names them) without skipping anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import REPO, Part, dry_run, log, time_left, work_dir

FILES = ("tests/kernels/test_linear_cross_entropy.py", "tests/kernels/test_recon_loss.py", "tests/kernels/test_layer_ops.py",
         "tests/kernels/test_adamw.py", "tests/kernels/test_boundary.py", "tests/kernels/test_extension.py", "tests/engine/test_engine_kernels.py",
         "tests/kernels/test_patch.py")
GROUP_OF_FILE = {"test_linear_cross_entropy.py": "linear_cross_entropy", "test_recon_loss.py": "recon_loss",
                 "test_adamw.py": "adamw", "test_boundary.py": "boundary", "test_extension.py": "boundary",
                 "test_engine_kernels.py": "engine", "test_patch.py": "patch"}
LAYER_OPS = ("rms_norm", "swiglu", "rope")
GROUPS = ("linear_cross_entropy", "recon_loss", *LAYER_OPS, "layer_ops", "adamw", "boundary", "engine", "patch")
# The dry run's second phase: a few quick tests, one per group where one is quick in the interpreter.
DRY_SELECTION = ("test_has_extension_is_a_bool or test_modes_resolve or test_rms_norm_rejects or test_swiglu_rejects "
                 "or test_the_kernels_are_what_runs or test_bad_arguments_raise or test_shape_errors_are_reported "
                 "or test_shapes_must_match")
# Tests whose failure is not a wrong number: memory bounds, torch.compile, host syncs, which backend runs.
NOT_NUMERIC = ("compile", "memory", "working_set", "host_sync", "what_runs", "runs_the_kernel", "opcheck",
               "script_parses", "saves_only")
EXTENSION_FILES = ("tests/kernels/test_boundary.py", "tests/kernels/test_extension.py")
OTHER_FILES = tuple(f for f in FILES if f not in EXTENSION_FILES)
# name: pytest -m, files, what it is. In this order, unless the build is still running when the first is done:
# then the others go first and the boundary tests wait for it.
PHASES = {
    "gpu": ("gpu", OTHER_FILES, "the tests marked gpu: bf16 at real shapes, memory bounds, compile"),
    "boundary": (None, EXTENSION_FILES, "the boundary release and the extension (the 200-step GPU run too)"),
    "rest": ("not gpu", OTHER_FILES, "every other kernel test, its inputs on CUDA"),
}
SHARE = {"gpu": 0.45, "boundary": 0.4, "rest": 0.6, "last": 1.0}  # of the part's time left, at most


def group_of(nodeid: str) -> str:
    path, _, name = nodeid.partition("::")
    file = Path(path).name
    if file == "test_layer_ops.py":
        for op in LAYER_OPS:
            if op in name or (op == "rope" and "apply_rope" in name):
                return op
        return "layer_ops"
    return GROUP_OF_FILE.get(file, file)


def numeric(nodeid: str) -> bool:
    """Whether a failure of this test means wrong numbers (not a memory bound, a compile or a dispatch check)."""
    path, _, name = nodeid.partition("::")
    if Path(path).name == "test_patch.py":  # its other tests check what gets fused, not the numbers
        return "matches" in name
    return not any(word in name for word in NOT_NUMERIC)


def verdicts(records: list[dict]) -> dict:
    """Per group: counts, verdict and the failures (node id and the end of the message). ``wrong``: a test of
    the numbers failed (this gates the timed parts); ``suspect``: only other tests failed (reported, gates
    nothing); ``ok``: tests passed, none failed; ``untested``: none ran."""
    def empty():
        return {"passed": 0, "failed": 0, "skipped": 0, "failures": []}

    out = {g: empty() for g in GROUPS}
    for r in records:
        info = out.setdefault(group_of(r["nodeid"]), empty())
        outcome = r["outcome"] if r["outcome"] in ("passed", "failed", "skipped") else "failed"
        info[outcome] += 1
        if outcome == "failed":
            info["failures"].append({"test": r["nodeid"], "when": r["when"], "numeric": numeric(r["nodeid"]),
                                     "message": (r.get("message") or "")[-600:]})
    for info in out.values():
        if any(f["numeric"] for f in info["failures"]):
            info["verdict"] = "wrong"
        else:
            info["verdict"] = "suspect" if info["failed"] else ("ok" if info["passed"] else "untested")
    return out


_CHILDREN: list[subprocess.Popen] = []  # each in a process group of its own


def _kill(proc: subprocess.Popen) -> None:
    """The child's whole process group (pytest-xdist workers, the compiler under setup.py): TERM, then KILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _on_term(signum, frame):
    """The session's ``timeout`` signals this process's group; the children run in groups of their own (so that
    each can be killed whole): take them down too, then go."""
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    raise SystemExit(128 + signum)


def _run(cmd: list[str], *, env: dict, timeout: float, log_path: Path, on_tick=None) -> dict:
    """Run ``cmd`` in its own process group (killed whole at ``timeout``); the output goes to ``log_path``.
    ``on_tick()`` runs every few seconds meanwhile (the tests' verdicts are saved as they come)."""
    start = time.time()
    end = start + max(1.0, timeout)
    rc, timed_out = None, False
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        _CHILDREN.append(proc)
        while True:
            try:
                rc = proc.wait(timeout=max(0.1, min(5.0, end - time.time())))
                break
            except subprocess.TimeoutExpired:
                if time.time() >= end:
                    timed_out = True
                    break
                if on_tick is not None:
                    on_tick()
        if timed_out:
            _kill(proc)
        _CHILDREN.remove(proc)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-25:]
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - start, 1), "log_tail": tail}


def install_wheels(env: dict) -> dict:
    folder = Path(os.environ.get("LOPT_WHEELS_DIR") or REPO / ".whl")
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {folder}", "wheels": []}
    site = os.environ.get("LOPT_GPU_SITE") or str(work_dir() / "site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--disable-pip-version-check", "--target", site, *map(str, wheels)]
    result = _run(cmd, env=env, timeout=min(90, time_left() - 10), log_path=work_dir() / "wheels.log")
    listed = [{"file": w.name, "mb": round(w.stat().st_size / 2**20, 2), "distribution": w.name.split("-")[0]}
              for w in wheels]
    # what a later process sees: each distribution's version, found through PYTHONPATH
    names = [w["distribution"] for w in listed]
    check = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, json, sys; "
                            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))", *names],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    seen = json.loads(check.stdout) if check.returncode == 0 else None
    ok = result["rc"] == 0 and seen is not None
    reason = None if ok else ("pip install failed (see log_tail)" if result["rc"] != 0 else
                              "installed, but a fresh process does not find them: " + check.stderr.strip()[-300:])
    return {"status": "ok" if ok else "failed", "reason": reason, "site": site, "versions_seen": seen,
            "wheels": listed, **result}


class Build:
    """``setup.py build_ext --inplace`` started in the background; ``result()`` waits for it."""

    CHECK = "import json, lopt_kernels; print(json.dumps(lopt_kernels.has_extension()))"

    def __init__(self, env: dict):
        from .common import environment

        machine = environment()  # read, not found again: this process creates no CUDA context
        self.env, self.machine, self.proc, self.done = env, machine, None, None
        build_env = dict(env)
        if dry_run():
            build_env["LOPT_SKIP_CUDA_BUILD"] = "1"
        else:
            build_env["LOPT_REQUIRE_CUDA_BUILD"] = "1"
            build_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
            if machine.get("compute_capability") and "TORCH_CUDA_ARCH_LIST" not in build_env:
                build_env["TORCH_CUDA_ARCH_LIST"] = machine["compute_capability"]  # this GPU's only
            if "CUDA_HOME" not in build_env and Path("/usr/local/cuda").is_dir():
                build_env["CUDA_HOME"] = "/usr/local/cuda"
        self.cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        self.info = {"command": " ".join(self.cmd[1:]), "arch_list": build_env.get("TORCH_CUDA_ARCH_LIST")}
        if list((REPO / "lopt_kernels").glob("_C*.so")) and self._has_extension():
            self.done = {**self.info, "status": "ok", "has_extension": True, "seconds": 0,
                         "reason": "already built (lopt_kernels/_C*.so from an earlier call)"}
            return
        self.start = time.time()
        self.log_path = work_dir() / "build.log"
        self.sink = open(self.log_path, "w")  # noqa: SIM115 - closed in result()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=build_env, stdout=self.sink, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _CHILDREN.append(self.proc)

    def finished(self) -> bool:
        return self.done is not None or self.proc.poll() is not None

    def _has_extension(self) -> bool:
        out = subprocess.run([sys.executable, "-c", self.CHECK], cwd=REPO, env=self.env, capture_output=True, text=True,
                             timeout=120)
        return out.returncode == 0 and out.stdout.strip().endswith("true")

    def result(self, timeout: float) -> dict:
        if self.done is not None:
            return self.done
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            rc, timed_out = None, True
        self.sink.close()
        _CHILDREN.remove(self.proc)
        has = self._has_extension()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-25:]
        info = {**self.info, "has_extension": has, "rc": rc, "timed_out": timed_out,
                "seconds": round(time.time() - self.start, 1), "log_tail": tail}
        if dry_run():
            status, reason = "skipped", "dry run: LOPT_SKIP_CUDA_BUILD=1 (the command ran, compiled nothing)"
        elif not self.machine.get("torch_cuda"):
            status, reason = "skipped", f"torch {self.machine.get('torch')} is a CPU-only build"
        elif rc == 0 and has:
            status, reason = "ok", None
        else:
            status, reason = "failed", "timed out" if timed_out else "the build failed or _C did not import"
        self.done = {**info, "status": status, "reason": reason}
        return self.done


def run_tests(part: Part, env: dict, build: Build) -> list[dict]:
    record_path = work_dir() / "kernel-tests.jsonl"
    record_path.write_text("")
    test_env = dict(env, LOPT_TEST_RECORD=str(record_path))
    xdist = importlib.util.find_spec("xdist") is not None
    has_timeout = importlib.util.find_spec("pytest_timeout") is not None
    workers = min(8, max(2, (os.cpu_count() or 2) // 2))
    phases = []

    def save_verdicts():
        part["kernels"] = verdicts(_records(record_path))

    order = list(PHASES)
    while order:
        name = order.pop(0)
        marker, files, what = PHASES[name]
        if name == "boundary" and order and not build.finished():
            order.append(name)  # the extension is still compiling: the other tests first
            continue
        if name == "boundary":  # its tests need the extension: wait for the build
            part["build"] = build.result(timeout=time_left() - 20)
        share = SHARE["last"] if not order else SHARE[name]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.gpu.pytest_record", "-p", "no:cacheprovider",
               *files]
        if marker:
            cmd += ["-m", marker]
        if dry_run() and name == "rest":
            cmd += ["-k", DRY_SELECTION]
        if xdist and not dry_run():
            cmd += ["-n", str(workers)]
        if has_timeout:
            cmd += ["--timeout", "150"]
        budget = (time_left() - 5) * share
        if budget < 10:
            phases.append({"phase": name, "what": what, "status": "skipped", "reason": "no time left"})
            part["phases"] = phases
            continue
        log(f"kernel tests, {name}: up to {budget:.0f} s: {' '.join(cmd[3:])}")
        before = _count(record_path)
        result = _run(cmd, env=test_env, timeout=budget, log_path=work_dir() / f"tests-{name}.log",
                      on_tick=save_verdicts)
        # pytest exits 1 when a test failed, 5 when none was collected: the run itself worked
        status = "timed out" if result["timed_out"] else ("ok" if result["rc"] in (0, 1, 5) else "error")
        phases.append({"phase": name, "what": what, "command": " ".join(cmd[1:]), "status": status,
                       "outcomes": _count(record_path) - before, "xdist_workers": workers if xdist and not dry_run() else 0,
                       **result})
        part["phases"] = phases
        save_verdicts()
        records = _records(record_path)
        part["slowest"] = sorted(({"test": r["nodeid"], "s": r["duration"]} for r in records),
                                 key=lambda r: -r["s"])[:8]
    return _records(record_path)


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by the kill
    return out


def _count(path: Path) -> int:
    return len(path.read_text().splitlines())


def main() -> int:
    signal.signal(signal.SIGTERM, _on_term)
    part = Part("kernels", "Build lopt_kernels._C; the kernel tests on CUDA (bf16 at real shapes first)",
                files=list(FILES), kernels={g: {"verdict": "untested"} for g in GROUPS})
    env = dict(os.environ)
    part["wheels"] = install_wheels(env)
    build = Build(env)
    records = run_tests(part, env, build)
    part["build"] = build.result(timeout=5)
    kernels = verdicts(records)
    part["kernels"] = kernels
    wrong = [g for g, info in kernels.items() if info["verdict"] == "wrong"]
    suspect = [g for g, info in kernels.items() if info["verdict"] == "suspect"]
    untested = [g for g, info in kernels.items() if info["verdict"] == "untested"]
    problems = []
    if wrong:
        problems.append("wrong: " + ", ".join(f"{g} ({kernels[g]['failed']} failed)" for g in wrong))
    if suspect:
        problems.append("failed tests other than the numbers': " + ", ".join(
            f"{g} ({kernels[g]['failed']})" for g in suspect))
    if part["build"]["status"] == "failed":
        problems.append("the extension did not build (" + str(part["build"]["reason"]) + ")")
    if part["wheels"]["status"] == "failed":
        problems.append("the wheels did not install")
    if problems:
        return part.done("failed", "; ".join(problems))
    cut = [p["phase"] for p in part["phases"] if p["status"] != "ok"]
    note = []
    if cut:
        note.append(f"phase(s) {', '.join(cut)} did not finish")
    if untested:
        note.append("untested: " + ", ".join(untested))
    return part.done("ok", "; ".join(note) or None)


def markdown(data: dict) -> str:
    lines = []
    build, wheels = data.get("build") or {}, data.get("wheels") or {}
    if wheels:
        names = ", ".join(w["file"] for w in wheels.get("wheels", [])) or "none"
        lines.append(f"Wheels: {wheels.get('status')} ({names})" + (f": {wheels['reason']}" if wheels.get("reason") else ""))
    if build:
        lines.append(f"Extension build: {build.get('status')}, has_extension {build.get('has_extension')}, "
                     f"{build.get('seconds', '-')} s" + (f" ({build['reason']})" if build.get("reason") else ""))
    for phase in data.get("phases") or []:
        lines.append(f"Tests, {phase['phase']}: {phase['status']}, {phase.get('outcomes', 0)} outcomes in "
                     f"{phase.get('seconds', '-')} s")
    lines += ["", "| kernel group | verdict | passed | failed | skipped |", "|---|---|---:|---:|---:|"]
    for group, info in (data.get("kernels") or {}).items():
        lines.append(f"| {group} | {info.get('verdict')} | {info.get('passed', 0)} | {info.get('failed', 0)} "
                     f"| {info.get('skipped', 0)} |")
    failures = [f for info in (data.get("kernels") or {}).values() for f in info.get("failures", [])]
    if failures:
        lines += ["", "Failures:"]
        lines += [f"- `{f['test']}` ({f['when']}): {f['message'].strip().splitlines()[-1] if f['message'].strip() else ''}"
                  for f in failures[:20]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
