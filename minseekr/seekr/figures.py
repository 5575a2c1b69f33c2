"""The paper's head figures from accumulated head scores: importance (Fig. 5) and attention variation (Fig. 4).

matplotlib is an optional extra (`pip install -e .[tools]`); it is imported only when a figure is drawn.
"""
from pathlib import Path


def draw(scores, out_dir, selected=None, importance="paper"):
    """importance.png (Fig. 5, the selected heads marked) and variation.png (Fig. 4) into out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.25 * scores.n_heads), max(3.0, 1 + 0.2 * scores.n_layers)))
    im = ax.imshow(scores.importance(importance).numpy(), origin="lower", aspect="auto", cmap="viridis")
    if selected:
        ax.scatter([h for _, h in selected], [l for l, _ in selected], marker="s", s=40, facecolors="none",
                   edgecolors="red", linewidths=1.2, label=f"selected ({len(selected)})")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    ax.set(xlabel="head", ylabel="layer", title=f"head importance over {len(scores.tasks)} tasks")
    fig.colorbar(im, ax=ax, label="I = S·F" if importance == "paper" else "I = Σ_k S̃^k·F^k")
    fig.tight_layout()
    fig.savefig(out_dir / "importance.png", dpi=150)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(scores.forgettability.flatten().numpy(), bins=40)
    ax.set(xlabel="cumulative attention variation F", ylabel="heads", title="variation of attention weights")
    fig.tight_layout()
    fig.savefig(out_dir / "variation.png", dpi=150)
    plt.close(fig)
