"""The two-panel PNG of `devit-ext evaluate --plot`.

Left: top-1 vs FLOPs per image (log scale) for the teacher, each device (on its
own classes) and DeViT with fp32 / int8 tokens. Right: top-1 vs number of
missing devices (mean over subsets, min-max bars). Legends sit outside the
axes, so none hides a point; points that share a place (fp32 and int8 DeViT, equal devices)
are drawn as a hollow and a filled marker, or as concentric discs, so all stay visible.
"""
from __future__ import annotations

import os


def plot_evaluation(out: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot: needs matplotlib (pip install matplotlib)") from e

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    t = out["teacher"]
    a.scatter([t["flops"]], [100 * t["top1"]], marker="*", s=220, color="black", label=f"teacher {t['name']}", zorder=3)
    cmap = plt.get_cmap("tab10")
    n = len(out["devices"])
    for d in out["devices"]:
        if d["own_classes_top1"] is not None:
            # equal devices land on one spot: later ones are drawn smaller and on top, so every ring shows
            a.scatter([d["flops"]], [100 * d["own_classes_top1"]], marker="o", s=40 + 45 * (n - 1 - d["device"]),
                      color=cmap(d["device"] % 10), edgecolors="white", linewidths=0.8,
                      label=f"device {d['device']} (own {len(d['classes'])} classes)", zorder=3 + d["device"] / n)
    f = out["devit"]["flops"]
    a.scatter([f], [100 * out["devit"]["fp32"]["top1"]], marker="s", s=140, facecolors="none", edgecolors="tab:red",
              linewidths=2, label="DeViT fp32 tokens", zorder=5)
    a.scatter([f], [100 * out["devit"]["int8"]["top1"]], marker="x", s=60, color="tab:blue", linewidths=2,
              label="DeViT int8 tokens", zorder=6)
    a.set_xscale("log")
    a.margins(x=0.15, y=0.12)  # the markers at the extremes stay inside the axes
    a.set_xlabel("FLOPs per image (log)")
    a.set_ylabel(f"top-1 % on {out['split']}")
    a.set_title("accuracy vs compute")
    a.grid(alpha=0.3)
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)

    ks = [m["k"] for m in out["missing"]]
    mean = [100 * m["mean_top1"] for m in out["missing"]]
    lo = [100 * (m["mean_top1"] - m["min_top1"]) for m in out["missing"]]
    hi = [100 * (m["max_top1"] - m["mean_top1"]) for m in out["missing"]]
    b.errorbar(ks, mean, yerr=[lo, hi], marker="o", capsize=4, color="tab:blue",
               label="DeViT int8, mean over missing subsets (bars: min-max)")
    b.axhline(100 * t["top1"], color="black", ls="--", lw=1, label="teacher")
    b.set_xticks(ks)
    b.set_xlabel("devices missing")
    b.set_ylabel(f"top-1 % on {out['split']}")
    b.set_title("accuracy when devices drop out")
    b.grid(alpha=0.3)
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "." + os.path.basename(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
