"""The interactive demo (Gradio; `pip install -e ".[demo]"`): a CapsNet's class capsules, routing and reconstructions
for a drawn or uploaded image, locally (`capsnet-demo`) or as a Hugging Face Space (spaces/capsnet-demo/app.py).

* `inference`: the pure functions from a model and an image to what is shown (no gradio).
* `layout`: `build_demo(model, processor)`, the Gradio Blocks page.
* `launch`: the `capsnet-demo` command line.
"""
