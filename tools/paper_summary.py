"""Tables 2 and 3 and Fig. 2b of SEEKR's SuperNI protocol, from the runs tools/paper_tables.py leaves under --out.

Their rows are Table 3's configurations (CONFIGS: the paper's name and the train.py settings of each; the runner
imports them from here, and this module imports nothing of it) and Table 2's (GENERAL); beside our numbers, the
paper's LLaMA-2-7B ones as printed (PAPER_TABLE3, PAPER_TABLE2). Every number comes from the runs' own files,
whichever command wrote them:

    <order>/seed<s>/<config>/results.json   a finished run: its R, OP and BWT (BWT_T: ÷ T, as the paper's tables)
    <order>/seed<s>/<config>/general.json   that run's general ability, where Table 2 has its row
    general-base.json                       θ_0's general ability

and `summarize` writes into the same folder:

    tables.md / tables.json   Table 3 (OP (BWT) per order, mean ± std over seeds) beside the paper's numbers;
                              Table 2 (each benchmark, GA, ΔGA) where general ability was scored; Fig. 2b (1%
                              against 10% replay); every run's R
    table3.png, table2.png, fig2b.png   the same with the seeds' std as error bars (with matplotlib)
"""
import json
import statistics
from pathlib import Path

# real_experiment first: it puts the project's root on sys.path, for minseekr when it is not installed
from real_experiment import figure, spread

from minseekr.evaluation.metrics import format_matrix, general_ability
from minseekr.run.demo import PET_SETTINGS


# Table 3's methods, then Fig. 2b's 10% rows: (the paper's name, train.py settings). `share` is the replay share
# by the paper's name for it (tools/paper_tables.py's Scale.replay gives the count; LFPT5 writes that many
# pseudo-samples). The PET methods at their authors' learning rates (O-LoRA, PP) or the better of two tried on the
# demo (L2P, LFPT5): PET_SETTINGS.
CONFIGS = {
    "seqft": ("SeqFT", dict(method="seqft")),
    "lwf": ("LwF", dict(method="lwf")),
    "ewc": ("EWC", dict(method="ewc")),
    "lfpt5": ("LFPT5", dict(method="lfpt5", **PET_SETTINGS["lfpt5"])),
    "l2p": ("L2P", dict(method="l2p", **PET_SETTINGS["l2p"])),
    "pp": ("PP", dict(method="pp", **PET_SETTINGS["pp"])),
    "olora": ("O-LoRA", dict(method="olora", **PET_SETTINGS["olora"])),
    "replay1": ("Replay (1%)", dict(method="replay", share="1%")),
    "derpp1": ("DER++ (1%)", dict(method="derpp", share="1%")),
    "seekr1": ("SEEKR (1%)", dict(method="seekr", share="1%")),
    "replay10": ("Replay (10%)", dict(method="replay", share="10%")),
    "derpp10": ("DER++ (10%)", dict(method="derpp", share="10%")),
    "seekr10": ("SEEKR (10%)", dict(method="seekr", share="10%")),
    "mtl": ("MTL", dict(method="mtl")),
}
GENERAL = ("seqft", "replay1", "seekr1")          # Table 2's rows

# SEEKR's Table 3 (SuperNI, LLaMA-2-7B): OP (BWT) per order as printed; MTL's one value spans both orders. Its BWT
# is show_results.py's (÷ T: results.json's BWT_T). EWC and the 10% rows are not in that table.
PAPER_TABLE3 = {
    "seqft": {"order3": (42.62, -18.12), "order4": (50.52, -9.88)},
    "lwf": {"order3": (43.29, -15.47), "order4": (47.35, -12.57)},
    "lfpt5": {"order3": (42.05, -16.26), "order4": (46.09, -14.16)},
    "l2p": {"order3": (32.71, -22.34), "order4": (31.00, -23.82)},
    "pp": {"order3": (17.96, -21.27), "order4": (12.19, -29.08)},
    "olora": {"order3": (30.07, -24.47), "order4": (26.70, -33.82)},
    "replay1": {"order3": (55.00, -4.27), "order4": (54.78, -5.31)},
    "derpp1": {"order3": (55.89, -4.51), "order4": (53.48, -5.01)},
    "seekr1": {"order3": (57.04, -3.15), "order4": (58.26, -2.52)},
    "mtl": {"order3": (61.27, None), "order4": (61.27, None)},
}
# SEEKR's Table 2, LLaMA-2-7B-Chat: general ability after TRACE (its orders 1 and 2 averaged; no SuperNI figures),
# with TydiQA, which GA averages there and is not scored here.
PAPER_TABLE2 = {row: dict(zip(("mmlu", "gsm8k", "bbh", "tydiqa", "boolq", "piqa", "GA"), values)) for row, values in (
    ("θ_0", (46.89, 27.14, 39.73, 16.76, 79.79, 76.33, 47.77)),
    ("seqft", (45.16, 14.03, 32.50, 14.84, 79.00, 75.49, 43.50)),
    ("replay1", (45.49, 12.70, 33.46, 14.65, 78.69, 75.65, 43.44)),
    ("seekr1", (46.32, 20.85, 38.52, 18.22, 80.64, 75.79, 46.72)))}


