"""patch()/unpatch() on tiny Llama, Qwen2, Qwen3 and Mistral models: same logits and gradients as the
model's own code, this instance only, nothing saved changes, every op fused with the installed transformers."""

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lopt_kernels import current_backend
from lopt_kernels.patch import FUSED_OPS, SUPPORTED_MODEL_TYPES, fused_ops, is_patched, patch, unpatch

LAYERS = 2
Q_HEADS = 4


def _tiny_model(model_type, seed=0, **overrides):
    """A random-init model small enough for the Triton interpreter: odd widths, 4 query heads over 2 key heads."""
    fields = {
        "hidden_size": 48,
        "intermediate_size": 88,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": 2,
        "vocab_size": 97,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    if model_type == "qwen3":
        fields["head_dim"] = 12
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _randn_like_heads(heads, seed=0):
    return torch.randn(1, heads, 5, 12, generator=torch.Generator().manual_seed(seed))


def _tokens(seed=1):
    return torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(seed))


def _logits_and_grads(model, tokens, graph=None):
    """Logits, every parameter's gradient of the LM loss, and (into ``graph``) the autograd nodes' names."""
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=tokens)
    if graph is not None:
        graph.update(_graph_functions(out.loss))
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _patched_modules(model):
    return {name for name, module in model.named_modules() if "forward" in module.__dict__}


def _expected_fused(model_type, layers=LAYERS):
    """Modules per op a patched tiny model runs fused: 2 norms a layer (4 with Qwen3's q_norm and k_norm)
    and the final norm, one MLP and one attention a layer."""
    norms_per_layer = 4 if model_type == "qwen3" else 2
    return {"rms_norm": layers * norms_per_layer + 1, "swiglu": layers, "rope": layers}


def _unfused_message(model_type, got):
    expected = _expected_fused(model_type)
    missing = [f"{op} ({got[op]} of {expected[op]} modules)" for op in FUSED_OPS if got[op] != expected[op]]
    return f"{model_type} with transformers {transformers.__version__}: unfused {', '.join(missing)}"


def _graph_functions(tensor):
    """Names of the autograd nodes that produced ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_patched_model_matches_unpatched(model_type):
    model = _tiny_model(model_type)
    tokens = _tokens()
    logits, grads = _logits_and_grads(model, tokens)

    assert patch(model) is model
    got = fused_ops(model)
    assert got == _expected_fused(model_type), _unfused_message(model_type, got)

    graph = set()
    patched_logits, patched_grads = _logits_and_grads(model, tokens, graph)
    torch.testing.assert_close(patched_logits, logits, rtol=1e-5, atol=1e-5)
    assert patched_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(
            patched_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    if current_backend("cpu") == "triton":
        assert {"_RMSNormFunctionBackward", "_SwiGLUFunctionBackward", "_RoPEFunctionBackward"} <= graph

    assert unpatch(model) is model
    assert not is_patched(model) and not _patched_modules(model)
    assert fused_ops(model) == dict.fromkeys(FUSED_OPS, 0)
    unpatched_logits, unpatched_grads = _logits_and_grads(model, tokens)
    assert torch.equal(unpatched_logits, logits)
    assert all(torch.equal(unpatched_grads[name], grads[name]) for name in grads)


def test_patch_is_per_instance_and_idempotent():
    from transformers.models.llama import modeling_llama

    class_forwards = {cls: cls.forward for cls in (modeling_llama.LlamaAttention, modeling_llama.LlamaMLP)}
    rope_function = modeling_llama.apply_rotary_pos_emb
    model, other = _tiny_model("llama"), _tiny_model("llama")

    patch(model)
    forwards = _installed_forwards(model)
    patch(model)
    assert _installed_forwards(model) == forwards
    assert fused_ops(model) == _expected_fused("llama")
    assert is_patched(model) and not is_patched(other) and not _installed_forwards(other)
    assert modeling_llama.apply_rotary_pos_emb is rope_function
    assert all(cls.forward is forward for cls, forward in class_forwards.items())

    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, other(tokens).logits, rtol=1e-5, atol=1e-5)


def _installed_forwards(model):
    """Every instance-level forward of the model's modules and of their kernel-hub function layers."""
    forwards = {}
    for name, module in model.named_modules():
        layers = {name: module, **{f"{name}/{key}": layer for key, layer in module.__dict__.get("_kernel_funcs", {}).items()}}
        forwards.update({key: layer.forward for key, layer in layers.items() if "forward" in layer.__dict__})
    return forwards


def test_patch_changes_nothing_that_is_saved(tmp_path):
    model = _tiny_model("qwen3")
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path / "before")
    patch(model)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "after")
    for before in sorted((tmp_path / "before").iterdir()):
        assert before.read_bytes() == (tmp_path / "after" / before.name).read_bytes(), before.name


def test_mlp_is_left_alone_unless_its_activation_is_silu():
    model = _tiny_model("llama", hidden_act="gelu")
    patch(model, rope=False)
    assert fused_ops(model) == {"rms_norm": 2 * LAYERS + 1, "swiglu": 0, "rope": 0}


