"""`pege demo`: the Gradio page comparing a float model with its PEGE 4/3/2-bit checkpoints.

    pege demo                                   # the shipped ResNet-20 checkpoints, http://127.0.0.1:7860
    pege demo --model runs/quickstart           # a folder holding the four checkpoints
    pege demo --fp runs/fp --w2 runs/w2a2 --w3 runs/w3a3 --w4 runs/w4a4 --host 0.0.0.0 --port 8080
    pege demo --w2 user/resnet20-pege-w2a2      # Hub ids work too (when online)

The page and its backend live in app/ of the repository (above the library, with the `demo` extra:
``pip install 'pege-hf[demo]'``); this command runs app/app.py of a source checkout, and says how to get
one when it is missing. ``python app/app.py`` takes the same options.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

APP_PATH = Path(__file__).resolve().parents[1] / "app" / "app.py"
DEFAULT_HOST = "127.0.0.1"
HOW_TO_GET_THE_APP = ("`pege demo` runs the Gradio app of a source checkout of pege-hf: git clone the repository, "
                      "`pip install -e '.[demo]'` there, then run `pege demo` (or `python app/app.py`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (default: the shipped checkpoints in pege_hf/assets/models)")
    models.add_argument("--model", metavar="DIR", default=None,
                        help="a parent folder holding the float checkpoint and its PEGE W4A4/W3A3/W2A2 checkpoints "
                             "(one subfolder each, e.g. resnet20-fp, resnet20-pege-w2a2, ...)")
    for key, title in (("fp", "full-precision"), ("w4", "PEGE W4A4"), ("w3", "PEGE W3A3"), ("w2", "PEGE W2A2")):
        models.add_argument(f"--{key}", metavar="DIR_OR_HUB_ID", default=None,
                            help=f"the {title} checkpoint (a folder or a Hub id); overrides --model")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST,
                        help=f"interface to listen on (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST}; "
                             "0.0.0.0 listens on every interface)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: $GRADIO_SERVER_PORT, else the first free one from 7860)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="requests computed at the same time (default 2: one per CPU core of a small machine)")
    parser.add_argument("--runtime", choices=("auto", "onnxruntime", "pytorch"), default="auto",
                        help="where the quantized models run: onnxruntime (their exported integer ONNX graphs, "
                             "exported once and cached; needs the deploy extra), pytorch (pege_hf's fake-quantized "
                             "models), or auto (default: onnxruntime when installed, else pytorch, and the page says so)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads per request (default 1: one image is too small "
                             "to split; 0 leaves their defaults)")
    parser.add_argument("--examples", type=int, default=12, help="CIFAR-10 test images in the gallery (default 12)")
    parser.add_argument("--benchmarks", metavar="JSON", default=None,
                        help="accuracy benchmark results (benchmarks/accuracy.json) for the accuracy-vs-bits plot "
                             "instead of the default: the loaded models' own metrics.json, as in the table")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the option, before any model is loaded."""
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be from 1 to 65535; got {args.port}")
    for name, low in (("concurrency", 1), ("threads", 0), ("examples", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}; got {getattr(args, name)}")
    if args.benchmarks is not None and not Path(args.benchmarks).is_file():
        raise FileNotFoundError(f"--benchmarks {args.benchmarks!r} does not exist")
    if args.runtime == "onnxruntime":
        from .deploy import onnxruntime_missing

        missing = onnxruntime_missing()
        if missing:
            raise ValueError(f"--runtime onnxruntime: {missing}")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    if not APP_PATH.is_file():
        print(f"pege demo: error: the Gradio app is not installed ({APP_PATH} does not exist). {HOW_TO_GET_THE_APP}",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("gradio") is None:
        print("pege demo: error: gradio is not installed: pip install 'pege-hf[demo]'", file=sys.stderr)
        return 2
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
    return load_app_module().main(args=args)


def load_app_module(path: Path | None = None):
    """Import app/app.py (not a package) as the module `pege_demo_app`."""
    path = Path(path) if path is not None else APP_PATH
    if "pege_demo_app" in sys.modules and getattr(sys.modules["pege_demo_app"], "__file__", None) == str(path):
        return sys.modules["pege_demo_app"]
    spec = importlib.util.spec_from_file_location("pege_demo_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pege_demo_app"] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pege demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from .cli import run_command

    sys.exit(run_command("demo", main, parser.parse_args()))