def collect(out: Path) -> tuple[dict, dict, dict | None]:
    """Every finished run under `out`: {(order, config): {seed: results.json}}, {(order, config, seed): its
    general.json}, and θ_0's general.json (or None)."""
    runs, general = {}, {}
    for path in sorted(out.glob("order*/seed*/*/results.json")):
        order, seed, config = path.parts[-4], int(path.parts[-3][len("seed"):]), path.parts[-2]
        if config in CONFIGS:
            runs.setdefault((order, config), {})[seed] = json.loads(path.read_text())
            if (path.parent / "general.json").is_file():
                general[order, config, seed] = json.loads((path.parent / "general.json").read_text())
    base = out / "general-base.json"
    return runs, general, json.loads(base.read_text()) if base.is_file() else None


def op_bwt(runs: dict | None) -> str:
    """OP (BWT) over a configuration's seeds, mean ± std (BWT as the paper's tables: ÷ T), and how many seeds."""
    if not runs:
        return ""
    ops, bwts = [r["OP"] for r in runs.values()], [r["BWT_T"] for r in runs.values() if r["BWT_T"] is not None]
    return f"{spread(ops)}" + (f" ({spread(bwts)})" if bwts else "") + f", n={len(runs)}"


def paper_cell(config: str, order: str) -> str:
    op, bwt = PAPER_TABLE3.get(config, {}).get(order, (None, None))
    return "" if op is None else f"{op:.2f}" + ("" if bwt is None else f" ({bwt:.2f})")


def table3(runs: dict, orders: list[str]) -> list[str]:
    lines = ["## Table 3: OP (BWT) on SuperNI, %, mean ± std over seeds (n), beside the paper's LLaMA-2-7B", "",
             "| method | " + " | ".join(f"{o}, ours | {o}, paper" for o in orders) + " |",
             "|---|" + "---|---|" * len(orders)]
    for config, (label, _) in CONFIGS.items():
        if any((o, config) in runs for o in orders):
            lines.append(f"| {label} | " + " | ".join(f"{op_bwt(runs.get((o, config)))} | {paper_cell(config, o)}"
                                                       for o in orders) + " |")
    return lines + ["", "BWT is ÷ T, as the paper's tables (results.json's BWT_T); MTL trains once on every task."]


def general_rows(general: dict, base: dict) -> dict:
    """Table 2's rows: {row: {benchmark or GA or ΔGA: the values over runs}}, θ_0 first."""
    names = list(base["scores"])
    rows = {"θ_0": {n: [base["scores"][n]["score"]] for n in names}}
    rows["θ_0"]["GA"] = [base["GA"]]
    for (_, config, _), g in sorted(general.items(), key=lambda item: GENERAL.index(item[0][1])):
        row = rows.setdefault(config, {})
        for n in names:
            row.setdefault(n, []).append(g["scores"][n]["score"])
        ga = general_ability({n: g["scores"][n]["score"] for n in names})
        row.setdefault("GA", []).append(ga)
        row.setdefault("ΔGA", []).append(ga - base["GA"])
    return rows


