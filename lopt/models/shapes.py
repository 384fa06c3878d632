"""Model configurations built locally (no download): tiny ones for tests and the embedded default,
and the shapes of real checkpoints shipped as JSON for benchmarks and planning."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SHIPPED_CONFIGS_DIR = Path(__file__).parent / "model_configs"


def tiny_config(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    vocab_size: int = 128,
    intermediate_size: int | None = None,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    **overrides,
) -> PretrainedConfig:
    """A small random-init config of one of the supported families."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    fields = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 2 * hidden_size + hidden_size // 2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
    )
    if family == "qwen3":
        fields["head_dim"] = hidden_size // num_attention_heads
    fields.update(overrides)
    attn = fields.pop("attn_implementation")
    config = AutoConfig.for_model(family, **fields)
    config._attn_implementation = attn
    return config


def shipped_config_names() -> list[str]:
    """The names of the shapes in ``lopt/model_configs/``, sorted."""
    return sorted(p.stem for p in SHIPPED_CONFIGS_DIR.glob("*.json"))


def shipped_config(name: str) -> PretrainedConfig:
    """The config of a real checkpoint shipped in ``lopt/model_configs/<name>.json``."""
    path = SHIPPED_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(shipped_config_names())
        raise ValueError(f"no shipped config named {name!r}; known: {known}")
    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_model(config: PretrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init causal LM from ``config``, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
