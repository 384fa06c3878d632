"""Markdown table and PNG plots of an end-to-end results file, written next to it.

    python -m benchmarks.e2e.report benchmarks/results/e2e-<date>-<gpu>.json

Writes ``<name>.md`` (the environment, the goals of issue 5 where the rows to compute them exist, every
measured row, the searches' results and the planner's predicted vs measured peak) and
``<name>-throughput.png``, ``<name>-transient.png`` and, with search rows, ``<name>-search.png``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("hf", "hf+liger", "lopt-paper", "lopt", "lopt+kernels")
GOAL_MODEL = "llama-3.2-1b"


def _fmt(value, spec=".2f", none="-"):
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _status(row) -> str:
    if row.get("skipped"):
        return "skipped: " + str(row["skipped"])[:60]
    if row.get("oom"):
        return "OOM"
    if row.get("error"):
        return "error: " + str(row["error"])[:60]
    return "ok"


def _method_key(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _config_label(row) -> str:
    cap = "uncapped" if row.get("mem_cap_gb") is None else f"cap {row['mem_cap_gb']:g}G"
    label = f"{row['model']} T{row['seq_len']} B{row['batch_size']} {cap} rc:{row['recompute']}"
    if row.get("optimizer") not in (None, "torch-adamw"):
        label += f" {row['optimizer']}"
    if row.get("early_lower_step"):
        label += " early"
    return label


def measured_rows(rows):
    return [r for r in rows if not r.get("probe") and not r.get("search")]


def search_rows(rows):
    return [r for r in rows if r.get("search") and not r.get("probe")]


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def goals(rows) -> list[tuple[str, str, str]]:
    """(goal, target, measured) for issue 5's goals, from the rows that exist."""
    out = []
    ok = [r for r in measured_rows(rows) if _status(r) == "ok"]

    def pick(**match):
        return [r for r in ok if all(r.get(k) == v for k, v in match.items())]

    # 1. transient peak at seq 2048 batch 4 no recompute, uncapped
    base = dict(model=GOAL_MODEL, seq_len=2048, batch_size=4, recompute="none", mem_cap_gb=None, early_lower_step=False)
    t = {m: min((r["transient_peak_gb"] for r in pick(method=m, **base)), default=None) for m in METHOD_ORDER}
    out.append(("1. transient peak, lopt+kernels / hf (seq 2048, batch 4, no recompute)", "<= 0.4",
                _fmt(_ratio(t["lopt+kernels"], t["hf"]))))
    out.append(("1. transient peak, lopt+kernels / hf+liger", "<= 0.7", _fmt(_ratio(t["lopt+kernels"], t["hf+liger"]))))
    # 2. best tokens/s under a 24 GB cap at seq 2048 (any batch / recompute that fits)
    best = {m: max((r["tokens_per_s"] for r in pick(method=m, model=GOAL_MODEL, seq_len=2048, mem_cap_gb=24.0)),
                   default=None) for m in METHOD_ORDER}
    out.append(("2. tokens/s under 24 GB, best fitting setting, lopt+kernels / hf", ">= 1.5",
                _fmt(_ratio(best["lopt+kernels"], best["hf"]))))
    out.append(("2. tokens/s under 24 GB, lopt+kernels / hf+liger", ">= 1.2",
                _fmt(_ratio(best["lopt+kernels"], best["hf+liger"]))))
    # 3. longest sequence at batch 1 under 24 GB (seq search rows), best recompute
    longest = defaultdict(int)
    for r in search_rows(rows):
        if r.get("search") == "seq_len" and r.get("model") == GOAL_MODEL and r.get("mem_cap_gb") == 24.0 \
                and r.get("batch_size") in (1, None):
            longest[r["method"]] = max(longest[r["method"]], r.get("max_seq_len") or 0)
    out.append(("3. longest sequence at batch 1 under 24 GB, lopt+kernels / hf+liger", ">= 1.5",
                _fmt(_ratio(longest.get("lopt+kernels") or None, longest.get("hf+liger") or None))))
    # 4. MFU of lopt+kernels uncapped
    mfu = max((r["mfu"] for r in pick(method="lopt+kernels", model=GOAL_MODEL, mem_cap_gb=None) if r.get("mfu")),
              default=None)
    out.append(("4. MFU of lopt+kernels, uncapped 1B (best row)", ">= 40%", _fmt(mfu * 100 if mfu else None, ".1f")
                + ("%" if mfu else "")))
    return out


