"""``acc += a @ b`` into an fp32 accumulator, for the ops that sum weight gradients over chunks."""

import torch


def _addmm_has_out_dtype() -> bool:
    try:
        a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
        torch.addmm(torch.empty(2, 2, device="meta"), a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


_ADDMM_OUT_DTYPE = _addmm_has_out_dtype()


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product accumulated and kept in fp32 (acc is fp32; a, b may be fp16/bf16).

    On CUDA cuBLAS accumulates 16-bit inputs in fp32 and adds into ``acc`` directly, so no chunk's
    partial sum is rounded to 16 bits and no temporary is made.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # the CPU (where the interpreter runs the tests) and torch without out_dtype
        acc.addmm_(a.float(), b.float())
