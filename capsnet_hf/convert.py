"""`capsnet-convert`: the official TensorFlow CapsNet checkpoints as transformers model folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .cli import UsageError, positive_int, run_command
from .conversion.checkpoint_paths import display_checkpoint
from .conversion.converter import ConversionResult, convert
from .conversion.geometry import DATASETS
from .conversion.parity import check_parity, measure_parity
from .hub import push_folder_to_hub

PROG = "capsnet-convert"


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--name_with_underscores`, also accepted as `--name-with-dashes`."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert the official TensorFlow CapsNet checkpoints (Sarasra/models research/capsules) into a "
        "transformers model folder. No TensorFlow needed.",
    )
    _add(parser, "checkpoint", required=True, help="checkpoint prefix (.../model.ckpt-1) or its folder, or a pattern "
         "with {} for an ensemble (.../cifar{}/model.ckpt-600000)")  # fmt: skip
    _add(parser, "output_dir", required=True, help="folder to write: new or empty, or see --overwrite_output_dir")
    _add(parser, "num_trials", type=positive_int, default=1, help="ensemble members: {} takes 0..num_trials-1")
    _add(parser, "dataset", choices=DATASETS, help="override the dataset inferred from the input channels")
    _add(
        parser, "image_size", type=positive_int, help="input size when the shapes allow several (default: the largest)"
    )
    _add(
        parser,
        "overwrite_output_dir",
        action="store_true",
        help="replace a folder with files in it (once the new model passed its parity check)",
    )
    _add(parser, "verify", action="store_true", help="re-read the written folder and print the parity numbers")
    _add(parser, "tolerance", type=float, default=1e-4, help="largest accepted |converted - reference| of the capsule "
         "lengths, poses and reconstructions")  # fmt: skip
    _add(parser, "push_to_hub", action="store_true", help="upload the folder to the Hub (needs --hub_model_id)")
    _add(parser, "hub_model_id", help="Hub repository, e.g. user/capsnet-mnist-official")
    _add(parser, "hub_token", help="Hub token (default: the logged-in token / HF_TOKEN)")
    _add(parser, "hub_private_repo", action="store_true", help="create the Hub repository as private")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 on success; any error is `capsnet-convert: error: <message>` and status 2."""
    return run_command(PROG, convert_from_command_line, argv)


def convert_from_command_line(argv: Sequence[str] | None = None) -> ConversionResult:
    """Parse `argv`, convert, then verify and push if asked; bad input or failed parity raises `UsageError`."""
    args = build_parser().parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id")
    result = convert(
        args.checkpoint,
        args.output_dir,
        num_trials=args.num_trials,
        dataset=args.dataset,
        image_size=args.image_size,
        overwrite=args.overwrite_output_dir,
        tolerance=args.tolerance,
        hub_model_id=args.hub_model_id,
    )
    config = result.config
    print(
        f"wrote {result.folder}: {result.dataset}, {config.num_ensemble_members} member(s), "
        f"{config.num_channels}x{config.image_size[0]}x{config.image_size[1]} input, {config.num_labels} classes"
    )
    if args.verify:
        parity = measure_parity(result.folder, result.reference)
        print(f"verify: max |logit difference| = {parity['logits']:.3g} (converted folder vs. checkpoint reference)")
        print("verify: " + json.dumps({name: float(f"{value:.3g}") for name, value in parity.items()}))
        check_parity(parity, args.tolerance)
    if args.push_to_hub:
        commit = push_folder_to_hub(
            result.folder,
            args.hub_model_id,
            private=args.hub_private_repo,
            token=args.hub_token,
            commit_message="CapsNet converted from the official TensorFlow checkpoint "
            + display_checkpoint(args.checkpoint),
        )
        print(f"pushed to {getattr(commit, 'commit_url', commit)}")
    return result


if __name__ == "__main__":
    sys.exit(main())
