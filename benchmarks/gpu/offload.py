"""Part 4b (if time remains): the offloaded Llama-3.1-8B step under a 24 GB cap against the planner's prediction.

    python -m benchmarks.gpu.offload        (from benchmarks/gpu_session.sh; writes $OUT/offload.json)

``lopt.planning.plan.plan`` picks the setting for Llama-3.1-8B-Instruct's shape on a 24 GiB card at seq 2048 (as
``lopt plan --model llama-3.1-8b-instruct --gpu-mem 24 --seq-len 2048`` does: on this machine, without
bitsandbytes, that is the sequential schedule with weights and optimizer state on the host, the state streamed);
the part runs exactly that setting, random-init bf16 weights, kernels on, under a 24 GiB cap
(``set_per_process_memory_fraction``): one warm-up optimizer step, then up to two timed ones while time is left.
Beside each measured figure, the planner's: device peak (``max_memory_allocated`` against the estimate's
``peak``), persistent bytes, pinned host bytes, bytes moved per step, and the step time against ``step_time``
(its assumed PCIe bandwidth and FLOP rate are recorded too: a model, not a measurement). The dry run: the toy
model on the CPU with the same layout forced (sequential, params offloaded, state streamed), its device bytes
counted (``ByteCounter``, the host buffers taken off).
"""

from __future__ import annotations

import gc
import time

from .common import GiB, Part, blocked_by, dry_run, log, time_left

MODEL, CAP_GB, SEQ_LEN = "llama-3.1-8b-instruct", 24.0, 2048
DRY = dict(model="tiny", cap_gb=1.0, seq_len=32)


def _plan_dict(p) -> dict:
    est, t = p.estimate, p.time
    return {"batch_size": p.batch_size, "grad_accum": p.grad_accum, "recompute": p.recompute, "optimizer": p.optimizer,
            "schedule": p.schedule, "offload": p.offload, "stream_state": p.stream_state, "kernels": p.kernels,
            "num_blocks": p.num_blocks, "fits": p.fits, "budget_gb": p.budget / GiB,
            "predicted_peak_gb": est.peak / GiB, "predicted_persistent_gb": est.persistent / GiB,
            "predicted_phase": est.peak_phase, "predicted_host_gb": est.host / GiB,
            "predicted_moved_gb": est.transfer / GiB, "predicted_step_s": t.step, "predicted_compute_s": t.compute,
            "predicted_transfer_s": t.transfer, "assumed_pcie_gb_s": p.pcie_gb_s, "assumed_tflops": p.tflops}


