"""The one way a benchmark writes its plot: laid out, its folder made, saved, the figure closed."""

from __future__ import annotations

from pathlib import Path


def save_plot(fig, path: Path, *, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
