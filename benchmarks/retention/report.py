"""The retention study's report: ``python -m benchmarks.retention.report [--results-dir DIR]``.

Per method, over its seeds at the learning rate its sweep picked: held-out exact match and loss,
the general-text NLL increase and the KL from the original model (mean and standard deviation),
tokens/s relative to end-to-end fine-tuning, trainable parameters and peak memory (the process's
peak RSS on the CPU). Writes ``retention-<date>.json``, ``.md`` and ``.png`` (task score against KL,
each method a point with its spread) next to the results directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from .methods import METHODS
from .run import best_lr


def _stats(values: list[float]) -> dict:
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def summarise(results_dir: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["spec"]["method"], []).append(result)
    methods = {}
    for name in (m for m in METHODS if m in runs):
        sweep = [r for r in runs[name] if r["spec"]["seed"] == 0]
        lr = best_lr(sweep) if sweep else runs[name][0]["spec"]["lr"]
        chosen = [r for r in runs[name] if r["spec"]["lr"] == lr]
        methods[name] = dict(
            description=METHODS[name].description, lr=lr, seeds=sorted(r["spec"]["seed"] for r in chosen),
            sweep={f"{r['spec']['lr']:g}": dict(exact_match=r["after"]["exact_match"], kl=r["after"]["kl"],
                                                nll_increase=r["after"]["general_nll"] - r["before"]["general_nll"])
                   for r in sorted(sweep, key=lambda r: r["spec"]["lr"])},
            exact_match=_stats([r["after"]["exact_match"] for r in chosen]),
            task_loss=_stats([r["after"]["loss"] for r in chosen]),
            nll_increase=_stats([r["after"]["general_nll"] - r["before"]["general_nll"] for r in chosen]),
            kl=_stats([r["after"]["kl"] for r in chosen]),
            tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in chosen),
            trainable_params=chosen[0]["trainable_params"],
            peak_mem_gb=max(r["peak_mem_gb"] for r in chosen),
            before=chosen[0]["before"],
        )
    if "e2e" in methods:
        for m in methods.values():
            m["tokens_per_s_vs_e2e"] = m["tokens_per_s"] / methods["e2e"]["tokens_per_s"]
        # Every method at end-to-end's rate, over all the seeds run there: retention at (near) equal task score.
        at_lr = methods["e2e"]["lr"]
        for name, m in methods.items():
            there = [r for r in runs[name] if r["spec"]["lr"] == at_lr]
            if there:
                m["at_e2e_lr"] = dict(
                    lr=at_lr, seeds=sorted(r["spec"]["seed"] for r in there),
                    exact_match=_stats([r["after"]["exact_match"] for r in there]),
                    nll_increase=_stats([r["after"]["general_nll"] - r["before"]["general_nll"] for r in there]),
                    kl=_stats([r["after"]["kl"] for r in there]))
    settings = next(iter(runs.values()))[0]["spec"] if runs else {}
    keep = ("model", "steps", "batch_size", "seq_len", "eval_max_examples")
    return dict(settings={k: settings[k] for k in keep if k in settings}, methods=methods)


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Retention study: {s.get('model')}, {s.get('steps')} steps of {s.get('batch_size')} x "
             f"{s.get('seq_len')} tokens; mean ± std over seeds at each method's best learning rate.", "",
             "| method | lr | seeds | exact match | task loss | NLL increase | KL | tokens/s vs e2e | trainable | "
             "peak mem (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        def pm(stat, fmt):
            return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"
        rel = f"{m['tokens_per_s_vs_e2e']:.2f}" if "tokens_per_s_vs_e2e" in m else "-"
        lines.append(f"| {name} | {m['lr']:g} | {len(m['seeds'])} | {pm(m['exact_match'], '{:.1%}')} | "
                     f"{pm(m['task_loss'], '{:.3f}')} | {pm(m['nll_increase'], '{:.4f}')} | {pm(m['kl'], '{:.4f}')} "
                     f"| {rel} | {m['trainable_params'] / 1e6:.1f}M | {m['peak_mem_gb']:.2f} |")
    at = {name: m["at_e2e_lr"] for name, m in summary["methods"].items() if "at_e2e_lr" in m}
    if at:
        e2e = at.get("e2e")
        lines += ["", f"Every method at end-to-end's picked rate ({e2e['lr']:g}), over all the seeds run there, and its "
                  "retention loss as a multiple of end-to-end's.", "",
                  "| method | seeds | exact match | NLL increase | x e2e | KL | x e2e |", "|---|---|---|---|---|---|---|"]
        for name, r in at.items():
            def pm(stat, fmt):
                return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"
            lines.append(f"| {name} | {len(r['seeds'])} | {pm(r['exact_match'], '{:.1%}')} | "
                         f"{pm(r['nll_increase'], '{:.4f}')} | {r['nll_increase']['mean'] / e2e['nll_increase']['mean']:.2f} "
                         f"| {pm(r['kl'], '{:.4f}')} | {r['kl']['mean'] / e2e['kl']['mean']:.2f} |")
    lines += ["", "Every rate of each sweep (seed 0): what each method trades between task score and retention.", "",
              "| method | lr | exact match | NLL increase | KL |", "|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        for lr, r in m["sweep"].items():
            lines.append(f"| {name} | {lr} | {r['exact_match']:.0%} | {r['nll_increase']:.4f} | {r['kl']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, m in summary["methods"].items():
        bar = ax.errorbar(m["kl"]["mean"], m["exact_match"]["mean"], xerr=m["kl"]["std"], yerr=m["exact_match"]["std"],
                          fmt="o", capsize=3, label=f"{name} (lr {m['lr']:g}, {len(m['seeds'])} seeds)")
        at = m.get("at_e2e_lr")
        if at and at["lr"] != m["lr"] and len(at["seeds"]) > 1:  # its seeds at end-to-end's rate: a hollow dot
            ax.errorbar(at["kl"]["mean"], at["exact_match"]["mean"], xerr=at["kl"]["std"], yerr=at["exact_match"]["std"],
                        fmt="o", mfc="none", capsize=3, color=bar[0].get_color(),
                        label=f"{name} at lr {at['lr']:g} ({len(at['seeds'])} seeds)")
        sweep = list(m["sweep"].values())  # seed 0 at every rate, faint, in the same colour
        ax.plot([r["kl"] for r in sweep], [r["exact_match"] for r in sweep], "--", marker=".", alpha=0.35,
                color=bar[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("KL from the original model on general prompts (nats/token, log scale; lower keeps more)")
    ax.set_ylabel("held-out exact match")
    ax.set_title("Task score against retention\n(dots with bars: the picked rate over its seeds; dashed: the sweep, seed 0)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", default="benchmarks/results/retention-runs")
    parser.add_argument("--out-prefix", help="default: <results-dir's parent>/retention-<today>")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    prefix = Path(args.out_prefix) if args.out_prefix else \
        results_dir.parent / f"retention-{datetime.date.today().isoformat()}"
    summary = summarise(results_dir)
    if not summary["methods"]:
        print(f"no runs in {results_dir}", file=sys.stderr)
        return 1
    prefix.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(summary))
    plot(summary, prefix.with_suffix(".png"))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
