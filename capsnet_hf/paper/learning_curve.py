"""Per-epoch test accuracy of `capsnet-train` runs, read from their `training_log.jsonl`, as a Markdown table and a
PNG plot beside published MNIST curves.

    python -m capsnet_hf.learning_curve runs/capsnet-mnist --output docs/figures/mnist_learning_curve.png --markdown
    python -m capsnet_hf.learning_curve runs/a runs/b --labels official paper --no_published --output curves.png

The evaluations are the lines of the log with `eval_accuracy` and `epoch` (capsnet-train evaluates on the whole
evaluation split after every epoch). A resumed run appends to the same log, so a step evaluated twice keeps its last
line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

from ..training.checkpoints import LOG_FILE

# MNIST test accuracy (%) against epochs, as their authors report it (batch 100-128, Adam 1e-3; docs/results.md).
PUBLISHED_MNIST_CURVES: dict[str, dict[float, float]] = {
    "XifengGuo/CapsNet-Pytorch": {1: 99.0, 5: 99.35, 10: 99.53, 50: 99.69},
    "Officium/Capsules": {1: 98.30, 5: 99.14, 10: 99.40, 50: 99.60},
    "naturomics/CapsNet-Tensorflow": {1.2: 98.80, 10.5: 99.48},
}

Curve = dict[float, float]  # epoch -> test accuracy in %


def read_curve(run: str) -> Curve:
    """Epoch -> evaluation accuracy (%) of a run folder (or its `training_log.jsonl`); ValueError if it has none."""
    path = os.path.join(run, LOG_FILE) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"{run!r} has no {LOG_FILE}")
    by_step: dict[int, tuple[float, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON ({error.msg})") from error
            if "eval_accuracy" in record and "epoch" in record:
                by_step[int(record["step"])] = (float(record["epoch"]), 100.0 * float(record["eval_accuracy"]))
    if not by_step:
        raise ValueError(f"{path} holds no evaluation with an epoch (eval_accuracy, epoch)")
    return dict(sorted(by_step.values()))


def markdown_table(curves: Mapping[str, Curve], published: Mapping[str, Curve]) -> str:
    """One row per epoch evaluated in a run or given by a published curve (up to the runs' last epoch), one column
    per run and per published curve."""
    epochs = {epoch for curve in curves.values() for epoch in curve}
    last = max(epochs)
    epochs = sorted(epochs | {epoch for curve in published.values() for epoch in curve if epoch <= last})
    names = list(curves) + list(published)
    lines = ["| epoch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for epoch in epochs:
        cells = [f"{curve[epoch]:.2f}" if epoch in curve else "" for curve in curves.values()]
        cells += [f"{curve[epoch]:.2f}" if epoch in curve else "" for curve in published.values()]
        lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, Curve], published: Mapping[str, Curve], path: str, title: str) -> None:
    """Test accuracy (%) against epochs: runs as lines with dots, published curves as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_png

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        axis.plot(list(curve), list(curve.values()), marker="o", label=name)
    for name, curve in published.items():
        axis.plot(
            list(curve), list(curve.values()), linestyle="--", marker="x", alpha=0.7, label=f"{name} (published)"
        )
    values = [value for curve in (*curves.values(), *published.values()) for value in curve.values()]
    axis.set_ylim(max(min(values) - 0.2, 90.0), 100.0)
    last = max(epoch for curve in curves.values() for epoch in curve)
    axis.set_xlim(0, max(last, 1) * 1.05 + 0.5)
    axis.axhline(99.75, color="grey", linewidth=0.8, linestyle=":", label="paper: 0.25 % error")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_png(figure, path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capsnet-learning-curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="capsnet-train output folders (or their training_log.jsonl)")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run (default: the folder names)")
    parser.add_argument("--output", default=None, help="write the PNG plot here")
    parser.add_argument("--title", default="CapsNet, MNIST test accuracy per epoch")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (default: JSON)")
    parser.add_argument("--no_published", action="store_true", help="leave out the published MNIST curves")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels gives {len(labels)} names for {len(args.runs)} runs")
    try:
        curves = {label: read_curve(run) for label, run in zip(labels, args.runs, strict=True)}
    except ValueError as error:
        parser.error(str(error))
    published = {} if args.no_published else PUBLISHED_MNIST_CURVES
    if args.output:
        plot_curves(curves, published, args.output, args.title)
    if args.markdown:
        print(markdown_table(curves, published))
    else:
        print(json.dumps({name: {f"{e:g}": a for e, a in curve.items()} for name, curve in curves.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
