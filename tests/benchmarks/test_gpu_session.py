"""The one-command GPU session (benchmarks/gpu_session.sh), dry-run on the CPU: every part runs through the same
code at toy shapes into a scratch $OUT, so the command a GPU machine gets cannot fail on a typo, and its parts'
time limits add up to at most 8 minutes. What needs CUDA (the extension's compile, bf16 kernels at real shapes,
CUDA timings and memory, Liger-Kernel, the 8B model) is skipped there with a reason in the part's file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
METADATA = ("device", "torch", "triton", "commit", "date")
WHEEL = ("lopt_dry_wheel", "0.1")


def listed_parts() -> tuple[list[tuple[str, int]], int]:
    out = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True, timeout=30)
    parts, total = [], None
    for line in out.stdout.split("\n"):
        if not line.strip():
            continue
        name, seconds = line.split()
        if name == "total":
            total = int(seconds)
        else:
            parts.append((name, int(seconds)))
    return parts, total


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_budgets_fit_eight_minutes():
    parts, total = listed_parts()
    names = [name for name, _ in parts]
    assert names[:3] == ["kernels", "e2e", "micro"]  # the decision-relevant parts first
    assert len(set(names)) == len(names) and all(seconds > 0 for _, seconds in parts)
    assert total <= 480 and sum(seconds for _, seconds in parts) <= total
    for name in names:
        assert (ROOT / "benchmarks" / "gpu" / f"{name}.py").is_file(), name
    # the bookkeeping outside the parts fits in what their budgets leave of the total
    assert total - sum(seconds for _, seconds in parts) >= 10


def _dummy_wheel(folder: Path) -> Path:
    """A one-module pure-Python wheel: the carried-wheels path (pip --no-index --target) runs offline on it."""
    name, version = WHEEL
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()] + [f"{info}/RECORD,,"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for file, data in files.items():
            archive.writestr(file, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole script, once, in dry-run mode: (its $OUT, the completed process)."""
    tmp = tmp_path_factory.mktemp("gpu-session")
    out = tmp / "out"
    wheels = tmp / "wheels"
    _dummy_wheel(wheels)
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, LOPT_WHEELS_DIR=str(wheels), TMPDIR=str(tmp),
               LOPT_COMMIT=os.environ.get("LOPT_COMMIT", "dry-run-without-git"))
    env.pop("TRITON_INTERPRET", None)  # the parts' fused ops take their references on the CPU, as on any CPU
    env.pop("LOPT_GPU_DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    return out, proc


def _part(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_dry_run_writes_every_part_with_metadata_and_status(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    parts, _ = listed_parts()
    for name, budget in parts:
        data = _part(out, name)
        for key in METADATA:
            assert data.get(key), (name, key, data.get(key))
        assert data["dry_run"] is True and data["device"].startswith("cpu")
        assert data["status"] in ("ok", "skipped", "failed"), (name, data["status"])
        assert data["status"] != "failed", (name, data.get("reason"))
        if data["status"] != "ok":
            assert data.get("reason"), name
        session = data["session"]
        assert session["budget_s"] == budget and session["exit_status"] == 0 and session["limit_s"] >= budget - 15
    summary = (out / "summary.md").read_text()
    for name, _ in parts:
        assert f"## {name}:" in summary and f"| {name} |" in summary
    assert "DRY RUN" in summary
    log = (out / "session.log").read_text()
    assert "=== done in" in log
    # what the device tool brings back: at most 8 files, plain names, nothing deeper
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {p.parent for p in files} == {out}, sorted(p.name for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and not p.name.startswith(".") for p in files)


def test_dry_run_parts_exercised_their_code(dry_run):
    out, _ = dry_run
    kernels = _part(out, "kernels")
    assert kernels["wheels"]["status"] == "ok" and kernels["wheels"]["versions_seen"] == {WHEEL[0]: WHEEL[1]}
    assert kernels["build"]["status"] in ("skipped", "ok") and kernels["build"].get("command")
    assert sorted(p["phase"] for p in kernels["phases"]) == ["boundary", "gpu", "rest"]
    assert all(p["status"] == "ok" for p in kernels["phases"])
    assert not [g for g, info in kernels["kernels"].items() if info["verdict"] == "wrong"]
    assert sum(info["passed"] for info in kernels["kernels"].values()) >= 5

    e2e = _part(out, "e2e")
    rows = {r["method"]: r for r in e2e["rows"]}
    assert set(rows) == {"hf", "hf+liger", "lopt-paper", "lopt", "lopt+kernels"}
    for method in ("hf", "lopt-paper", "lopt", "lopt+kernels"):
        assert rows[method]["tokens_per_s"] > 0 and rows[method]["transient_peak_gb"] > 0, rows[method]
    assert rows["lopt+kernels"]["predicted_peak_gb"] > 0  # the planner beside the measured peak

    micro = _part(out, "micro")
    impls = {(r["op"], r["impl"]): r for r in micro["rows"]}
    for key in (("linear_cross_entropy", "fused"), ("linear_cross_entropy", "eager"),
                ("linear_cross_entropy", "compiled-chunked"), ("recon_loss", "fused"), ("recon_loss", "eager"),
                ("recon_loss", "compiled")):
        assert impls[key]["status"] == "ok" and impls[key]["median_ms"] > 0, impls[key]
        assert impls[key]["grad_rel_err"] < 1e-4, impls[key]  # each timed implementation computes the same thing
    assert impls[("linear_cross_entropy", "liger")]["status"] == "skipped"

    zo = _part(out, "zo")
    rows = {r["impl"]: r for r in zo["rows"]}
    assert zo["status"] == "ok", zo.get("reason")
    for impl in ("mezo-loop", "plain-loop", "lopt-lowrank", "lopt-fullrank"):  # the reference loops and the engine
        assert rows[impl]["status"] == "ok" and rows[impl]["step_ms"] > 0 and rows[impl]["tokens_per_s"] > 0, rows[impl]
        assert rows[impl]["speedup_vs_mezo"] > 0 and rows[impl]["abs_loss_diff"] >= 0, rows[impl]
    assert rows["lopt-highrank"]["status"] == "ok" or rows["lopt-highrank"].get("reason"), rows["lopt-highrank"]
    assert zo["inference"]["forward_ms"] > 0 and zo["shape"]["directions"] == 1
    assert zo["selftest"]["finite"] and zo["selftest"]["max_param_change"] > 0

    capped = _part(out, "capped")
    measured = [r for r in capped["rows"] if r.get("tokens_per_s")]
    assert measured and all(r["mem_cap_gb"] == capped["cap_gb"] for r in measured)
    assert capped["sizing"][0]["planner_max_batch"] >= 1

    offload = _part(out, "offload")
    assert offload["plan"]["offload"] == "params" and offload["plan"]["schedule"] == "sequential"
    timed = [s for s in offload["steps"] if s.get("step_s")]
    assert timed and all(s["peak_gb"] > 0 and s["moved_gb"] > 0 for s in timed)


def _session(out: Path, *args) -> subprocess.CompletedProcess:
    machine = out.parent / "env.json"  # as the script writes it at its start (no torch import per call)
    machine.write_text(json.dumps({"device": "cpu (test)", "torch": "t", "triton": "tr", "commit": None, "date": "d"}))
    env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT), LOPT_GPU_ENV=str(machine))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu.session", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_finish_marks_a_part_cut_short_or_missing(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    (tmp_path / "e2e.json").write_text(json.dumps({"part": "e2e", "status": "running", "rows": [{"method": "hf"}]}))
    (tmp_path / ".e2e.json.tmp").write_text("{")
    common = ["--budget", "120", "--limit", "130", "--elapsed", "130"]
    assert _session(tmp_path, "finish", "e2e", "--rc", "124", *common).returncode == 3
    cut = _part(tmp_path, "e2e")
    assert cut["status"] == "failed" and cut["timed_out"] and "time limit" in cut["reason"]
    assert cut["rows"] == [{"method": "hf"}]  # what it measured is kept
    assert all(cut.get(key) for key in ("device", "torch", "date")) and "commit" in cut
    assert not (tmp_path / ".e2e.json.tmp").exists()
    assert _session(tmp_path, "finish", "micro", "--rc", "1", *common).returncode == 3
    assert _part(tmp_path, "micro")["status"] == "failed"
    assert _session(tmp_path, "finish", "offload", "--rc", "-1", *common).returncode == 0
    assert _part(tmp_path, "offload")["status"] == "skipped"
    assert _session(tmp_path, "summary", "--parts", "e2e,micro,offload,zo").returncode == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| e2e | failed |" in summary and "| zo | missing |" in summary


def test_kernel_verdicts_gate_only_what_runs_a_wrong_kernel(tmp_path, monkeypatch):
    from benchmarks.gpu import common, kernels

    def rec(nodeid, outcome):
        return {"nodeid": nodeid, "when": "call", "outcome": outcome, "message": "assert ..."}

    verdicts = kernels.verdicts([
        rec("tests/test_recon_loss.py::test_gpu_bf16_no_worse_than_native_bf16[2048]", "failed"),
        rec("tests/test_linear_cross_entropy.py::test_gpu_memory_is_bounded", "failed"),
        rec("tests/test_linear_cross_entropy.py::test_matches_float64[x]", "passed"),
        rec("tests/test_layer_ops.py::test_rope_matches_float64[1-dtype0]", "passed"),
        rec("tests/test_layer_ops.py::test_double_backward_is_exact_or_refused[swiglu-raised]", "failed"),
        rec("tests/test_patch.py::test_every_family_fuses_every_op_with_the_installed_transformers[llama]", "failed"),
    ])
    got = {group: info["verdict"] for group, info in verdicts.items()}
    assert got["recon_loss"] == "wrong" and got["swiglu"] == "wrong" and got["rope"] == "ok"
    assert got["linear_cross_entropy"] == "suspect"  # a memory bound, not a wrong number
    assert got["patch"] == "suspect" and got["adamw"] == "untested"
    monkeypatch.setenv("OUT", str(tmp_path))
    (tmp_path / "kernels.json").write_text(json.dumps({"kernels": verdicts, "build": {"has_extension": False}}))
    assert "recon_loss" in common.blocked_by("lopt+kernels") and "swiglu" in common.blocked_by("lopt+kernels")
    assert common.blocked_by("lce:fused") is None and "recon_loss" in common.blocked_by("recon:fused")
    assert common.blocked_by("hf") is None and not common.extension_wrong()