def test_a_forward_already_replaced_on_the_instance_is_kept():
    """E.g. accelerate's hooks: patch() leaves such a module as it is, and unpatch() does not remove it."""
    model = _tiny_model("mistral")
    norm = model.model.norm
    hooked = norm.forward
    norm.forward = lambda hidden_states: hooked(hidden_states)
    mine = norm.forward
    patch(model)
    assert norm.forward is mine
    unpatch(model)
    assert norm.forward is mine


def test_unsupported_modules_are_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert patch(model) is model and not is_patched(model)


def test_bf16_inference_matches():
    """The eval path in bf16: no autograd graph, logits within bf16 rounding of the model's own."""
    model = _tiny_model("qwen3").to(torch.bfloat16)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits.float()
        got = patch(model)(tokens).logits.float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 0.02 * scale


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Stands for an older modeling module's global; patched attention must not call it."""
    raise AssertionError("the original apply_rotary_pos_emb ran")


class _OlderAttention:
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_rope_stands_in_for_the_older_signature_too():
    """Older transformers' apply_rotary_pos_emb took an unused position_ids before unsqueeze_dim."""
    from lopt_kernels.patch import _attention_forward_with_rope

    forward = _attention_forward_with_rope(_OlderAttention)
    q, k = _randn_like_heads(Q_HEADS), _randn_like_heads(2)
    cos, sin = torch.ones(1, 5, 12), torch.zeros(1, 5, 12)
    q_out, k_out = forward(None, q, k, cos, sin)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def _renaming(old, new):
    """A decorator of the shape transformers' ``deprecate_kwarg`` has: it renames a keyword, then calls on."""
    import functools

    def decorate(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapped

    return decorate


class _DecoratedAttention:
    @_renaming("legacy", "past_key_values")
    @_renaming("past_key_values", "cache")
    def forward(self, q, k, cos, sin, cache=None):
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, cache


def test_rope_is_fused_under_decorators_that_keep_working():
    """transformers 5.2x wraps every attention forward in deprecate_kwarg: RoPE is still swapped in, and
    the wrappers still run (two stacked renames: legacy -> past_key_values -> cache)."""
    from lopt_kernels.patch import _attention_forward_with_rope

    forward = _attention_forward_with_rope(_DecoratedAttention)
    assert forward is not None and forward is not _DecoratedAttention.forward
    q, k = _randn_like_heads(Q_HEADS), _randn_like_heads(2)
    cos, sin = torch.ones(1, 5, 12), torch.zeros(1, 5, 12)
    q_out, k_out, cache = forward(None, q, k, cos, sin, legacy="kept")
    assert torch.equal(q_out, q) and torch.equal(k_out, k) and cache == "kept"
    assert _DecoratedAttention.forward.__wrapped__.__wrapped__.__globals__["apply_rotary_pos_emb"] is apply_rotary_pos_emb


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_every_family_fuses_every_op_with_the_installed_transformers(model_type, caplog):
    """No family may silently fall back to an unfused op: the failure names the family, the op and the
    transformers version, and patch() itself logs no warning."""
    model = _tiny_model(model_type)
    with caplog.at_level("WARNING", logger="lopt_kernels.patch"):
        patch(model)
    got = fused_ops(model)
    assert got == _expected_fused(model_type), _unfused_message(model_type, got)
    assert not caplog.records, f"{model_type} with transformers {transformers.__version__}: {caplog.text}"


def test_an_unfusable_rope_warns_once_naming_the_version(caplog, monkeypatch):
    """Where neither route fits (here: the rebuild is made to find nothing), the model still runs, and
    one warning names the class, the op and the transformers version."""
    import importlib

    patch_module = importlib.import_module("lopt_kernels.patch")  # the package's ``patch`` is the function
    model = _tiny_model("llama")
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens).logits
    monkeypatch.setattr(patch_module, "_hub_rope_layers", lambda attention: [])
    monkeypatch.setattr(patch_module, "_attention_forward_with_rope", lambda cls: None)
    with caplog.at_level("WARNING", logger="lopt_kernels.patch"):
        patch(model)
    assert fused_ops(model)["rope"] == 0 and fused_ops(model)["rms_norm"] > 0
    assert len(caplog.records) == 1
    assert "LlamaAttention (rope)" in caplog.text and transformers.__version__ in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_loaded_model_stays_fused_through_train_and_eval(tmp_path):
    """transformers >= 5.25 kernelizes a model that from_pretrained loads, and again at every train()/eval();
    patch() turns that off for this model (so the fused ops stay), unpatch() turns it back on."""
    _tiny_model("mistral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    kernelized = getattr(model, "use_kernels", False)
    patch(model)
    model.train()
    model.eval()
    got = fused_ops(model)
    assert got == _expected_fused("mistral"), _unfused_message("mistral", got)
    unpatch(model)
    assert fused_ops(model) == dict.fromkeys(FUSED_OPS, 0)
    assert getattr(model, "use_kernels", False) == kernelized