def table2(general: dict, base: dict | None) -> list[str]:
    if base is None or not general:
        return ["## Table 2: general ability", "", "(no general-ability scores under --out yet)"]
    rows, names = general_rows(general, base), list(base["scores"])
    lines = [f"## Table 2: general ability before and after, % (mean ± std over runs: orders × seeds; "
             f"{base['samples'] or 'all'} items a benchmark)", "",
             "| model | " + " | ".join(names) + " | GA (ΔGA) | paper (LLaMA-2-7B-Chat, after TRACE): "
             + ", ".join(names) + ", GA |", "|---|" + "---|" * (len(names) + 2)]
    for row, values in rows.items():
        label = "θ_0 (before)" if row == "θ_0" else CONFIGS[row][0]
        ga = spread(values["GA"]) + (f" ({spread(values['ΔGA'])})" if "ΔGA" in values else "")
        paper = PAPER_TABLE2.get(row, {})
        lines.append(f"| {label} | " + " | ".join(spread(values[n]) for n in names) + f" | {ga} | "
                     + ", ".join(f"{paper[n]:.2f}" for n in [*names, "GA"] if n in paper) + " |")
    return lines + ["", "The paper's GA also averages TydiQA, which is not scored here."]


def fig2b(runs: dict, orders: list[str]) -> list[str]:
    lines = ["## Fig. 2b: 1% against 10% replay, OP (BWT), %", "", "| method | order | 1% | 10% |", "|---|---|---|---|"]
    for method in ("replay", "derpp", "seekr"):
        name = CONFIGS[method + "1"][0].split(" (")[0]
        for o in orders:
            if (o, f"{method}10") in runs or (o, f"{method}1") in runs:
                lines.append(f"| {name} | {o} | {op_bwt(runs.get((o, method + '1')))} | "
                             f"{op_bwt(runs.get((o, method + '10')))} |")
    return lines


def matrices(runs: dict) -> list[str]:
    lines = ["## Each run's R[i][j]: score on task j after task i (row θ_0: before training)", ""]
    for (order, config), seeds in sorted(runs.items()):
        for seed, r in sorted(seeds.items()):
            names = [t.split("_")[0] for t in r["tasks"]]
            lines += [f"{order}, {CONFIGS[config][0]}, seed {seed}:", "```",
                      "θ_0 " + "  ".join(f"{b:.2f}" for b in r["base"]),
                      format_matrix(r["R"], names, row_names=["all tasks"] if r["BWT"] is None else None), "```"]
    return lines


def summarize(out: Path) -> str:
    """tables.md, tables.json and the figures from every finished run under `out`; returns the markdown."""
    runs, general, base = collect(out)
    orders = sorted({o for o, _ in runs})
    text = "\n".join([*table3(runs, orders), "", *table2(general, base), "", *fig2b(runs, orders), "",
                      *matrices(runs)]) + "\n"
    (out / "tables.md").write_text(text)
    (out / "tables.json").write_text(json.dumps(dict(
        runs={f"{o}/{c}": seeds for (o, c), seeds in runs.items()}, general_base=base,
        general={f"{o}/{c}/seed{s}": g for (o, c, s), g in general.items()}, paper_table3=PAPER_TABLE3,
        paper_table2=PAPER_TABLE2), indent=1))
    ops = {o: {CONFIGS[c][0]: [r["OP"] for r in runs[o, c].values()] for c in CONFIGS if (o, c) in runs}
           for o in orders}
    figure(draw_bars, out / "table3.png", "Table 3: OP (%), mean ± std over seeds", ops)
    figure(draw_bars, out / "fig2b.png", "Fig. 2b: OP (%) at 1% and 10% replay", {
        f"{o}, {share}": {CONFIGS[m + '1'][0].split(' (')[0]: [r["OP"] for r in runs[o, m + share[:-1]].values()]
                          for m in ("replay", "derpp", "seekr") if (o, m + share[:-1]) in runs}
        for o in orders for share in ("1%", "10%")})
    if base is not None and general:
        figure(draw_bars, out / "table2.png", "Table 2: GA (%), mean ± std over runs",
               {"GA": {("θ_0" if k == "θ_0" else CONFIGS[k][0]): v["GA"] for k, v in general_rows(general,
                                                                                               base).items()}})
    return text


def draw_bars(path: Path, title: str, groups: dict[str, dict[str, list[float]]]):
    """Grouped bars: each group's labels' means, the std of their values as error bars (none for one value)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {g: bars for g, bars in groups.items() if bars}
    labels = list(dict.fromkeys(label for bars in groups.values() for label in bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(groups)) / 2), 4))
    width = 0.8 / max(1, len(groups))
    for g, (group, bars) in enumerate(groups.items()):
        xs = [i + g * width for i, label in enumerate(labels) if label in bars]
        values = [bars[label] for label in labels if label in bars]
        ax.bar(xs, [statistics.mean(v) for v in values], width, label=group, capsize=3,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel="%")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
