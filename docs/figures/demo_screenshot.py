"""Screenshot of `capsnet-demo` in headless Chromium (Debian's `chromium`): docs/figures/demo.png.

It serves the demo of a model on a free loopback port, draws a 7 on the sketchpad with the mouse, moves one capsule
dimension's slider, and captures the whole page, all through the Chrome DevTools Protocol over a pipe (no extra
Python package). Made with

    apt-get install -y chromium
    capsnet-train --dataset_name ../shared/datasets/mnist --max_train_samples 6000 --num_train_epochs 2 \\
        --output_dir /tmp/demo-model --report_to none
    python docs/figures/demo_screenshot.py --model_name_or_path /tmp/demo-model --output docs/figures/demo.png
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

from PIL import Image

from capsnet_hf.demo.inference import load_capsnet
from capsnet_hf.demo.launch import LOOPBACK, disable_gradio_analytics
from capsnet_hf.demo.layout import CANVAS_PIXELS, build_demo

# A 7 in the sketchpad's coordinates (0..1 of its canvas): the top bar, then the diagonal down to the foot.
SEVEN_STROKE = [(0.28, 0.25), (0.72, 0.25), (0.66, 0.40), (0.58, 0.58), (0.50, 0.78)]
MOVED_DIMENSION, MOVED_OFFSET = 3, 0.25
WAIT_S = 60


class DevTools:
    """Chromium's DevTools Protocol over `--remote-debugging-pipe`: JSON messages ending in NUL, commands written
    to the browser's fd 3 and answers read from its fd 4."""

    def __init__(self, chromium: str, width: int, height: int):
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # Above fd 4 (F_DUPFD picks >= 10), so that placing them at 3 and 4 in the child overwrites neither.
        commands_read, answers_write = (self._raise_fd(fd) for fd in (commands_read, answers_write))

        def as_fds_3_and_4() -> None:  # in the child, before exec: the pipe ends where Chromium expects them
            os.dup2(commands_read, 3)
            os.dup2(answers_write, 4)

        self.browser = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=as_fds_3_and_4,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(answers_write)
        self._next_id = 0
        self._buffer = b""
        self.session = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    @staticmethod
    def _raise_fd(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def send(self, method: str, **params: Any) -> dict:
        """Run one command (in the page's session once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:  # events and other answers are skipped
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"the page did not show {what} within {WAIT_S} s")

    def close(self) -> None:
        self.browser.terminate()
        self.browser.wait(timeout=WAIT_S)


def draw(tools: DevTools, stroke: list[tuple[float, float]], steps_per_segment: int = 12) -> None:
    """Pick the brush, as a person must first, and drag the mouse along `stroke` (fractions of the drawing square:
    CANVAS_PIXELS at the editor's zoom, centred in its canvas element)."""
    tools.wait_for("!!document.querySelector('#sketchpad canvas')", "the sketchpad")
    time.sleep(1)  # the editor's tool bar is wired up after its canvas appears
    tools.evaluate("document.querySelector('#sketchpad button[aria-label=Brush]').click()")
    left, top, width, height, zoom = tools.wait_for(
        "(() => { const canvases = [...document.querySelectorAll('#sketchpad canvas')];"
        " const c = canvases.sort((a, b) => b.clientWidth * b.clientHeight - a.clientWidth * a.clientHeight)[0];"
        " const zoom = [...document.querySelectorAll('#sketchpad span')].find(e => /^[0-9]+%$/.test(e.textContent));"
        " if (!c || !c.clientWidth) return null; const r = c.getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height, zoom ? parseFloat(zoom.textContent) / 100 : 1]; })()",
        "the sketchpad's canvas",
    )
    side = CANVAS_PIXELS * zoom
    corner_x, corner_y = left + (width - side) / 2, top + (height - side) / 2
    points = [(corner_x + x * side, corner_y + y * side) for x, y in stroke]
    mouse = tools.send
    mouse("Input.dispatchMouseEvent", type="mouseMoved", x=points[0][0], y=points[0][1])
    mouse("Input.dispatchMouseEvent", type="mousePressed", x=points[0][0], y=points[0][1], button="left", clickCount=1)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        for step in range(1, steps_per_segment + 1):
            t = step / steps_per_segment
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            mouse("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            time.sleep(0.01)
    mouse("Input.dispatchMouseEvent", type="mouseReleased", x=points[-1][0], y=points[-1][1], button="left")


def move_slider(tools: DevTools, dimension: int, value: float) -> None:
    """Set the slider of `dimension` as a person dragging it would (its range input, then an input event)."""
    tools.evaluate(
        "(() => { const label = [...document.querySelectorAll('label, span')]"
        f".find(e => e.textContent.trim() === 'dimension {dimension}');"
        " const block = label.closest('.block'); const input = block.querySelector('input[type=range]');"
        f" input.value = '{value}'; input.dispatchEvent(new Event('input', {{bubbles: true}}));"
        " input.dispatchEvent(new Event('change', {bubbles: true})); })()"
    )


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output", default="docs/figures/demo.png")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--colors", type=int, default=96, help="palette size of the written PNG (keeps it small)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install -y chromium")

    disable_gradio_analytics()
    model, processor = load_capsnet(args.model_name_or_path)
    demo = build_demo(model, processor)
    port = free_loopback_port()
    demo.launch(server_name=LOOPBACK, server_port=port, prevent_thread_lock=True, quiet=True)
    tools = DevTools(chromium, args.width, 900)
    try:
        tools.send("Page.enable")
        tools.send(
            "Emulation.setDeviceMetricsOverride", width=args.width, height=900, deviceScaleFactor=1, mobile=False
        )
        tools.send("Page.navigate", url=f"http://{LOOPBACK}:{port}/")
        draw(tools, SEVEN_STROKE)
        tools.wait_for("document.body.innerText.includes('Prediction:')", "a prediction")
        move_slider(tools, MOVED_DIMENSION, MOVED_OFFSET)
        time.sleep(3)  # the re-decoded image and the bar chart's drawing
        height = tools.evaluate("document.documentElement.scrollHeight")
        tools.send(
            "Emulation.setDeviceMetricsOverride", width=args.width, height=height, deviceScaleFactor=1, mobile=False
        )
        time.sleep(1)
        shot = tools.send("Page.captureScreenshot", format="png")["data"]
    finally:
        tools.close()
        demo.close()
    image = Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")
    image.quantize(colors=args.colors).save(args.output, optimize=True)
    print(f"{args.output}: {image.width}x{image.height}, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
    main()
