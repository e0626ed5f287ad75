"""Every checkpoint the project writes or ships loads in transformers' pipeline() for its task, and the
pipeline's preprocessing is the package's own (the same predictions as pege_hf's evaluation path)."""

import pytest
import torch
from transformers import pipeline

import pege_hf
from pege_hf.data import DEFAULT_DATASET, load_image_dataset, normalize, to_tensors
from pege_hf.sources import SHIPPED_MODELS_DIR


def _sample(n=24):
    data = load_image_dataset(DEFAULT_DATASET)
    rows = data.test.select(range(n))
    images, _ = to_tensors(rows, data.image_column, data.label_column)
    return [rows[i][data.image_column] for i in range(n)], images


def _agrees_with_pege_eval(model_dir):
    pil, uint8 = _sample()
    model = pege_hf.from_pretrained(model_dir).eval()
    with torch.no_grad():
        probs = model(pixel_values=normalize(uint8)).logits.softmax(-1)
    pipe = pipeline("image-classification", model=str(model_dir))
    out = pipe(pil, top_k=1)
    labels = [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    assert [o[0]["label"] for o in out] == labels
    assert [o[0]["score"] for o in out] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", ["resnet20-fp", "resnet20-pege-w2a2"])
def test_shipped_models_run_in_the_image_classification_pipeline_as_in_pege_eval(name):
    _agrees_with_pege_eval(SHIPPED_MODELS_DIR / name)


def test_a_trained_checkpoint_runs_in_the_pipeline(fp_run):
    assert (fp_run[0] / "preprocessor_config.json").is_file()
    _agrees_with_pege_eval(fp_run[0])
