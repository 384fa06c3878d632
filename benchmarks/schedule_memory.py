"""Device-resident peak and step time of each schedule and offload setting, counted on the CPU.

``python -m benchmarks.schedule_memory`` runs, for the toy (Llama, hidden 128, 8 layers) and SmolLM2-135M's
shape (Llama, hidden 576, 30 layers, vocab 49152), random-init and fp32, one optimizer step of two
micro-batches per setting: interleaved (``train_step`` per micro-batch, one AdamW); sequential
(``sequential_step``, one AdamW per block stepped as the block finishes) without offload, with the
optimizer state offloaded, with weights and state offloaded, and the same with the state streamed
through each block's step (``lopt.training.offload.BlockOffload``).

Device bytes: ``benchmarks.e2e.bytecount.ByteCounter`` counts every live tensor; the host and the device
are the same memory here, so the offload's host buffers (``BlockOffload.host_tensors``) are taken off.
Exact bytes of tensors, not an allocator's. Step time: the wall time of one uncounted step after a
warm-up, on this machine's CPU (the copies are memcpy, not PCIe), so it shows the schedule's own cost,
not the transfers'. One run each. Writes ``benchmarks/results/schedule-memory-<date>.{json,md}``.

``measure_windows`` is also the oracle of ``tests/planning/test_plan.py``'s schedule and offload checks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.e2e.bytecount import ByteCounter, tensors_of, unique_bytes

SETTINGS = [  # schedule, offload, stream_state
    ("interleaved", "none", False),
    ("sequential", "none", False),
    ("sequential", "optimizer", False),
    ("sequential", "params", False),
    ("sequential", "params", True),
]


def measure_windows(lm, optimizer_name: str, micro: list[dict], schedule: str, offload: str = "none",
                    stream: bool = False, lr: float = 1e-3) -> dict:
    """Device bytes of one step, window by window, after two warm-up steps, and the wall time of one more.

    Device bytes: every storage the counter sees minus the offload's host buffers. Windows: ``("block", b)``
    from the end of block b-1's step to the start of block b's, ``("step", b)`` block b's step
    (``BlockOffload.step_block``); interleaved: ``("block", 0)`` the micro-batches' ``train_step`` and
    ``("step", 0)`` the optimizer step. Returns ``before`` (device bytes before the step), ``host``,
    ``windows`` (each one's peak), ``moved`` (bytes the offload copied during the step) and ``seconds``.
    """
    from lopt.training.offload import BlockOffload
    from lopt.training.optim import build_optimizer

    def make(groups):
        if optimizer_name == "torch-adamw":
            return torch.optim.AdamW(groups, lr=lr, foreach=False)
        return build_optimizer(optimizer_name, groups)

    if schedule == "interleaved":
        optimizers, offloader = [make(lm.param_groups(lr))], None
    else:
        optimizers = [make(groups) for groups in lm.block_param_groups(lr)]
        offloader = BlockOffload(lm, optimizers, offload, stream_state=stream)
    meter = {"counter": None, "host": 0, "window": ("block", 0)}
    windows = {}

    def close(next_window):
        counter = meter["counter"]
        if counter is not None:
            windows[meter["window"]] = counter.peak - meter["host"]
            counter.reset_peak()
        meter["window"] = next_window

    def step_block(b):
        close(("step", b))
        offloader.step_block(b)
        close(("block", b + 1))

    def step():
        if offloader is None:
            for mb in micro:
                lm.train_step(mb)
            close(("step", 0))
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
            close(None)
        else:
            lm.sequential_step(micro, on_block_done=step_block)
            step_block(lm.num_blocks - 1)

    step()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    host_tensors = offloader.host_tensors() if offloader else []
    moved = offloader.bytes_to_device + offloader.bytes_to_host if offloader else 0
    with ByteCounter() as counter:
        counter.track(tensors_of(lm))
        for opt in optimizers:
            counter.track(tensors_of(optimizer=opt))
        counter.track(t for mb in micro for t in mb.values())
        counter.track(host_tensors)
        meter.update(counter=counter, host=unique_bytes(host_tensors), window=("block", 0))
        before = counter.current - meter["host"]
        counter.reset_peak()
        step()
    if offloader:
        moved = offloader.bytes_to_device + offloader.bytes_to_host - moved
        offloader.close()
    return dict(before=before, host=meter["host"], windows=windows, moved=moved, seconds=seconds)


def one_run(shape: str, num_blocks: int, batch_size: int, seq_len: int, schedule: str, offload: str,
            stream: bool, micro_batches: int = 2) -> dict:
    import lopt
    from benchmarks.trainer_memory import SHAPES
    from lopt.models.shapes import build_model, tiny_config

    lm = lopt.LoPTModel(build_model(tiny_config("llama", **SHAPES[shape])), num_blocks=num_blocks, kernels=False)
    g = torch.Generator().manual_seed(0)
    micro = [{"input_ids": torch.randint(0, lm.model.config.vocab_size, (batch_size, seq_len), generator=g)}
             for _ in range(micro_batches)]
    result = measure_windows(lm, "adamw", micro, schedule, offload, stream)
    return dict(shape=shape, num_blocks=num_blocks, batch_size=batch_size, seq_len=seq_len,
                micro_batches=micro_batches, schedule=schedule, offload=offload, stream_state=stream,
                device_peak_bytes=max(result["windows"].values()), host_bytes=result["host"],
                moved_bytes=result["moved"], step_seconds=result["seconds"])


def markdown(rows: list[dict]) -> str:
    lines = ["| model shape | k | micro-batches x batch x seq | schedule | offload | device peak | vs interleaved "
             "| host | moved per step | step time | vs interleaved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["shape"]: r for r in rows if r["schedule"] == "interleaved"}
    for r in rows:
        b = base[r["shape"]]
        offload = r["offload"] + (" (streamed)" if r["stream_state"] else "")
        lines.append(f"| {r['shape']} | {r['num_blocks']} | {r['micro_batches']} x {r['batch_size']} x {r['seq_len']} "
                     f"| {r['schedule']} | {offload} | {r['device_peak_bytes'] / 2**20:.1f} MiB "
                     f"| {r['device_peak_bytes'] / b['device_peak_bytes']:.3f} | {r['host_bytes'] / 2**20:.1f} MiB "
                     f"| {r['moved_bytes'] / 2**20:.1f} MiB | {r['step_seconds']:.2f} s "
                     f"| {r['step_seconds'] / b['step_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.trainer_memory import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--num-blocks", type=int, default=4)
    args = parser.parse_args(argv)
    sizes = {"toy": (4, 64), "smollm2-135m-shape": (1, 128)}  # batch, seq per micro-batch
    rows = []
    for shape in args.shapes.split(","):
        for schedule, offload, stream in SETTINGS:
            rows.append(one_run(shape, args.num_blocks, *sizes[shape], schedule, offload, stream))
            print(json.dumps(rows[-1]), flush=True)
    stem = Path(args.out) / f"schedule-memory-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1) + "\n")
    stem.with_suffix(".md").write_text(
        "# One optimizer step per schedule and offload, fp32, bytes counted on the CPU "
        "(`python -m benchmarks.schedule_memory`)\n\n" + markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