def markdown(results: dict, images: list[str]) -> str:
    rows = results["rows"]
    lines = [f"# End-to-end benchmark: {results.get('device')}", ""]
    env = ", ".join(f"{k} {results.get(k)}" for k in ("torch", "triton", "transformers", "liger_kernel", "commit", "date")
                    if results.get(k) is not None)
    lines += [env, ""]
    measured = measured_rows(rows)
    if measured and any(r.get("memory_source") == "cpu-bytes" for r in measured):
        lines += ["Memory of CPU rows is counted bytes (`memory_source: cpu-bytes`), not CUDA allocator statistics; "
                  "CPU timings say nothing about the GPU.", ""]
    goal_rows = goals(rows)
    if any(measured_value not in ("-", "-%") for _, _, measured_value in goal_rows):
        lines += ["## Goals (issue 5)", "", "| goal | target | measured |", "|---|---|---|"]
        lines += [f"| {g} | {t} | {m} |" for g, t, m in goal_rows]
        lines.append("")
    if measured:
        lines += ["## Training step", "",
                  "| method | model | seq | batch | cap GB | recompute | optimizer | tokens/s | step ms | persistent GB "
                  "| transient GB | peak alloc GB | peak reserved GB | MFU | predicted peak GB | status |",
                  "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(measured, key=lambda r: (r["model"], r["seq_len"], r["batch_size"], r.get("mem_cap_gb") or 0,
                                                 r["recompute"], _method_key(r["method"]))):
            opt = r.get("optimizer", "") + (" +early" if r.get("early_lower_step") else "")
            pred = r.get("predicted_peak_gb")
            pred_text = _fmt(pred, ".3f")
            if pred and r.get("peak_allocated_gb"):
                pred_text += f" ({pred / r['peak_allocated_gb']:.2f}x)"
            lines.append(
                f"| {r['method']} | {r['model']} | {r['seq_len']} | {r['batch_size']} | {_fmt(r.get('mem_cap_gb'), 'g')} "
                f"| {r['recompute']} | {opt} | {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('step_ms'), '.1f')} "
                f"| {_fmt(r.get('persistent_gb'), '.3f')} | {_fmt(r.get('transient_peak_gb'), '.3f')} "
                f"| {_fmt(r.get('peak_allocated_gb'), '.3f')} | {_fmt(r.get('peak_reserved_gb'), '.3f')} "
                f"| {_fmt(r['mfu'] * 100 if r.get('mfu') else None, '.1f')} | {pred_text} | {_status(r)} |")
        lines.append("")
        preds = [r for r in measured if r.get("predicted_peak_gb") and r.get("peak_allocated_gb")]
        if preds:
            errors = [abs(r["predicted_peak_gb"] / r["peak_allocated_gb"] - 1) for r in preds]
            lines += [f"Planner (`lopt.planning.memory_model.estimate_memory`) vs measured peak allocated over {len(preds)} LoPT rows: "
                      f"largest error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}.", ""]
    searched = search_rows(rows)
    if searched:
        lines += ["## Largest batch / longest sequence that fits", "",
                  "| search | method | model | seq | batch | cap GB | recompute | optimizer | max | note |",
                  "|---|---|---|---:|---:|---:|---|---|---:|---|"]
        for r in sorted(searched, key=lambda r: (r["search"], r["model"], r.get("mem_cap_gb") or 0, r["recompute"],
                                                 _method_key(r["method"]))):
            key = "max_" + r["search"]
            lines.append(f"| {r['search']} | {r['method']} | {r['model']} | {r.get('seq_len')} | {r.get('batch_size')} "
                         f"| {_fmt(r.get('mem_cap_gb'), 'g')} | {r['recompute']} | {r.get('optimizer')} | {r.get(key)} "
                         f"| {r.get('note') or r.get('error') or ''} |")
        lines.append("")
    for image in images:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)


def _bar_plot(path, groups: dict, methods, ylabel, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(groups)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(methods)) / 2), 4.5))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(labels))]
        ys = [groups[label].get(method) or 0 for label in labels]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(path: str | Path) -> dict[str, Path]:
    path = Path(path)
    results = json.loads(path.read_text())
    rows = results["rows"]
    stem = path.with_suffix("")
    written = {}
    measured = [r for r in measured_rows(rows) if _status(r) == "ok"]
    methods = sorted({r["method"] for r in rows}, key=_method_key)
    images = []
    if measured:
        throughput, transient = defaultdict(dict), defaultdict(dict)
        for r in measured:
            throughput[_config_label(r)][r["method"]] = r["tokens_per_s"]
            transient[_config_label(r)][r["method"]] = r["transient_peak_gb"]
        for name, groups, ylabel in (("throughput", throughput, "tokens / s"),
                                     ("transient", transient, "transient peak (GiB)")):
            target = Path(f"{stem}-{name}.png")
            _bar_plot(target, groups, methods, ylabel, f"{ylabel} per method ({results.get('device')})")
            written[name] = target
            images.append(target.name)
    searched = search_rows(rows)
    if searched:
        groups = defaultdict(dict)
        for r in searched:
            cap = "uncapped" if r.get("mem_cap_gb") is None else f"cap {r['mem_cap_gb']:g}G"
            label = f"max {r['search']} {r['model']} {cap} rc:{r['recompute']}"
            groups[label][r["method"]] = r.get("max_" + r["search"]) or 0
        target = Path(f"{stem}-search.png")
        _bar_plot(target, groups, methods, "largest that fits", "largest batch / longest sequence under the cap")
        written["search"] = target
        images.append(target.name)
    md = Path(f"{stem}.md")
    md.write_text(markdown(results, images))
    written["markdown"] = md
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.e2e.report RESULTS.json", file=sys.stderr)
        return 2
    for kind, target in report(argv[0]).items():
        print(f"{kind}: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