def main() -> int:
    import torch

    cuda = torch.cuda.is_available() and not dry_run()
    model_name, cap, seq = (MODEL, CAP_GB, SEQ_LEN) if cuda else (DRY["model"], DRY["cap_gb"], DRY["seq_len"])
    part = Part("offload", f"Offloaded {model_name} step under a {cap:g} GiB cap against the planner", model=model_name,
                cap_gb=cap, seq_len=seq, steps=[])
    reason = blocked_by("offload")
    if reason:
        return part.done("skipped", reason)
    if not cuda and not dry_run():
        return part.done("skipped", "needs CUDA")

    from benchmarks.e2e.bytecount import ByteCounter, tensors_of, unique_bytes
    from benchmarks.e2e.worker import _load_config
    from lopt import LoPTModel
    from lopt.models.shapes import build_model
    from lopt.training.offload import BlockOffload
    from lopt.training.optim import build_optimizer
    from lopt.planning.plan import plan

    dtype = torch.bfloat16 if cuda else torch.float32
    config = _load_config(model_name)
    search = {} if cuda else dict(schedules=("sequential",), offloads=("params",), stream_states=(True,),
                                  optimizers=("adamw-bf16",), tokens_per_step=2 * seq)
    chosen = plan(config, cap, seq, num_blocks=2, dtype=dtype, name=model_name, **search)
    part["plan"] = _plan_dict(chosen)
    log(f"offload: plan {part['plan']}")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), device)
    start = time.perf_counter()
    with torch.device(device):
        hf_model = build_model(config, seed=0, dtype=dtype)
    lm = LoPTModel(hf_model, num_blocks=chosen.num_blocks, recompute=chosen.recompute, kernels=chosen.kernels)
    lm.train()
    lr = 1e-5
    sequential = chosen.schedule == "sequential"
    if sequential:
        optimizers = [build_optimizer(chosen.optimizer, groups) for groups in lm.block_param_groups(lr)]
        offloader = BlockOffload(lm, optimizers, chosen.offload, device, stream_state=chosen.stream_state)
    else:
        optimizers, offloader = [build_optimizer(chosen.optimizer, lm.param_groups(lr))], None
    if cuda:
        torch.cuda.empty_cache()
    part["setup_s"] = round(time.perf_counter() - start, 1)
    gen = torch.Generator().manual_seed(1)
    micro = [{"input_ids": torch.randint(0, config.vocab_size, (chosen.batch_size, seq), generator=gen).to(device)}
             for _ in range(chosen.grad_accum)]

    def step():
        if sequential:
            lm.sequential_step(micro, on_block_done=offloader.step_block)
            offloader.step_block(lm.num_blocks - 1)
        else:
            for mb in micro:
                lm.train_step(mb)
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)

    def moved() -> int:
        return offloader.bytes_to_device + offloader.bytes_to_host if offloader else 0

    tokens = chosen.batch_size * chosen.grad_accum * seq
    last = None
    for index in range(3):  # a warm-up step, then up to two timed ones
        if index and last is not None and time_left() < 2 * last + 5:
            break
        gc.collect()
        moved_before = moved()
        row = {"step": index, "warmup": index == 0}
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                step()
                torch.cuda.synchronize()
            except torch.OutOfMemoryError as error:
                part.add("steps", {**row, "oom": True, "error": str(error).splitlines()[0][:300]})
                return part.done("failed", f"out of memory under the {cap:g} GiB cap the plan says it fits")
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device)
            row.update(peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GiB)
        else:
            host = offloader.host_tensors() if offloader else []
            with ByteCounter() as counter:
                counter.track(tensors_of(lm))
                for opt in optimizers:
                    counter.track(tensors_of(optimizer=opt))
                counter.track(t for mb in micro for t in mb.values())
                counter.track(host)
                host_bytes = unique_bytes(host)
                before = counter.current - host_bytes
                counter.reset_peak()
                t0 = time.perf_counter()
                step()
                seconds = time.perf_counter() - t0
            peak = counter.peak - host_bytes
        last = seconds
        predicted = part["plan"]
        row.update(step_s=seconds, tokens_per_s=tokens / seconds, persistent_gb=before / GiB, peak_gb=peak / GiB,
                   peak_vs_predicted=(peak / GiB) / predicted["predicted_peak_gb"],
                   step_vs_predicted=seconds / predicted["predicted_step_s"] if predicted["predicted_step_s"] else None,
                   moved_gb=(moved() - moved_before) / GiB)
        part.add("steps", row)
        log(f"offload: step {index}: {seconds:.2f} s, peak {peak / GiB:.3f} GiB")
    if offloader is not None:
        part["host_gb"] = unique_bytes(offloader.host_tensors()) / GiB
    return part.done("ok")


def markdown(data: dict) -> str:
    p = data.get("plan") or {}
    lines = []
    if p:
        lines.append(f"Plan for {data.get('model')} at seq {data.get('seq_len')} on {data.get('cap_gb'):g} GiB: batch "
                     f"{p['batch_size']} x {p['grad_accum']}, recompute {p['recompute']}, {p['optimizer']}, "
                     f"{p['schedule']}, offload {p['offload']}{' (streamed state)' if p['stream_state'] else ''}; "
                     f"fits {p['fits']}.")
    timed = [s for s in data.get("steps") or [] if not s.get("warmup") and s.get("step_s")]
    shown = timed or [s for s in data.get("steps") or [] if s.get("step_s")]
    if p:
        lines += ["", "| figure | planner | measured |", "|---|---:|---:|"]
        m = shown[-1] if shown else {}

        def f(value, spec=".3f"):
            return "-" if value is None else format(value, spec)

        lines.append(f"| device peak GiB | {f(p['predicted_peak_gb'])} | {f(m.get('peak_gb'))} |")
        lines.append(f"| persistent GiB | {f(p['predicted_persistent_gb'])} | {f(m.get('persistent_gb'))} |")
        lines.append(f"| host (pinned) GiB | {f(p['predicted_host_gb'])} | {f(data.get('host_gb'))} |")
        lines.append(f"| moved per step GiB | {f(p['predicted_moved_gb'])} | {f(m.get('moved_gb'))} |")
        lines.append(f"| step s (at {p['assumed_pcie_gb_s']:g} GB/s, {p['assumed_tflops']:g} TFLOP/s assumed) "
                     f"| {f(p['predicted_step_s'], '.2f')} | {f(m.get('step_s'), '.2f')} |")
        lines.append(f"| tokens/s | - | {f(m.get('tokens_per_s'), ',.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
