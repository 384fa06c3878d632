"""Every bad input to `lopt train` and `lopt plan` ends the same way: exit status 2, exactly one line on
stderr naming the problem (the flag or file, the value, what is allowed), and nothing touched: no
output directory, no file written. Almost all fail before a model is loaded, so they run in-process;
three go through a real process to show what a shell sees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lopt.cli import EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict:
    """Everything under ``root``: a file's or directory's path -> (size, mtime)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run_cli(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse exits from parse_args
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_refused(capsys, tmp_path, argv, *fragments):
    """``argv`` exits 2 with one ``lopt: error:`` line holding every fragment, and ``tmp_path`` is unchanged."""
    before = tree(tmp_path)
    code, err = run_cli(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_USAGE, (code, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("lopt: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree(tmp_path) == before
    assert not (tmp_path / "run").exists()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative or empty path lands here, where the test can see it
    return tmp_path


def train_argv(tmp_path, *flags):
    # One short step first (a later flag wins): should a check be missing, the test fails in a second.
    return ["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
            "--eval-max-examples", "0", *flags]


# ------------------------------------------------------------------------------- numeric `lopt train` flags

NUMERIC = [
    # (flags, fragments of the one line)
    (["--lr", "inf"], ["--lr", "got inf", "<= 1000"]),
    (["--lr", "nan"], ["--lr", "got nan"]),
    (["--lr", "1e999"], ["--lr", "got inf"]),  # argparse's float() turns this into inf
    (["--lr", "1e39"], ["--lr", "got 1e+39", "<= 1000"]),
    (["--lr", "0"], ["--lr", "> 0", "got 0"]),
    (["--lr=-1e-4"], ["--lr", "got -0.0001"]),  # argparse takes -1e-4 for a flag
    (["--lr-lower", "inf"], ["--lr-lower", "got inf"]),
    (["--lr-lower=-1e-3"], ["--lr-lower", ">= 0", "got -0.001"]),
    (["--weight-decay", "nan"], ["--weight-decay", "got nan"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0", "got -0.1"]),
    (["--weight-decay", "inf"], ["--weight-decay", "got inf"]),
    (["--lambda-aux", "nan"], ["--lambda-aux", "got nan"]),
    (["--lambda-aux", "inf"], ["--lambda-aux", "got inf"]),
    (["--lambda-aux", "-1"], ["--lambda-aux", "got -1"]),
    (["--max-grad-norm", "nan"], ["--max-grad-norm", "got nan"]),
    (["--max-grad-norm", "inf"], ["--max-grad-norm", "got inf"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm", "got -1"]),
    (["--min-lr-ratio", "nan"], ["--min-lr-ratio", "got nan"]),
    (["--min-lr-ratio", "1.5"], ["--min-lr-ratio", "<= 1", "got 1.5"]),
    (["--seed", str(2**70)], ["--seed", f"got {2**70}", str(2**64 - 1)]),
    (["--seed", "-1"], ["--seed", "got -1"]),
    (["--gpu-mem", "nan"], ["--gpu-mem", "got nan"]),
    (["--gpu-mem", "inf"], ["--gpu-mem", "got inf"]),
    (["--gpu-mem", "0"], ["--gpu-mem", "> 0", "got 0"]),
    (["--gpu-mem", "-1"], ["--gpu-mem", "got -1"]),
    (["--seq-len", "10000000"], ["--seq-len", "got 10000000", str(2**20)]),
    (["--seq-len", "1"], ["--seq-len", "got 1"]),
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["--batch-size", str(10**9)], ["--batch-size", f"got {10**9}"]),
    (["--grad-accum", "0"], ["--grad-accum", "got 0"]),
    (["--max-steps", "0"], ["--max-steps", "got 0"]),
    (["--max-steps", str(10**12)], ["--max-steps", f"got {10**12}"]),
    (["--epochs", "0"], ["--epochs", "got 0"]),
    (["--epochs", "-1"], ["--epochs", "got -1"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "got -1"]),
    (["--num-blocks", "0"], ["--num-blocks", "got 0"]),
    (["--log-every", "0"], ["--log-every", "got 0"]),
    (["--save-every", "-1"], ["--save-every", "got -1"]),
    (["--eval-every", "-1"], ["--eval-every", "got -1"]),
    (["--eval-max-examples", "-1"], ["--eval-max-examples", "got -1"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite"]),
    (["--early-lower-step", "--grad-accum", "2"], ["--early-lower-step", "--grad-accum 1"]),
]


@pytest.mark.parametrize("flags, fragments", NUMERIC, ids=[" ".join(f) for f, _ in NUMERIC])
def test_numeric_flag_out_of_range(capsys, workdir, flags, fragments):
    assert_refused(capsys, workdir, train_argv(workdir, *flags), *fragments)


EMPTY_PATHS = ["--data", "--eval-data", "--output-dir"]


@pytest.mark.parametrize("flag", EMPTY_PATHS)
def test_empty_path_flag(capsys, workdir, flag):
    argv = ["train", "--max-steps", "1", flag, ""] if flag == "--output-dir" else train_argv(workdir, flag, "")
    assert_refused(capsys, workdir, argv, flag, "empty")


# ------------------------------------------------------------------------------- argparse: one line too

ARGPARSE = [
    (["train", "--lr", "abc"], ["--lr", "invalid float value: 'abc'", "lopt train --help"]),
    (["train", "--batch-size", "1.5"], ["--batch-size", "invalid int value: '1.5'"]),
    (["train", "--optimizer", "sgd"], ["--optimizer", "invalid choice: 'sgd'"]),
    (["train", "--recipe", "4gb"], ["--recipe", "invalid choice: '4gb'"]),
    (["train", "--no-such-flag"], ["unrecognized arguments: --no-such-flag", "lopt train --help"]),
    (["train", "--lr"], ["--lr", "expected one argument"]),
    (["trian"], ["invalid choice: 'trian'", "lopt --help"]),
    (["plan", "--gpu-mem", "24"], ["--model", "required", "lopt plan --help"]),
    (["plan", "--model", "llama-3.2-1b", "--gpu-mem", "24", "--recipe", "8gb"], ["--recipe", "not allowed"]),
    (["plan", "--model", "llama-3.2-1b", "--gpu-mem", "lots"], ["--gpu-mem", "invalid float value"]),
]


@pytest.mark.parametrize("argv, fragments", ARGPARSE, ids=[" ".join(a) for a, _ in ARGPARSE])
def test_argparse_error_is_one_line(capsys, workdir, argv, fragments):
    assert_refused(capsys, workdir, argv, *fragments)


# ------------------------------------------------------------------------------- `lopt plan` flags

PLAN = [
    (["--gpu-mem", "nan"], ["--gpu-mem", "got nan"]),
    (["--gpu-mem", "inf"], ["--gpu-mem", "got inf"]),
    (["--gpu-mem", "0"], ["--gpu-mem", "got 0"]),
    (["--gpu-mem", "24", "--seq-len", "0"], ["--seq-len", "got 0"]),
    (["--gpu-mem", "24", "--seq-len", "10000000"], ["--seq-len", "got 10000000"]),
    (["--gpu-mem", "24", "--num-blocks", "0"], ["--num-blocks", "got 0"]),
    (["--gpu-mem", "24", "--tokens-per-step", "0"], ["--tokens-per-step", "got 0"]),
    (["--gpu-mem", "24", "--batch-size", "0"], ["--batch-size", "got 0"]),
]


@pytest.mark.parametrize("flags, fragments", PLAN, ids=[" ".join(f) for f, _ in PLAN])
def test_plan_flag_out_of_range(capsys, workdir, flags, fragments):
    assert_refused(capsys, workdir, ["plan", "--model", "llama-3.2-1b", *flags], *fragments)


# ------------------------------------------------------------------------------- data files (--data and --eval-data)


def bad_rows(n_good: int, bad_line: str) -> str:
    good = "".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(n_good))
    return good + bad_line + "\n"


# name -> (file content (bytes), fragments); None: a directory of that name
DATA_FILES = {
    "dir.jsonl": (None, ["dir.jsonl", "directory"]),
    "empty.jsonl": (b"", ["data file is empty", "empty.jsonl"]),
    "latin1.jsonl": ('{"question": "caf\u00e9", "answer": "a"}\n'.encode("latin-1"),
                     ["latin1.jsonl", "UTF-8", "line 1"]),
    "line31.jsonl": (bad_rows(30, '{"question": "q", "answer": }').encode(), ["line31.jsonl", "line 31"]),
    "notarow.jsonl": (bad_rows(2, "[1, 2]").encode(), ["notarow.jsonl", "line 3", "JSON object"]),
    "array.json": (b'[{"question": "q", "answer": "a"},\n {"question": "q",\n  "answer": ]', ["array.json", "line 3"]),
    "fields.jsonl": (b'{"text": "a", "label": 1}\n', ["none of the known fields", "found: label, text"]),
}


def make_data(tmp_path: Path, name: str) -> str:
    content, _ = DATA_FILES[name]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
@pytest.mark.parametrize("name", list(DATA_FILES))
def test_bad_data_file(capsys, workdir, flag, name):
    path = make_data(workdir, name)
    argv = train_argv(workdir, flag, path)
    if flag == "--eval-data":  # a small training set: the trainer tokenises it before it reads --eval-data
        (workdir / "train.jsonl").write_text(bad_rows(2, ""))
        argv += ["--data", str(workdir / "train.jsonl")]
    assert_refused(capsys, workdir, argv, *DATA_FILES[name][1])


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_missing_data_file(capsys, workdir, flag):
    assert_refused(capsys, workdir, train_argv(workdir, flag, str(workdir / "missing.jsonl")),
                   "not found", "missing.jsonl")


def test_unreadable_data_file(capsys, workdir, monkeypatch):
    """chmod 000 does not stop root (the test machines run as root), so the read itself is made to fail."""
    path = make_data(workdir, "line31.jsonl")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if str(self) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert_refused(capsys, workdir, train_argv(workdir, "--data", path), "line31.jsonl", "Permission denied")


# ------------------------------------------------------------------------------- real processes


def test_real_processes_print_one_line_and_exit_2(tmp_path):
    data = tmp_path / "line31.jsonl"
    data.write_bytes(DATA_FILES["line31.jsonl"][0])
    cases = [
        (["train", "--max-steps", "1", "--lr", "inf"], "--lr"),
        (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--data", str(data)], "line 31"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    before = tree(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "lopt.cli", *argv, "--output-dir", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for argv, _ in cases]
    for proc, (argv, fragment) in zip(procs, cases):
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == EXIT_USAGE, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("lopt: error: ") and fragment in lines[0], (argv, err)
        assert out == ""
    assert tree(tmp_path) == before
