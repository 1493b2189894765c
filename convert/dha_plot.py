"""dha_plan.png: the heads a DHA conversion kept per layer, and the pairwise merge errors of a few layers."""

from pathlib import Path

import torch


def draw_plan(plan: dict, kv: int, path: Path) -> None:
    """Heads kept per layer for K and V, and the pairwise merge errors of a few layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = plan["pair_merge_error"]
    columns = max(1, len(maps))
    fig = plt.figure(figsize=(4 * columns, 7), constrained_layout=True)
    grid = fig.add_gridspec(3 if maps else 1, columns)
    ax = fig.add_subplot(grid[0, :])
    layers = range(len(plan["key_heads_per_layer"]))
    ax.step(layers, plan["key_heads_per_layer"], where="mid", label="key heads", color="tab:blue")
    ax.step(layers, plan["value_heads_per_layer"], where="mid", label="value heads", color="tab:orange", linestyle="--")
    ax.set(xlabel="layer", ylabel=f"heads kept (of {kv})", ylim=(0, kv + 0.5),
           title=f"DHA plan: {plan['kept']['kv']:.1%} of the KV cache kept")
    ax.legend(loc="lower right")
    for column, (layer, kinds) in enumerate(sorted(maps.items(), key=lambda item: int(item[0]))):
        for row, kind in enumerate(("k", "v"), start=1):
            ax = fig.add_subplot(grid[row, column])
            matrix = torch.tensor(kinds[kind]).clamp_min(1e-12).log10()
            image = ax.imshow(matrix, cmap="viridis_r")
            ax.set_title(f"layer {layer}: {'key' if kind == 'k' else 'value'} merge error (log10)", fontsize=9)
            ax.set_xticks(range(kv))
            ax.set_yticks(range(kv))
            fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=90)
    plt.close(fig)

