"""Figures written to files (tools/plot_run.py and the studies' plots): matplotlib on its file-only
backend, and the one way a finished figure is saved. matplotlib comes with the plot (and dev) extra."""


def pyplot():
    """matplotlib.pyplot on the Agg backend: writes image files, needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int) -> None:
    """Lay the figure out, write it to `path` and close it (pyplot keeps open figures alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
