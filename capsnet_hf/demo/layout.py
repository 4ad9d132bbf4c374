"""The demo's Gradio page ([`build_demo`]): draw or upload an image; see the class capsule lengths, the routing map,
the reconstruction from the predicted capsule and one slider per capsule dimension that re-decodes it live.

API endpoints (for `gradio_client`): `/classify_drawing` (a sketchpad value), `/classify_upload` (image, invert) and
`/tweak` (one offset per capsule dimension, applied to the last prediction of the same session)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..cli import UsageError
from ..paper.figures import PERTURBATION_STEPS
from . import inference
from .inference import Prediction

SLIDER_STEP = 0.01
SLIDERS_PER_ROW = 4
CANVAS_PIXELS = 280  # ten canvas pixels per MNIST pixel
BRUSH_RADIUS = 12  # 24-pixel strokes: 2.4 pixels at 28x28 for a digit as tall as the canvas
EMPTY_MESSAGE = "Draw a digit or upload an image."
NO_DECODER_NOTE = (
    "This model has no reconstruction decoder (`config.use_decoder=False`, or an ensemble): the reconstruction and "
    "the capsule-dimension sliders need one and are hidden."
)
INTRODUCTION = """# {title}

A capsule network ("Dynamic Routing Between Capsules", Sabour, Frosst & Hinton, 2017). Each class has a capsule: a
{capsule_dim}-dimensional vector whose length is the probability that the class is present and whose direction
encodes how it looks. Pick the brush and draw a digit (dark on light: it is inverted for the model), or upload an
image."""


def build_demo(model: Any, processor: Any, title: str = "CapsNet demo") -> gr.Blocks:
    """The demo page for `model` (a CapsNet in eval mode) and its image processor; parts that need a decoder are
    hidden, with a note, for a model without one."""
    decoder = inference.has_decoder(model)
    capsule_dim = model.config.capsule_dim
    low, high = PERTURBATION_STEPS[0], PERTURBATION_STEPS[-1]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(INTRODUCTION.format(title=title, capsule_dim=capsule_dim))
        last_prediction = gr.State(None)
        with gr.Row():
            with gr.Column():
                with gr.Tab("Draw"):
                    sketchpad = gr.Sketchpad(
                        type="pil",
                        canvas_size=(CANVAS_PIXELS, CANVAS_PIXELS),
                        fixed_canvas=True,
                        layers=False,
                        brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=BRUSH_RADIUS),
                        label="Draw a digit",
                        elem_id="sketchpad",
                    )
                with gr.Tab("Upload"):
                    upload = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"], label="Image")
                    invert = gr.Checkbox(False, label="Dark digit on a light background (invert it)")
                model_input = gr.Image(label="What the model sees", format="png", interactive=False)
            with gr.Column():
                verdict = gr.Markdown(EMPTY_MESSAGE)
                lengths = gr.BarPlot(
                    x=inference.CLASS_COLUMN,
                    y=inference.LENGTH_COLUMN,
                    color=inference.KIND_COLUMN,
                    color_map={inference.PREDICTED: "#e4572e", inference.OTHER: "#4c72b0"},
                    y_lim=[0.0, 1.0],
                    sort=None,
                    label="Class capsule lengths |v_j|",
                )
                routing = gr.Image(label="Routing map of the prediction", format="png", interactive=False)
                routing_note = gr.Markdown()
        with gr.Row(visible=decoder):
            reconstruction = gr.Image(label="Reconstruction from the predicted capsule", format="png")
            tweaked = gr.Image(label="Reconstruction with the dimensions below moved", format="png")
        with gr.Column(visible=decoder):
            gr.Markdown(f"Move one dimension of the predicted capsule by {low:+.2f} to {high:+.2f} (paper, Figure 4).")
            sliders = []
            for first in range(0, capsule_dim, SLIDERS_PER_ROW):
                with gr.Row():
                    for dimension in range(first, min(first + SLIDERS_PER_ROW, capsule_dim)):
                        sliders.append(
                            gr.Slider(low, high, value=0.0, step=SLIDER_STEP, label=f"dimension {dimension}")
                        )
            with gr.Accordion("Every dimension at once (paper, Figure 4)", open=False):
                grid = gr.Image(label="Perturbations of the predicted capsule", format="png", interactive=False)
        if not decoder:
            gr.Markdown(NO_DECODER_NOTE)

        outputs = [verdict, model_input, lengths, routing, routing_note, last_prediction]
        decoder_outputs = [reconstruction, tweaked, grid] if decoder else []
        slider_resets = [0.0] * len(sliders) if decoder else []  # a new prediction starts from its own capsule
        outputs += decoder_outputs + (sliders if decoder else [])

        def show(image: Any, invert_image: bool) -> list[Any]:
            if image is None:
                return [EMPTY_MESSAGE, *[None] * (len(outputs) - 1 - len(slider_resets)), *slider_resets]
            try:
                prediction = inference.predict(model, processor, image, invert_image)
            except UsageError as error:
                raise gr.Error(str(error)) from error
            values = [
                inference.summary(model, prediction),
                inference.display_image(prediction.pixel_values[0]),
                inference.lengths_table(model, prediction),
                inference.routing_image(prediction),
                inference.routing_caption(model, prediction),
                prediction,
            ]
            if decoder:
                plain = inference.display_image(inference.reconstruction(model, prediction))
                values += [plain, plain, inference.perturbation_grid(model, prediction), *slider_resets]
            return values

        def classify_drawing(drawing: dict | None) -> list[Any]:
            image = inference.drawing_to_image(drawing.get("composite") if drawing else None)
            return show(image, True)

        def tweak(prediction: Prediction | None, *offsets: float) -> Any:
            if prediction is None:
                return None
            return inference.display_image(inference.reconstruction(model, prediction, offsets))

        sketchpad.change(classify_drawing, sketchpad, outputs, api_name="classify_drawing", trigger_mode="always_last")
        gr.on([upload.change, invert.change], show, [upload, invert], outputs, api_name="classify_upload")
        if decoder:
            gr.on(
                [slider.input for slider in sliders],
                tweak,
                [last_prediction, *sliders],
                tweaked,
                api_name="tweak",
                trigger_mode="always_last",
                show_progress="hidden",
            )
    return demo
