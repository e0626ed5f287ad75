"""PEGE demo: one image through a full-precision model and its PEGE W4A4 / W3A3 / W2A2 checkpoints.

    python app/app.py                            # the shipped checkpoints, http://127.0.0.1:7860
    python app/app.py --model runs/quickstart --host 0.0.0.0 --port 8080
    pege demo ...                                # the same

The Gradio UI only: every number comes from demo_backend.py beside it (models loaded, and the quantized
ones exported to ONNX Runtime, once at start-up). API endpoints (gradio_client): /predict (image ->
full_precision, pege_w4a4, pege_w3a3, pege_w2a2 top-5 labels, agreement, model_comparison table,
raw_output probabilities) and /probability_plot (raw_output -> probabilities_per_class chart).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_backend.py, also when run as a file

import demo_backend as inference  # noqa: E402
import pege_hf  # noqa: E402,F401  (registers quant_method "pege")
from pege_hf.demo import add_arguments, check_arguments  # noqa: E402

TITLE = "PEGE: full precision vs 4-, 3- and 2-bit, side by side"
CSS = """
.pred-panel {min-height: 250px}
#agreement {font-size: 1.05em}
"""


class ImageInput(gr.Image):
    """gr.Image that hands the upload's path on undecoded, so that demo_backend.load_image checks
    it (empty file, not an image, too large) and the user gets a clear message instead of a failure
    inside gradio's own decoding. Drawn by the frontend as a plain Image."""

    is_template = True  # gradio then names the frontend component after the parent class: "image"

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - any decoding failure becomes a message for the user
            raise gr.Error(f"The upload is not a readable image: {err}", title="Not an image") from err


def build_demo(models: inference.ModelSet, examples: list[tuple[str, str]] | None = None,
               benchmark_file: str | os.PathLike | None = None) -> gr.Blocks:
    """The page for an already loaded ModelSet. `examples`: [(image path, caption)] for the gallery;
    `benchmark_file`: an accuracy benchmark for the accuracy plot instead of the models' metrics.json.
    Component labels are the API's output names (gradio_client's view_api)."""
    examples = list(examples or [])
    titles = models.titles
    accuracy_series, accuracy_source = inference.accuracy_by_bits(models, benchmark_file)

    def predict(image):
        try:
            pred = models.predict(image)
        except ValueError as err:
            raise gr.Error(str(err), title="Not a usable image", print_exception=False) from err
        table = pd.DataFrame(inference.summary_rows(models, pred), columns=inference.SUMMARY_HEADERS)
        return (*[pred.top_k(key, 5) for key in models.keys], inference.agreement_markdown(pred), table,
                pred.to_dict())

    def probability_plot(raw_output):
        if not raw_output:
            return None
        try:
            return inference.probability_figure(raw_output)
        except ValueError as err:
            raise gr.Error(str(err), title="Bad input", print_exception=False) from err

    def pick_example(evt: gr.SelectData):
        return examples[evt.index][0]

    with gr.Blocks(title="PEGE demo") as demo:
        gr.Markdown(f"# {TITLE}\n"
                    "Upload an image (any size: it is scaled to the models' 32 x 32 CIFAR-10 input) or pick a "
                    "CIFAR-10 test image. The same ResNet-20 answers in full precision and as PEGE "
                    "quantization-aware-trained 4-, 3- and 2-bit checkpoints (packed low-bit weights).")
        gr.Markdown(inference.runtime_markdown(models), elem_id="runtime")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                image = ImageInput(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                   height=260, elem_id="input-image")
                button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Column(scale=3):
                with gr.Row():
                    labels = [gr.Label(num_top_classes=5, label=titles[key], elem_id=f"pred-{key}",
                                       elem_classes=["pred-panel"]) for key in models.keys]
                agreement = gr.Markdown("Upload or pick an image to compare the models.", label="Agreement",
                                        elem_id="agreement")
                table = gr.Dataframe(value=pd.DataFrame(inference.summary_rows(models),
                                                        columns=inference.SUMMARY_HEADERS),
                                     label="Model comparison", interactive=False, wrap=True, elem_id="summary")
                gr.Markdown(inference.table_note(models), elem_id="table-note")
        gallery = gr.Gallery(value=examples, label="CIFAR-10 test images: click one to predict it",
                             columns=max(1, min(len(examples), 12)), rows=1, height=150, allow_preview=False,
                             interactive=False, elem_id="examples")
        with gr.Row():
            prob_plot = gr.Plot(label="Probabilities per class", elem_id="probability-plot")
            gr.Plot(value=inference.accuracy_figure(accuracy_series),
                    label=inference.accuracy_plot_label(accuracy_source), elem_id="accuracy-plot")
        with gr.Accordion("Raw output (JSON: probabilities, top-1, agreement, latency, runtimes)", open=False):
            probabilities = gr.JSON(label="Raw output", elem_id="probabilities")

        outputs = [*labels, agreement, table, probabilities]
        gr.on([button.click, image.upload], predict, inputs=image, outputs=outputs, api_name="predict",
              concurrency_id="models").then(
            probability_plot, inputs=probabilities, outputs=prob_plot, api_name="probability_plot")
        gallery.select(pick_example, None, image, api_name="pick_example", api_visibility="private").then(
            predict, inputs=image, outputs=outputs, api_name="predict_example", api_visibility="private",
            concurrency_id="models").then(
            probability_plot, inputs=probabilities, outputs=prob_plot, api_name="probability_plot_example",
            api_visibility="private")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, *, concurrency: int = 2,
           prevent_thread_lock: bool = False, allowed_paths: list[str] | None = None, quiet: bool = False):
    """Queue (at most `concurrency` requests computing at once; the rest wait their turn) and serve."""
    demo.queue(default_concurrency_limit=max(1, concurrency), max_size=512)
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock,
                       ssr_mode=False, show_error=False, quiet=quiet, allowed_paths=allowed_paths,
                       max_file_size="200mb", footer_links=["api", "settings"], css=CSS,
                       theme=gr.themes.Default())


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(prog="app.py", description=TITLE)
        add_arguments(parser)
        args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as err:
        print(f"pege demo: error: {err}", file=sys.stderr)
        return 2
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        sources = inference.resolve_sources(args.model, fp=args.fp, w4=args.w4, w3=args.w3, w2=args.w2)
        print("loading: " + ", ".join(f"{k}={v}" for k, v in sources.items()), flush=True)
        models = inference.ModelSet.load(sources, runtime=args.runtime, threads=args.threads)
        for note in models.runtime_notes:
            print(f"note: {note}", flush=True)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"pege demo: error: {err}", file=sys.stderr)
        return 2
    examples = inference.example_images(args.examples) if args.examples > 0 else []
    demo = build_demo(models, [(path, name) for path, name in examples], benchmark_file=args.benchmarks)
    allowed = sorted({str(Path(path).parent) for path, _ in examples})
    launch(demo, args.host, args.port, concurrency=args.concurrency, allowed_paths=allowed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
