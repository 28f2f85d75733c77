"""study.png: bars per cell and method, the win map (two axes: the winner of each cell, or its
tie), or perplexity against communication. Error bars are the 95 % Student t intervals."""
from __future__ import annotations

import itertools

import numpy as np

TIE_COLOUR = (0.55, 0.55, 0.55, 1.0)


def _value(r: dict, use_bayes: bool) -> float:
    return r["over_bayes"] if use_bayes else r["user_mean"]


def _half(r: dict, use_bayes: bool) -> float:
    ci = r["over_bayes_ci95"] if use_bayes else r["user_mean_ci95"]
    return 0.0 if ci is None else (ci[1] - ci[0]) / 2


def _shown(cell: dict, key: str) -> str:
    """The grid value of `key` in `cell` as typed in the grid."""
    return cell["shown"][key] if "shown" in cell else str(cell["values"][key])


def _margin(comp: dict) -> str:
    """The winner's smallest paired margin (ppl, the mean over users) and its interval: 'by x [lo, hi]
    over B'."""
    w = comp["winner"]
    pairs = [p for p in comp["pairs"] if w in (p["a"], p["b"])]
    p = min(pairs, key=lambda q: abs(q["diff"]))
    sign = -1 if p["a"] == w else 1  # the winner's margin is positive
    lo, hi = sorted(sign * v for v in p["ci95"])
    return f"by {sign * p['diff']:.3f} [{lo:.3f}, {hi:.3f}]\nover {p['b'] if p['a'] == w else p['a']}"


def _win_map(plt, summary, methods, use_bayes, ylabel):
    """Rows: the first grid axis; columns: the others (their product), study.tune's axis tuned away."""
    tuned = summary.get("tuned")
    axes = [a for a in summary["axes"] if not (tuned and a["keys"] == [tuned["key"]])]
    cells = tuned["cells"] if tuned else summary["cells"]
    ax0, others = axes[0], axes[1:]
    rows = ["&".join(v) for v in ax0["values"]]
    cols = [" / ".join("&".join(v) for v in combo) for combo in itertools.product(*[a["values"] for a in others])]
    cmap = plt.get_cmap("tab10")
    colours = [cmap(i) for i in range(len(methods))]
    image = np.ones((len(rows), len(cols), 4))
    text = [["" for _ in cols] for _ in rows]
    for c in cells:
        i = rows.index("&".join(_shown(c, k) for k in ax0["keys"]))
        j = cols.index(" / ".join("&".join(_shown(c, k) for k in a["keys"]) for a in others))
        comp = c.get("comparison")
        if comp is None:
            continue
        if comp["winner"] is not None:
            image[i, j] = colours[methods.index(comp["winner"])]
            text[i][j] = f"{comp['winner']}\n{_value(c['methods'][comp['winner']], use_bayes):.3f}\n{_margin(comp)}"
        else:
            image[i, j] = TIE_COLOUR
            text[i][j] = "tie:\n" + "\n".join(comp["tied"])
    fig, ax = plt.subplots(figsize=(max(7.0, 1.9 * len(cols) + 3), 1.2 * len(rows) + 2.0))
    ax.imshow(image, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=20 if len(cols) > 3 else 0)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(" / ".join("&".join(a["keys"]) for a in others))
    ax.set_ylabel("&".join(k.split(".")[-1] for k in ax0["keys"]), fontsize=8)
    ax.set_title(f"{summary['study']}: winner per cell (its paired 95 % CI against every\nother excludes 0), "
                 f"else the tie (grey); {ylabel};\nmargin: test ppl over the runner-up", fontsize=8)
    return fig, ax


def _vs_communication(plt, summary, methods, use_bayes, ylabel):
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = [(c["methods"][m]["communication_bytes_per_user"] / 2 ** 20, _value(c["methods"][m], use_bayes),
                _half(c["methods"][m], use_bayes), c["name"]) for c in summary["cells"] if m in c["methods"]]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o", label=m)
        for x, y, _, name in pts:
            ax.annotate(name, (x, y), fontsize=6)
    ax.set_xlabel("communication per user (MiB, float32, up + down)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return fig, ax


def _bars(plt, summary, methods, use_bayes, ylabel):
    cells = summary["cells"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cells) + 2), 4))
    x = np.arange(len(cells))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        xs = [i for i, c in enumerate(cells) if m in c["methods"]]
        ax.bar(x[xs] + k * width, [_value(cells[i]["methods"][m], use_bayes) for i in xs], width,
               yerr=[_half(cells[i]["methods"][m], use_bayes) for i in xs], label=m)
    ax.set_xticks(x + 0.4 - width / 2, [c["name"] for c in cells], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel + " (95 % CI)")
    lo = min(_value(c["methods"][m], use_bayes) for c in cells for m in c["methods"])
    ax.set_ylim(bottom=lo * 0.97)
    ax.legend(fontsize=7)
    return fig, ax


def figure(path: str, summary: dict, kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = summary["cells"]
    methods = list(dict.fromkeys(m for c in cells for m in c["methods"]))
    use_bayes = all("over_bayes" in r for c in cells for r in c["methods"].values())
    ylabel = "test ppl / Bayes floor" if use_bayes else "test ppl (mean over users)"
    if kind == "win_map":
        fig, ax = _win_map(plt, summary, methods, use_bayes, ylabel)
    elif kind == "ppl_vs_communication":
        fig, ax = _vs_communication(plt, summary, methods, use_bayes, ylabel)
    else:
        fig, ax = _bars(plt, summary, methods, use_bayes, ylabel)
    ax.set_title(ax.get_title() or summary["study"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
