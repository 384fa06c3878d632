"""What the kernel tests share: seeded inputs, the error measures, the 16-bit criterion, the double-backward check.

A helper module, not a test module: the kernel tests import it (``from kernel_checks import ...``) and
no test module imports another.
"""

import torch
from conftest import KERNEL_DEVICE


def seeded_randn(*shape, seed=0, dtype=torch.float32, device=KERNEL_DEVICE, requires_grad=False):
    """Seeded normal values, drawn in float64 on the CPU (the same values on every device), then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return t.to(device).requires_grad_(requires_grad)


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; ``x`` must be finite."""
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_abs_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_no_worse_than_native(got, native, ref, *, slack, factor=1.0, error=rel_err, name=""):
    """The 16-bit criterion: the kernel's error against the float64 answer ``ref`` is no worse than plain
    PyTorch's (``native``, computed in the same dtype) times ``factor``, plus ``slack``."""
    err, native_err = error(got, ref), error(native, ref)
    assert err <= factor * native_err + slack, f"{name}: error {err:.3g} vs native's {native_err:.3g}"


def second_order_grads(fn, inputs, dtype=None, seed=7):
    """Hessian-vector products through ``fn`` by double backward, on fresh leaf copies of ``inputs``
    (floating ones cast to ``dtype`` if given; the others, labels or masks, passed as they are).

    First order: L = sum_j <c_j, o_j> + |o_j|^2 / 2 over the outputs o_j of fn, so the gradient that
    reaches fn depends on its inputs; g = dL/dx with create_graph=True for the inputs x that require grad.
    Second order: d/dx of sum_i <v_i, g_i> + |x_i|^2 / 2. The last term keeps that objective
    differentiable where g has lost its graph, so a dropped second-order term shows as a wrong value.
    """

    def leaf(t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

    leaves = [leaf(t) for t in inputs]
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def weights(t, offset):
        return seeded_randn(*t.shape, seed=seed + offset, dtype=t.dtype, device=t.device)

    loss = sum((weights(o, j) * o).sum() + o.square().sum() / 2 for j, o in enumerate(outs))
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    second = sum((weights(g, 100 + i) * g).sum() for i, g in enumerate(grads))
    second = second + sum(x.square().sum() / 2 for x in wrt)
    return torch.autograd.grad(second, wrt)


def double_backward(op, fn, reference, inputs, rtol=1e-4, atol=1e-4):
    """``"raised"`` when ``fn`` refuses a second-order gradient with an error that names ``lopt_kernels.<op>``;
    else asserts that its second-order gradients match ``reference``'s in float64 and returns ``"matched"``.
    Any other error, or a wrong value, fails."""
    try:
        got = second_order_grads(fn, inputs)
    except RuntimeError as error:
        message = str(error)
        assert f"lopt_kernels.{op} " in message and "double backward" in message, f"unclear error: {message}"
        return "raised"
    want = second_order_grads(reference, inputs, dtype=torch.float64)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{op} input {i}: {m}")
    return "matched"
