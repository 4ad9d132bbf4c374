"""`capsnet-demo`: the interactive demo of a saved CapsNet in the browser, served on this machine only by default.

capsnet-demo --model_name_or_path capsnet-mnist    # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..cli import parse_bool, positive_int, run_command
from .inference import load_capsnet

LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnet-demo",
        description="Serve an interactive page for a saved CapsNet: draw or upload a digit, see the class capsule "
        "lengths, the routing map, the reconstruction and what each capsule dimension does.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="saved model folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--title", default="CapsNet demo", help="title of the page")
    parser.add_argument("--server_name", default=LOOPBACK, help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--server_port", type=positive_int, default=None, help="default: 7860, or the next free port after it"
    )
    parser.add_argument("--share", type=parse_bool, default=False, help="also serve through a public gradio.live link")
    return parser


def disable_gradio_analytics() -> None:
    """Unless the user asked for them, gradio's usage reports stay off: a local demo sends nothing elsewhere."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def serve(argv: Sequence[str] | None = None) -> None:
    """Parse `argv`, load the model (a one-line `UsageError` if it is missing, broken or not a CapsNet) and serve
    the demo until interrupted."""
    args = build_parser().parse_args(argv)
    model, processor = load_capsnet(args.model_name_or_path, args.trust_remote_code, args.device)
    disable_gradio_analytics()
    from .layout import build_demo  # gradio is imported only once the model is known to be good

    build_demo(model, processor, title=args.title).launch(
        server_name=args.server_name, server_port=args.server_port, share=args.share
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-demo`): 0 once the server stops, 2 with a one-line message on bad input."""
    return run_command("capsnet-demo", serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
