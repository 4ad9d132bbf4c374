"""Reproduce "Dynamic Routing Between Capsules" in one call: train the MNIST CapsNet for the largest budget that fits a
wall-clock limit (bf16 + torch.compile, data on the device), evaluate it on the whole test set, write a complete
model folder, and optionally the paper's MultiMNIST and affNIST-style experiments with the time that remains.

    # once, where `datasets` is installed: the MNIST archive that travels with the working tree (data/ is ignored)
    python benchmarks/reproduce_paper.py --prepare_data ../shared/datasets/mnist --data data/mnist.npz
    # on the GPU machine: nothing but the working tree and that archive
    python benchmarks/reproduce_paper.py --data data/mnist.npz --minutes 8 --output_dir /tmp/paper --paper_experiments

Each stage is one `capsnet-train` run (`--max_train_minutes` stops it), so the model folders are what users get
(safetensors, image processor, model card with the measured accuracy in its model-index, reconstruction figure; this
script adds the dimension-perturbation figure). Stages share the time left by fixed weights (MNIST 1/2, MultiMNIST
1/5, CapsNet and baseline CNN on expanded MNIST 3/20 each), each re-planned from the clock when it starts.
Arguments this script does not know are passed to every `capsnet-train` run (CapsNet options to CapsNet runs only).
One JSON (`--json`, default OUTPUT_DIR/reproduction.json) holds every figure, the budget, the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's package, installed or not
from capsnet_hf.cli import UsageError  # noqa: E402
from capsnet_hf.data.splits import load_splits, save_npz_splits  # noqa: E402
from capsnet_hf.training.arguments import MODEL_FLAGS  # noqa: E402
from capsnet_hf.training.recipes import RECIPES  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The paper's test errors (%), Table 1 and Sections 5.2 and 6, for the JSON beside ours.
PAPER = {
    "mnist_test_error_percent": 0.25,
    "multimnist_two_digit_error_percent": 5.2,
    "affnist_capsnet_accuracy_percent": 79.0,
    "affnist_baseline_accuracy_percent": 66.0,
    "expanded_mnist_capsnet_accuracy_percent": 99.23,
    "expanded_mnist_baseline_accuracy_percent": 99.22,
}
STAGE_WEIGHTS = {"mnist": 10, "multimnist": 4, "expanded_capsnet": 3, "expanded_baseline": 3}
# Minutes a stage spends outside its training loop (start-up, data, final evaluation, saving, figures).
STAGE_OVERHEAD_MINUTES = 0.4
CAPSNET_ONLY_FLAGS = {f"--{name}" for name in (*MODEL_FLAGS, "config_overrides")}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="reproduce_paper.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="MNIST archive (.npz) written by --prepare_data")
    parser.add_argument("--prepare_data", metavar="DATASET", help="write --data from this datasets folder or Hub id")
    parser.add_argument("--output_dir", help="where the model folders go")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole call")
    parser.add_argument("--paper_experiments", action="store_true", help="also MultiMNIST and the affNIST-style pair")
    parser.add_argument("--recipe", default="mnist", help="capsnet-train --recipe of the CapsNet runs")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 512 on a GPU, 128 on CPU")
    parser.add_argument(
        "--eval_epochs", type=float, default=10.0, help="evaluate every this many epochs (and at the end)"
    )
    parser.add_argument("--no_compile", action="store_true", help="no torch.compile (default: compile on a GPU)")
    parser.add_argument("--json", default=None, help="default: OUTPUT_DIR/reproduction.json")
    parser.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    args, train_args = parser.parse_known_args(argv)
    if args.prepare_data is None and args.output_dir is None:
        parser.error("--output_dir is required (except with --prepare_data)")
    if not args.minutes > 0 or (args.batch_size is not None and args.batch_size < 1) or not args.eval_epochs > 0:
        parser.error("--minutes, --batch_size and --eval_epochs must be positive")
    return args, train_args


def prepare_data(dataset: str, path: str) -> None:
    splits = load_splits(dataset, "train", "test", num_channels=1)
    if splits.train.image_size != (28, 28):
        raise UsageError(f"{dataset!r} holds {list(splits.train.image_size)} images; MNIST is 28x28")
    save_npz_splits(splits, path)
    print(f"wrote {path}: {len(splits.train)} training and {len(splits.eval)} test images")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    import accelerate
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def commit(given: str | None) -> str:
    if given:
        return given
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 else "unknown"


class Planner:
    """Splits the wall-clock budget between the stages still to run, in proportion to their weights."""

    def __init__(self, minutes: float, stages: list[str]):
        self.deadline = time.time() + 60 * minutes
        self.pending = list(stages)

    def minutes_for(self, stage: str) -> float:
        left = (self.deadline - time.time()) / 60
        share = STAGE_WEIGHTS[stage] / sum(STAGE_WEIGHTS[name] for name in self.pending)
        self.pending.remove(stage)
        return max(left * share - STAGE_OVERHEAD_MINUTES, 0.02)


def run_command(module: str, argv: list[str]) -> None:
    """`python -m capsnet_hf.<module> argv` in a fresh process (each run owns its accelerate state and compile
    caches); its output streams through; a failure stops the reproduction with its last line."""
    print(f"python -m capsnet_hf.{module} " + " ".join(argv), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", f"capsnet_hf.{module}", *argv]
    last = f"exit status of {module}"
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stderr:
            sys.stderr.write(line)
            last = line.strip().split("\r")[-1] or last
    if process.returncode != 0:
        raise UsageError(f"capsnet_hf.{module} failed: {last}")


def run_training(argv: list[str]) -> dict[str, Any]:
    """One capsnet-train run; its train and evaluation results (from the model folder)."""
    run_command("train", argv)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    results = {}
    for name in ("train_results.json", "eval_results.json"):
        results.update(json.loads((output_dir / name).read_text()))
    return results


def evaluate(model_dir: str, dataset: str, source: str) -> dict[str, Any]:
    """capsnet-eval in float32 on the torch path (the reference numbers, whatever the training precision)."""
    path = os.path.join(model_dir, f"eval_{dataset if not dataset.endswith('.npz') else 'test'}_fp32.json")
    argv = ["--model_name_or_path", model_dir, "--dataset_name", dataset, "--source_dataset_name", source]
    run_command("evaluate", [*argv, "--mixed_precision", "no", "--cpu_routing_kernel", "false", "--output_file", path])
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_perturbation_figure(model_dir: str, data: str) -> str:
    """Paper Figure 4 for the first test digit, beside the model's reconstruction figure."""
    from capsnet_hf import CapsNetForImageClassification
    from capsnet_hf.data.batching import BatchTransform
    from capsnet_hf.paper.figures import plot_perturbations, save_png

    model = CapsNetForImageClassification.from_pretrained(model_dir).eval()
    test = load_splits(data, None, "test", max_eval_samples=None).eval
    pixels = BatchTransform(test.image_size)(test.batch([0])["pixel_values"])
    return save_png(plot_perturbations(model, pixels), os.path.join(model_dir, "perturbation.png"))


