"""`capsnet-export-onnx`: a saved CapsNet image classifier as an ONNX file with a dynamic batch axis, exported with
`torch.onnx.export(..., dynamo=True)` and checked in onnxruntime against PyTorch before it is written.

    capsnet-export-onnx --model_name_or_path capsnet-mnist --output capsnet-mnist.onnx

The graph takes `pixel_values` [batch, C, H, W] (what the model's image processor makes) and returns the model's
outputs under their names: `logits`, `capsule_lengths`, `capsule_poses` and, with a decoder, `reconstructions`.
Needs the `onnx` extra (`pip install "capsnet-hf[onnx]"`: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .cli import UsageError, load_model_and_processor, positive_int, run_command, write_aside

PROG = "capsnet-export-onnx"
INPUT_NAME = "pixel_values"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def _whole_batch(on_cpu: bool, checkpointing: bool) -> None:
    return None


@contextlib.contextmanager
def exportable_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every class-capsule layer of `model` routes the whole batch at once with the torch
    formulation, and every primary-capsule layer squashes with torch ops: on CPU routing splits a batch into chunks
    whose count depends on the batch size, which a graph with a dynamic batch cannot hold, and the CPU routing
    kernel's ops have no ONNX translation."""
    layers = [module for module in model.modules() if hasattr(module, "examples_per_chunk")]
    kernels = [layer.routing_kernel for layer in layers]
    primary_layers = [module for module in model.modules() if hasattr(module, "squash_kernel")]
    squash_kernels = [layer.squash_kernel for layer in primary_layers]
    try:
        for layer in layers:
            layer.routing_kernel = None
            layer.examples_per_chunk = _whole_batch  # the instance's, over the class's method
        for layer in primary_layers:
            layer.squash_kernel = None
        yield model
    finally:
        for layer, kernel in zip(layers, kernels, strict=True):
            layer.routing_kernel = kernel
            del layer.examples_per_chunk
        for layer, kernel in zip(primary_layers, squash_kernels, strict=True):
            layer.squash_kernel = kernel


def example_pixel_values(config: Any, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Random pixel values in 0..1 of the model's input geometry, [batch_size, C, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, config.num_channels, *config.image_size, generator=generator)


def batch_dynamic_shapes() -> tuple[dict[int, torch.export.Dim]]:
    """`dynamic_shapes` for a forward of `pixel_values` alone: the batch axis is dynamic, the image is not."""
    return ({0: torch.export.Dim("batch")},)


def export_program(model: nn.Module, pixel_values: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of the model (in eval mode) with a dynamic batch, traced on example `pixel_values`."""
    with exportable_routing(model.eval()):
        return torch.export.export(model, (pixel_values,), dynamic_shapes=batch_dynamic_shapes())


def export_onnx(model: nn.Module, pixel_values: torch.Tensor, opset_version: int | None = None) -> Any:
    """The `torch.onnx.ONNXProgram` of the model (in eval mode) with a dynamic batch, traced on `pixel_values`; its
    inputs and outputs are named as the model's, its metadata holds `id2label` as JSON."""
    model.eval()
    with torch.no_grad():
        output_names = list(model(pixel_values).keys())
    with exportable_routing(model):
        program = torch.onnx.export(
            model,
            (pixel_values,),
            dynamo=True,
            dynamic_shapes=batch_dynamic_shapes(),
            input_names=[INPUT_NAME],
            output_names=output_names,
            opset_version=opset_version,
            verbose=False,
        )
    id2label = {str(index): label for index, label in model.config.id2label.items()}
    program.model.metadata_props["id2label"] = json.dumps(id2label)
    return program


def onnxruntime_outputs(path: str | os.PathLike, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    """Run the ONNX file at `path` in onnxruntime (CPU) on `pixel_values`; its outputs by name."""
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: pixel_values.numpy()})
    return dict(zip(names, values, strict=True))


def max_logit_difference(model: nn.Module, path: str | os.PathLike, pixel_values: torch.Tensor) -> float:
    """max |logits in onnxruntime - logits in PyTorch| on `pixel_values`."""
    with torch.no_grad():
        expected = model.eval()(pixel_values).logits
    logits = onnxruntime_outputs(path, pixel_values)["logits"]
    return float(np.abs(logits - expected.numpy()).max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a saved CapsNet image classifier to ONNX (dynamic batch), checked in onnxruntime "
        "against PyTorch before it is written.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="saved model folder or Hub id")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset_version", type=positive_int, default=None, help="default: torch.onnx's")
    parser.add_argument(
        "--check_batch_size",
        type=positive_int,
        default=3,
        help="batch of random images the export is checked on (traced on a batch of 2)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest accepted |logits in onnxruntime - in PyTorch|"
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def export(argv: Sequence[str] | None = None) -> float:
    """Parse `argv`, export, check and write the ONNX file; returns the measured max logit difference."""
    args = build_parser().parse_args(argv)
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed: pip install 'capsnet-hf[onnx]'")
    if not args.output.endswith(".onnx"):
        raise UsageError(f"--output must name a .onnx file, got {args.output!r}")
    model, _ = load_model_and_processor(args.model_name_or_path, args.trust_remote_code)
    if not hasattr(model.config, "primary_grid_size"):
        raise UsageError(f"{args.model_name_or_path!r} is not a CapsNet model")
    program = export_onnx(model, example_pixel_values(model.config), args.opset_version)
    check_inputs = example_pixel_values(model.config, args.check_batch_size, seed=1)
    with write_aside(args.output) as partial:
        program.save(partial, external_data=False)
        difference = max_logit_difference(model, partial, check_inputs)
        if not difference <= args.tolerance:
            raise UsageError(
                f"the ONNX logits differ from PyTorch's by {difference:.3g} (> --tolerance {args.tolerance:g}); "
                "nothing written"
            )
    print(
        f"{args.output}: max |logits in onnxruntime - in PyTorch| = {difference:.3g} on {args.check_batch_size} images"
    )
    return difference


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-export-onnx`): 0 on success, 2 with a one-line message on bad input."""
    return run_command(PROG, export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
