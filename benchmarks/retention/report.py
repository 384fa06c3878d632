"""The retention study's report: ``python -m benchmarks.retention.report [--results-dir DIR]``.

Per method, over its seeds at the learning rate its sweep picked: held-out exact match and loss,
the general-text NLL increase and the KL from the original model, the agreement of the model's own
greedy answers with the original's and the share of the original's answer tokens kept (mean and
standard deviation; "-" for runs made before ``lopt.measures.retention`` measured own answers), tokens/s
relative to end-to-end fine-tuning, trainable parameters and peak memory (the process's peak RSS on
the CPU), and two of seed 0's own answers next to the original's. Writes ``retention-<date>.json``,
``.md`` and ``.png`` (task score against KL, and where measured against answer agreement, each method
a point with its spread) next to the results directory.
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


OWN_ANSWER_KEYS = ("answer_agreement", "first_token_agreement", "answer_kept")  # absent from older runs
NUM_SAMPLES = 2


def _own_answer_stats(runs: list[dict]) -> dict:
    """The own-answer measures (``OWN_ANSWER_KEYS``) over ``runs``, each only where every run has it."""
    return {k: _stats([r["after"][k] for r in runs]) for k in OWN_ANSWER_KEYS if all(k in r["after"] for r in runs)}


def _samples(runs: list[dict]) -> list[dict]:
    """Seed 0's first own answers to the general prompts, with the original's (none before they were kept)."""
    seed0 = [r for r in runs if r["spec"]["seed"] == 0]
    return [dict(prompt=x["prompt"], original=x["original"], answer=x["answer"])
            for x in (seed0[0]["after"].get("answer_samples", []) if seed0 else [])[:NUM_SAMPLES]]


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
                                                nll_increase=r["after"]["general_nll"] - r["before"]["general_nll"],
                                                **{k: r["after"][k] for k in OWN_ANSWER_KEYS if k in r["after"]})
                   for r in sorted(sweep, key=lambda r: r["spec"]["lr"])},
            exact_match=_stats([r["after"]["exact_match"] for r in chosen]),
            task_loss=_stats([r["after"]["loss"] for r in chosen]),
            nll_increase=_stats([r["after"]["general_nll"] - r["before"]["general_nll"] for r in chosen]),
            kl=_stats([r["after"]["kl"] for r in chosen]),
            **_own_answer_stats(chosen),
            samples=_samples(chosen),
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
                    kl=_stats([r["after"]["kl"] for r in there]), **_own_answer_stats(there))
    settings = next(iter(runs.values()))[0]["spec"] if runs else {}
    keep = ("model", "steps", "batch_size", "seq_len", "eval_max_examples")
    return dict(settings={k: settings[k] for k in keep if k in settings}, methods=methods)


def _pm(stat: dict | None, fmt: str) -> str:
    """``mean ± std``, or "-" where the runs did not measure it."""
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}" if stat else "-"


def _one_line(text: str) -> str:
    """An answer on one markdown line: whitespace collapsed, pipes escaped, quoted."""
    return '"' + " ".join(text.split()).replace("|", "\\|") + '"'


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Retention study: {s.get('model')}, {s.get('steps')} steps of {s.get('batch_size')} x "
             f"{s.get('seq_len')} tokens; mean ± std over seeds at each method's best learning rate.", "",
             "Answer agreement: the share of the 24 general prompts whose first 8 greedy answer tokens are the "
             "original model's; first token: the share whose first answer token is the original's (a model that now "
             "answers in the task's record format changes it); answer kept: the mean share of the original's answer "
             "tokens reproduced before the first difference (all on the model's own answers, not teacher-forced as KL "
             "is; \"-\": not measured in every seed). Tokens/s compare runs only where they had the machine alike.",
             "",
             "| method | lr | seeds | exact match | task loss | NLL increase | KL | answer agreement | first token | "
             "answer kept | tokens/s vs e2e | trainable | peak mem (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        rel = f"{m['tokens_per_s_vs_e2e']:.2f}" if "tokens_per_s_vs_e2e" in m else "-"
        lines.append(f"| {name} | {m['lr']:g} | {len(m['seeds'])} | {_pm(m['exact_match'], '{:.1%}')} | "
                     f"{_pm(m['task_loss'], '{:.3f}')} | {_pm(m['nll_increase'], '{:.4f}')} | {_pm(m['kl'], '{:.4f}')} "
                     f"| {_pm(m.get('answer_agreement'), '{:.1%}')} | {_pm(m.get('first_token_agreement'), '{:.1%}')} "
                     f"| {_pm(m.get('answer_kept'), '{:.1%}')} | {rel} | {m['trainable_params'] / 1e6:.1f}M | {m['peak_mem_gb']:.2f} |")
    at = {name: m["at_e2e_lr"] for name, m in summary["methods"].items() if "at_e2e_lr" in m}
    if at:
        e2e = at.get("e2e")
        lines += ["", f"Every method at end-to-end's picked rate ({e2e['lr']:g}), over all the seeds run there, and its "
                  "retention loss as a multiple of end-to-end's.", "",
                  "| method | seeds | exact match | NLL increase | x e2e | KL | x e2e | answer agreement "
                  "| answer kept |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in at.items():
            lines.append(f"| {name} | {len(r['seeds'])} | {_pm(r['exact_match'], '{:.1%}')} | "
                         f"{_pm(r['nll_increase'], '{:.4f}')} "
                         f"| {r['nll_increase']['mean'] / e2e['nll_increase']['mean']:.2f} "
                         f"| {_pm(r['kl'], '{:.4f}')} | {r['kl']['mean'] / e2e['kl']['mean']:.2f} "
                         f"| {_pm(r.get('answer_agreement'), '{:.1%}')} | {_pm(r.get('answer_kept'), '{:.1%}')} |")
    lines += ["", "Every rate of each sweep (seed 0): what each method trades between task score and retention.", "",
              "| method | lr | exact match | NLL increase | KL | answer agreement |", "|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        for lr, r in m["sweep"].items():
            agreement = f"{r['answer_agreement']:.0%}" if "answer_agreement" in r else "-"
            lines.append(f"| {name} | {lr} | {r['exact_match']:.0%} | {r['nll_increase']:.4f} | {r['kl']:.4f} "
                         f"| {agreement} |")
    sampled = {name: m["samples"] for name, m in summary["methods"].items() if m.get("samples")}
    if sampled:
        lines += ["", "### Own answers to general prompts", "",
                  f"Seed 0 at each method's picked rate, the first {NUM_SAMPLES} general prompts: the original "
                  "model's greedy answer, then the trained model's (up to 32 tokens each).", ""]
        for name, samples in sampled.items():
            lines.append(f"**{name}**")
            lines.append("")
            for x in samples:
                lines += [f"- prompt: {_one_line(x['prompt'])}", f"  - original: {_one_line(x['original'])}",
                          f"  - answer: {_one_line(x['answer'])}"]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    with_agreement = {name: m for name, m in summary["methods"].items() if "answer_agreement" in m}
    if with_agreement:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    else:
        fig, ax = plt.subplots(figsize=(7, 5))
    colours = {}
    for name, m in summary["methods"].items():
        bar = ax.errorbar(m["kl"]["mean"], m["exact_match"]["mean"], xerr=m["kl"]["std"], yerr=m["exact_match"]["std"],
                          fmt="o", capsize=3, label=f"{name} (lr {m['lr']:g}, {len(m['seeds'])} seeds)")
        colours[name] = bar[0].get_color()
        at = m.get("at_e2e_lr")
        if at and at["lr"] != m["lr"] and len(at["seeds"]) > 1:  # its seeds at end-to-end's rate: a hollow dot
            ax.errorbar(at["kl"]["mean"], at["exact_match"]["mean"], xerr=at["kl"]["std"], yerr=at["exact_match"]["std"],
                        fmt="o", mfc="none", capsize=3, color=bar[0].get_color(),
                        label=f"{name} at lr {at['lr']:g} ({len(at['seeds'])} seeds)")
        sweep = list(m["sweep"].values())  # seed 0 at every rate, faint, in the same colour
        ax.plot([r["kl"] for r in sweep], [r["exact_match"] for r in sweep], "--", marker=".", alpha=0.35,
                color=bar[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("KL from the original model on general prompts\n(nats/token, log scale; lower keeps more)")
    ax.set_ylabel("held-out exact match")
    ax.set_title("Task score against retention\n(dots with bars: the picked rate over its seeds; dashed: the sweep, seed 0)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if with_agreement:
        for name, m in with_agreement.items():
            agreement = m["answer_agreement"]
            ax2.errorbar(agreement["mean"], m["exact_match"]["mean"], xerr=agreement["std"],
                         yerr=m["exact_match"]["std"], fmt="o", capsize=3, color=colours[name], label=name)
            sweep = [r for r in m["sweep"].values() if "answer_agreement" in r]
            if len(sweep) > 1:
                ax2.plot([r["answer_agreement"] for r in sweep], [r["exact_match"] for r in sweep], "--", marker=".",
                         alpha=0.35, color=colours[name])
        ax2.set_xlim(-0.03, 1.03)
        ax2.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax2.set_xlabel("own greedy answers agreeing with the original's\n(first 8 tokens, 24 general prompts; "
                       "higher keeps more)")
        ax2.set_title("Task score against own-answer agreement\n(dots with bars: the picked rate over its seeds; "
                      "dashed: the sweep, seed 0)", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
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