def summary(result: dict[str, Any], minutes: float) -> dict[str, Any]:
    keys = ("train_steps", "epochs", "train_examples_seen", "train_runtime_seconds", "train_loss_last")
    out = {key: result.get(key) for key in keys}
    out["budget_minutes"] = minutes
    out["eval_accuracy"] = result["eval_accuracy"]
    out["eval_error_percent"] = result["eval_error_percent"]
    out["eval_num_examples"] = result["eval_num_examples"]
    return out


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    try:
        if args.prepare_data is not None:
            prepare_data(args.prepare_data, args.data)
        else:
            reproduce(args, train_args, argv)
    except UsageError as error:
        print(f"reproduce_paper.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def reproduce(args: argparse.Namespace, train_args: list[str], argv: list[str] | None) -> dict[str, Any]:
    """Run the stages within `args.minutes` and write the JSON report; returns it."""
    started = time.time()
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data!r} does not exist (write it with --prepare_data)")
    on_gpu = torch.cuda.is_available()
    batch_size = args.batch_size or (512 if on_gpu else 128)
    steps_per_epoch = max(1, len(load_splits(args.data, "train", None).train) // batch_size)
    common = [
        "--per_device_train_batch_size", str(batch_size),
        "--eval_steps", str(max(1, round(args.eval_epochs * steps_per_epoch))),
        "--logging_steps", str(steps_per_epoch),
        "--report_to", "none",
        "--overwrite_output_dir",
    ]  # fmt: skip
    if on_gpu and not args.no_compile:
        common.append("--torch_compile")
    # The recipe's lr_decay_steps count steps of 128 examples: keep its decay per epoch at this batch size.
    recipe = RECIPES[args.recipe]["training"] if args.recipe in RECIPES else {}
    decay_steps = max(1, round(recipe.get("lr_decay_steps", 2000) * 128 / batch_size))
    capsnet = ["--recipe", args.recipe, *common, "--lr_decay_steps", str(decay_steps), *train_args]
    baseline = [*common, "--lr_decay_steps", str(decay_steps), *_without_capsnet_flags(train_args)]

    stages = ["mnist"] + (["multimnist", "expanded_capsnet", "expanded_baseline"] if args.paper_experiments else [])
    planner = Planner(args.minutes, stages)
    out = Path(args.output_dir)
    report: dict[str, Any] = {
        "command": "python benchmarks/reproduce_paper.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit(args.commit),
        "machine": machine(),
        "budget_minutes": args.minutes,
        "batch_size": batch_size,
        "torch_compile": "--torch_compile" in common,
        "paper": PAPER,
        "stages": {},
    }

    path = args.json or str(out / "reproduction.json")
    try:
        for _ in run_stages(args, capsnet, baseline, planner, out, report["stages"]):
            write_report(report, path, started)
    except Exception as error:
        if report["stages"]:  # keep what finished; a run that fails before any stage leaves nothing
            report["failed"] = str(error)
            write_report(report, path, started)
        raise
    accuracies = {
        name: {k: v for k, v in stage.items() if "accuracy" in k} for name, stage in report["stages"].items()
    }
    print(json.dumps(accuracies))
    print(f"wrote {path} in {report['wall_seconds']:.0f} s")
    return report


def run_stages(
    args: argparse.Namespace,
    capsnet: list[str],
    baseline: list[str],
    planner: Planner,
    out: Path,
    stages: dict[str, Any],
) -> Iterator[str]:
    """Runs the stages in order, puts each one's figures into `stages` and then yields its name."""
    minutes = planner.minutes_for("mnist")
    mnist_dir = str(out / "capsnet-mnist")
    result = run_training(
        [*capsnet, "--dataset_name", args.data, "--dataset_hub_id", "ylecun/mnist", "--output_dir", mnist_dir,
         "--max_train_minutes", f"{minutes:.3f}"]
    )  # fmt: skip
    save_perturbation_figure(mnist_dir, args.data)
    fp32 = evaluate(mnist_dir, args.data, args.data)
    stages["mnist"] = {
        **summary(result, minutes),
        "test_accuracy_fp32": fp32["accuracy"],
        "test_error_percent_fp32": fp32["error_percent"],
        "model_dir": mnist_dir,
    }
    yield "mnist"

    if args.paper_experiments:
        generated = ["--source_dataset_name", args.data, "--augmentation", "none"]
        minutes = planner.minutes_for("multimnist")
        result = run_training(
            [*capsnet, *generated, "--dataset_name", "multimnist", "--output_dir", str(out / "capsnet-multimnist"),
             "--max_train_minutes", f"{minutes:.3f}"]
        )  # fmt: skip
        stages["multimnist"] = {**summary(result, minutes), "metric": "both digits correct (two-target)"}
        yield "multimnist"
        for stage, model_args in (("expanded_capsnet", capsnet), ("expanded_baseline", baseline)):
            minutes = planner.minutes_for(stage)
            model_dir = str(out / stage.replace("_", "-"))
            model_type = ["--model_type", "baseline_cnn"] if stage == "expanded_baseline" else []
            result = run_training(
                [*model_args, *model_type, *generated, "--dataset_name", "expanded_mnist", "--output_dir", model_dir,
                 "--max_train_minutes", f"{minutes:.3f}"]
            )  # fmt: skip
            affnist = evaluate(model_dir, "affnist_style", args.data)
            stages[stage] = {
                **summary(result, minutes),
                "affnist_style_accuracy": affnist["accuracy"],
                "affnist_style_num_examples": affnist["num_examples"],
            }
            yield stage


def write_report(report: dict[str, Any], path: str, started: float) -> None:
    """The report so far, replaced atomically: after every stage, so that a later stage's failure or the call's time
    limit keeps the figures of the stages before it."""
    report["wall_seconds"] = time.time() - started
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    os.replace(path + ".partial", path)


def _without_capsnet_flags(train_args: list[str]) -> list[str]:
    """`train_args` less the CapsNet options and their values (the baseline CNN has none)."""
    kept, skipping = [], False
    for arg in train_args:
        if arg.startswith("--"):
            skipping = arg.split("=", 1)[0] in CAPSNET_ONLY_FLAGS
        if not skipping:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
