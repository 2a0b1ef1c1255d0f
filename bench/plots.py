"""Plots of the benchmark results, drawn from the tables in docs/benchmarks-*.md.

Run: ``.venv/bin/python -m bench.plots`` after the benchmarks; writes docs/plots/*.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table(document: str, first_header: str) -> list[list[str]]:
    """The rows of the first Markdown table whose first header cell is ``first_header``."""
    lines = (DOCS / document).read_text().splitlines()
    rows: list[list[str]] = []
    inside = False
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not inside and line.startswith("|") and cells[0] == first_header:
            inside = True
        elif inside and line.startswith("|"):
            if not set(cells[0]) <= {"-"}:
                rows.append(cells)
        elif inside:
            break
    return rows


def number(cell: str) -> float:
    return float(cell.split()[0])


def compress_plot(out: Path) -> None:
    rows = table("benchmarks-compress.md", "Input")
    figure, axes = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == name]
        axes.plot([int(r[1]) for r in mine], [number(r[3]) for r in mine], marker="o", label=name)
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set(xlabel="quality", ylabel="bytes, ours / Pillow's best save", ylim=(0, 1.1))
    axes.set_title("compress-an-image: bytes against Pillow at the same quality")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def clip_plot(out: Path) -> None:
    times = table("benchmarks-clip.md", "Ours against")
    sides = ["hermes-media"] + [row[0] for row in times]
    seconds = [number(times[0][1])] + [number(row[2]) for row in times]
    fetched = {row[0]: number(row[1]) for row in table("benchmarks-clip.md", "Side")}
    megabytes = [fetched["ours"], fetched["yt-dlp"], fetched["download and cut"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.barh(sides, seconds, color=["tab:green", "tab:grey", "tab:grey"])
    left.set(xlabel="seconds", title="30 s clip of a 10-min 720p source")
    right.barh(sides, megabytes, color=["tab:green", "tab:grey", "tab:grey"])
    right.set(xlabel="MiB fetched", title="bytes fetched")
    right.set_yticks([])
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def queue_plot(out: Path) -> None:
    rows = table("benchmarks-queue.md", "workers")
    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    axes.bar([f"{row[0]} worker(s)" for row in rows], [number(row[3]) for row in rows])
    axes.set(ylabel="clip jobs per second", title="arq workers on 2 cores")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main() -> None:
    target = DOCS / "plots"
    target.mkdir(exist_ok=True)
    for name, draw in (("compress", compress_plot), ("clip", clip_plot), ("queue", queue_plot)):
        path = target / f"{name}.png"
        draw(path)
        print(path)


if __name__ == "__main__":
    main()
