"""The ZO study's table and plot: ``python -m benchmarks.zo_study.report [--results-dir DIR] [--out-prefix P]``.

Per method, at its picked rate (``run.best_lr`` over the seed-0 sweep), over its seeds: steps done in the
budget, seconds per step, held-out accuracy before → after, its gain as a share of end-to-end's, KL from the
original, general-text NLL, peak bytes; and the issue's goal for the best ZO variant (the ZO method with the
largest mean accuracy gain): ≥ 90% of end-to-end's gain, ≤ 0.5x its KL, ≤ 0.4x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.retention.report import _stats

from .methods import METHODS
from .run import best_lr

GOAL = dict(gain=0.9, kl=0.5, memory=0.4)


def load_runs(results_dir: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(results_dir.glob("*-seed*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["spec"]["method"], []).append(result)
    return runs


def summarise(results_dir: Path) -> dict:
    runs = load_runs(results_dir)
    original_path = results_dir / "original.json"
    original = json.loads(original_path.read_text()) if original_path.exists() else None
    methods = {}
    for name in [m for m in METHODS if m in runs] + sorted(set(runs) - set(METHODS)):
        all_runs = runs[name]
        sweep = [r for r in all_runs if r["spec"]["seed"] == 0]
        lr = best_lr(sweep) if sweep else all_runs[0]["spec"]["lr"]
        picked = sorted((r for r in all_runs if r["spec"]["lr"] == lr), key=lambda r: r["spec"]["seed"])
        first = picked[0]
        before = first["before"]["accuracy"]
        methods[name] = dict(
            description=first["description"], objective=first["objective"], zeroth_order=first["zeroth_order"],
            lr=lr, seeds=[r["spec"]["seed"] for r in picked], budget_s=first["spec"]["budget_s"],
            model=first["spec"]["model"],
            diverged=sum(r["diverged"] for r in picked),
            steps=_stats([r["steps"] for r in picked]), s_per_step=_stats([r["s_per_step"] for r in picked]),
            accuracy_before=before, accuracy=_stats([r["after"]["accuracy"] for r in picked]),
            gain=_stats([r["after"]["accuracy"] - before for r in picked]),
            loss=_stats([r["after"]["loss"] for r in picked]), kl=_stats([r["after"]["kl"] for r in picked]),
            general_nll=_stats([r["after"]["general_nll"] for r in picked]),
            answer_agreement=_stats([r["after"]["answer_agreement"] for r in picked]),
            peak_mib=_stats([r["peak_bytes"] / 2**20 for r in picked]),
            trainable_params=first["trainable_params"],
            load_average=_stats([v for r in picked for v in r["load_average"].values()]),
            sweep={f"{r['spec']['lr']:g}": dict(accuracy=r["after"]["accuracy"], kl=r["after"]["kl"], steps=r["steps"],
                                                diverged=r["diverged"]) for r in sweep},
            curves=[dict(seed=r["spec"]["seed"], points=[(p["train_s"], p["accuracy"]) for p in r["curve"]])
                    for r in picked])
    e2e = methods.get("e2e")
    for m in methods.values():
        if e2e:
            m["gain_vs_e2e"] = m["gain"]["mean"] / e2e["gain"]["mean"] if e2e["gain"]["mean"] > 0 else None
            m["kl_vs_e2e"] = m["kl"]["mean"] / e2e["kl"]["mean"] if e2e["kl"]["mean"] else None
            m["memory_vs_e2e"] = m["peak_mib"]["mean"] / e2e["peak_mib"]["mean"]
    goal = None
    zo = [n for n, m in methods.items() if m["zeroth_order"]]
    if e2e and zo:
        best = max(zo, key=lambda n: methods[n]["gain"]["mean"])
        m = methods[best]
        goal = dict(best_zo=best, gain_vs_e2e=m["gain_vs_e2e"], kl_vs_e2e=m["kl_vs_e2e"],
                    memory_vs_e2e=m["memory_vs_e2e"], targets=GOAL,
                    met=dict(gain=_at_least(m["gain_vs_e2e"], GOAL["gain"]), kl=_at_most(m["kl_vs_e2e"], GOAL["kl"]),
                             memory=m["memory_vs_e2e"] <= GOAL["memory"]))
        goal["met_all"] = all(goal["met"].values())
    return dict(original=original, methods=methods, goal=goal)


def _at_least(x, target):
    return x is not None and x >= target


def _at_most(x, target):
    return x is not None and x <= target


def _pm(stat: dict, fmt: str) -> str:
    text = fmt.format(stat["mean"])
    return text + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def markdown(summary: dict) -> str:
    methods = summary["methods"]
    first = next(iter(methods.values()))
    lines = [f"# ZO study: {first['model']}, embedded sentiment task, {first['budget_s']:g} s of training per run", "",
             "Held-out accuracy on 200 rows (candidates ' terrible' / ' great' at the last prompt position); KL from "
             "the original on 24 general prompts (nats/token); general-text NLL (nats/token); peak = exact bytes of "
             "live tensors during the first step (weights + optimizer / ZO state + gradients + activations). "
             "Values: mean ± std over the seeds at the picked rate.", ""]
    if summary["original"]:
        o = summary["original"]
        lines += [f"Original model: accuracy {o['accuracy']:.3f}, candidate loss {o['loss']:.4f}, general NLL "
                  f"{o['general_nll']:.4f}.", ""]
    lines += ["| method | objective | lr | seeds | steps in budget | s/step | accuracy before → after | gain vs e2e's | "
              "KL | general NLL | peak MiB (vs e2e) | sweep (seed 0: lr → accuracy, KL) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        sweep = "; ".join(f"{lr} → {s['accuracy']:.3f}, {s['kl']:.4f}" + (" (diverged)" if s["diverged"] else "")
                          for lr, s in m["sweep"].items())
        lines.append(
            f"| {name} | {m['objective']} | {m['lr']:g} | {len(m['seeds'])} | {_pm(m['steps'], '{:.0f}')} | "
            f"{_pm(m['s_per_step'], '{:.2f}')} | {m['accuracy_before']:.3f} → {_pm(m['accuracy'], '{:.3f}')} | "
            f"{_ratio(m.get('gain_vs_e2e'))} | {_pm(m['kl'], '{:.4f}')} | {_pm(m['general_nll'], '{:.4f}')} | "
            f"{m['peak_mib']['mean']:.0f} ({_ratio(m.get('memory_vs_e2e'))}) | {sweep} |")
    lines += ["", "Load average (1 min) around the runs, per method: " + ", ".join(
        f"{n} {m['load_average']['mean']:.1f}" for n, m in methods.items()), ""]
    goal = summary["goal"]
    if goal:
        t = goal["targets"]
        verdict = "met" if goal["met_all"] else "not met"
        lines += [f"**Goal ({verdict})**: the best ZO variant, {goal['best_zo']}, reaches {_ratio(goal['gain_vs_e2e'])} "
                  f"of end-to-end's accuracy gain (target ≥ {t['gain']:g}x), {_ratio(goal['kl_vs_e2e'])} of its KL "
                  f"(target ≤ {t['kl']:g}x), {_ratio(goal['memory_vs_e2e'])} of its peak memory (target ≤ "
                  f"{t['memory']:g}x).", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for name, m in summary["methods"].items():
        colour = None
        for curve in m["curves"]:
            xs, ys = zip(*curve["points"])
            (line,) = ax.plot(xs, ys, marker="o", ms=3, color=colour, alpha=0.8,
                              label=f"{name} (lr {m['lr']:g})" if colour is None else None)
            colour = line.get_color()
        ax2.errorbar(m["kl"]["mean"], m["accuracy"]["mean"], xerr=m["kl"]["std"], yerr=m["accuracy"]["std"], fmt="o",
                     capsize=3, color=colour, label=f"{name} ({len(m['seeds'])} seeds)")
    ax.set_xlabel("training wall-clock (s, this CPU; evaluations not counted)")
    ax.set_ylabel("held-out accuracy (200 rows)")
    ax.set_title("Task score against wall-clock (one line per seed)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_xscale("symlog", linthresh=1e-3)
    ax2.set_xlabel("KL from the original on general prompts (nats/token, symlog)")
    ax2.set_title("Task score against KL at the end of the budget", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", default="benchmarks/results/zo-study-runs")
    parser.add_argument("--out-prefix", default="benchmarks/results/zo-study-2026-12-06")
    args = parser.parse_args(argv)
    summary = summarise(Path(args.results_dir))
    if not summary["methods"]:
        print(f"no runs in {args.results_dir}", file=sys.stderr)
        return 1
    prefix = Path(args.out_prefix)
    prefix.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(summary))
    plot(summary, prefix.with_suffix(".png"))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
