"""The CapsNet demo as a Hugging Face Space (Gradio SDK): `python app.py`, which is what a Space runs.

The model is the Space variable CAPSNET_DEMO_MODEL (a Hub id, or a folder), by default the folder `model` beside
this file (`capsnet-train --output_dir spaces/capsnet-demo/model ...`). The Space sets GRADIO_SERVER_NAME itself;
run locally, this serves on 127.0.0.1 like `capsnet-demo`.
"""

import os

from capsnet_hf.demo.inference import load_capsnet
from capsnet_hf.demo.launch import LOOPBACK, disable_gradio_analytics
from capsnet_hf.demo.layout import build_demo

MODEL = os.environ.get("CAPSNET_DEMO_MODEL", os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))

disable_gradio_analytics()
model, processor = load_capsnet(MODEL, trust_remote_code=os.environ.get("CAPSNET_DEMO_TRUST_REMOTE_CODE") == "1")
demo = build_demo(model, processor)

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", LOOPBACK))
