"""The scripts in examples/ run as written."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopt.models.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_apply_hf_trainer_trains_and_saves_a_plain_checkpoint(tmp_path):
    out = tmp_path / "out"
    # conftest's OMP_NUM_THREADS=1 and TRITON_INTERPRET=1 (no GPU) reach the script through os.environ.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "apply_hf_trainer.py"), "--model", "tiny", "--output-dir", str(out),
         "--max-steps", "10"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # LoPT ran: LoPTCallback logged the reconstruction loss next to the task loss at every step.
    assert result.stdout.count("'aux_loss'") == 10
    # The model learned: 10 steps at lr 1e-3 take the random-init toy's held-out loss well below its start
    # (about ln(264) = 5.6; 4.2 after them on the machine this was written on).
    before, after = map(float, re.search(r"held-out loss: before ([\d.]+), after ([\d.]+)", result.stdout).groups())
    assert after < before - 0.5, result.stdout[-2000:]
    first, last = map(float, re.search(r"train loss: first step ([\d.]+), last step ([\d.]+)", result.stdout).groups())
    assert last < first

    # A plain checkpoint: no decoder tensors in the file, and it loads without a warning about unexpected keys.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lopt" in k or "decoder" in k for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lopt" in k for k in reloaded.state_dict())
    AutoTokenizer.from_pretrained(out)

    # The trained weights, not the toy's initial ones, were saved.
    initial = load_model("tiny").model.state_dict()
    trained = reloaded.state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


def test_the_readme_lopt_apply_snippet_runs_as_written(tmp_path):
    """The README's `lopt.apply` block, cut out of the README and run as it stands (the toy, 10 steps)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    snippet = readme.split("## Inside the trainers you already use: `lopt.apply`")[1].split("```python")[1]
    (tmp_path / "snippet.py").write_text(snippet.split("```")[0])
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lopt" in name or "decoder" in name for name, _ in model.named_parameters())
