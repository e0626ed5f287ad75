"""pege_hf.hub: the model card, `pege push`, push_to_hub and transformers' model.push_to_hub, against the
local Hub stand-in of tests/hub_server.py (never huggingface.co).

The checkpoint is a tiny trained PEGE model: CIFAR ResNet-20, W2A2, two SGD steps on random data, saved
with save_pretrained, plus a metrics.json with the schema pege_hf.train writes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _detect_agent
from huggingface_hub.utils import _http as hf_http

import pege_hf
from pege_hf import PEGEConfig, cli, hub
from pege_hf.hf.cifar import cifar_resnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_write_token"
BASE_ID = "tester/resnet20-cifar10-fp"
ACCURACY, TOP5, LOSS = 0.4375, 0.8125, 1.875
COMMAND = ["/opt/venv/bin/pege", "train", "--model", BASE_ID, "--dataset", "uoft-cs/cifar10", "--estimator", "pege",
           "--w-bits", "2", "--a-bits", "2", "--epochs", "2", "--output-dir", "runs/resnet20-w2a2-pege"]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        s.tokens = {TOKEN}
        yield s


@pytest.fixture(scope="module", autouse=True)
def local_hub(server):
    """Online mode pointed at the local server. CI exports HF_HUB_OFFLINE=1; the server is on 127.0.0.1.
    The default endpoint is the local server too, so nothing can reach huggingface.co, and the agent
    registry that huggingface_hub fetches for its user-agent header is preset (no request for it)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            mp.delenv(var, raising=False)
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        mp.setattr(hf_constants, "ENDPOINT", server.url)
        mp.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
        yield


@pytest.fixture(autouse=True)
def healthy_server(server):
    server.fail_commits = 0
    yield
    server.fail_commits = 0


def _metrics(model, quant_config: PEGEConfig) -> dict:
    """The metrics.json a `pege train` QAT run writes (pege_hf/train.py: `result`)."""
    history = [{"epoch": e, "step": 2 * e, "train_loss": 2.3, "train_accuracy": 0.1, "accuracy": a, "top5": TOP5,
                "loss": LOSS, "lr": 0.01, "time_s": 3.0 * e} for e, a in ((1, 0.25), (2, ACCURACY))]
    return {
        "accuracy": ACCURACY, "top5": TOP5, "loss": LOSS, "best_accuracy": ACCURACY, "best_epoch": 2,
        "history": history, "wall_time_s": 6.5, "steps": 4, "base_model": BASE_ID, "arch": None,
        "dataset": "uoft-cs/cifar10", "quantization_config": quant_config.to_dict(), "epochs": 2, "batch_size": 8,
        "world_size": 1, "gradient_accumulation_steps": 1, "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4,
        "scheduler": "cosine", "warmup_steps": 0, "seed": 0, "total_steps": 4, "max_train": 16, "max_test": 16,
        "num_train": 16, "num_test": 16, "class_names": list(model.config.id2label.values()), "command": COMMAND,
        "resumed_from": None, "timing": {"data_s": 0.1, "loop_s": 6.0, "data_share": 0.02}, "device": "cpu",
        "mixed_precision": "no", "torch": torch.__version__, "pege_hf": pege_hf.__version__,
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained W2A2 PEGE checkpoint folder, and reference logits (input + output) in ref.pt."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = PEGEConfig(w_bits=2, a_bits=2)
    model = pege_hf.quantize(cifar_resnet(20), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    model.train()
    for step in range(2):
        pege_hf.set_progress(model, 0.5 * (step + 1))
        loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pege_hf.set_progress(model, 1.0)  # a saved checkpoint is the fully quantized model (r = 1)
    model.eval()
    ckpt = root / "resnet20-w2a2-pege"
    model.save_pretrained(ckpt)
    (ckpt / "metrics.json").write_text(json.dumps(_metrics(model, cfg), indent=2) + "\n")
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=probe).logits
    torch.save({"input": probe, "logits": logits}, root / "ref.pt")
    return ckpt


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _front_matter(readme: bytes | str) -> tuple[dict, str]:
    text = readme.decode() if isinstance(readme, bytes) else readme
    assert text.startswith("---\n"), text[:100]
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _accuracy_in_model_index(meta: dict) -> float:
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "image-classification"
    [metric] = [m for m in result["metrics"] if m["type"] == "accuracy"]
    return metric["value"]


def _subprocess_env(server, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                        "HF_OIDC_RESOURCE", "HF_TOKEN_PATH")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Background:
    """A subprocess started now and collected later, so that the few slow ones (each pays seconds of
    torch/transformers imports) run side by side with each other and with the in-process tests."""

    def __init__(self, args: list[str], env: dict, cwd: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.result: subprocess.CompletedProcess | None = None
        self.wall = None

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        if self.result is None:
            out, err = self.proc.communicate(timeout=timeout)
            self.wall = time.monotonic() - self.started
            self.result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# ----------------------------------------------------------------------------------------------- template


def test_the_template_is_the_packaged_one():
    assert hub.template_path() == hub.PACKAGED_TEMPLATE and hub.PACKAGED_TEMPLATE.is_file()


def test_wheel_ships_the_template():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch("model_card_template.md", pattern) for pattern in package_data["pege_hf"]), (
        "pyproject.toml [tool.setuptools.package-data] pege_hf must list model_card_template.md so the wheel "
        "ships the card template")


# ----------------------------------------------------------------------------------------------- push: success


def test_push_checkpoint_folder(checkpoint, server):
    before = _tree_hashes(checkpoint)
    url = hub.push_to_hub(checkpoint, "tester/resnet20-w2a2", token=TOKEN, endpoint=server.url)
    assert url == f"{server.url}/tester/resnet20-w2a2"
    files = server.files("tester/resnet20-w2a2")
    # every local file arrived byte for byte, plus the card; nothing local changed (no README.md written)
    assert set(files) == set(before) | {"README.md"}
    for name in before:
        assert files[name] == (checkpoint / name).read_bytes(), name
    assert _tree_hashes(checkpoint) == before
    assert all(r.authorization == f"Bearer {TOKEN}" for r in server.requests if "/api/" in r.path)
    assert server.unhandled == []

    meta, body = _front_matter(files["README.md"])
    assert meta["library_name"] == "pege-hf" and meta["license"] == "apache-2.0"
    assert {"quantization", "qat", "pege", "w2a2", "image-classification"} <= set(meta["tags"])
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "quantized"
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["pipeline_tag"] == "image-classification"
    assert _accuracy_in_model_index(meta) == ACCURACY
    # the body: what it is, accuracy, size, how to load, how it was trained, the paper
    assert "2-bit weights" in body and "2-bit activations" in body and "PEGE (Progressive" in body
    assert f"{100 * ACCURACY:.2f}%" in body and f"{100 * TOP5:.2f}%" in body
    assert "pip install pege-hf" in body and "import pege_hf" in body
    assert body.index("import pege_hf") < body.index("from_pretrained(")
    assert 'pege_hf.from_pretrained("tester/resnet20-w2a2")' in body
    assert "pege train --model tester/resnet20-cifar10-fp --dataset uoft-cs/cifar10 --estimator pege" in body
    assert "@article{" in body and "2509.00097" in body and "Progressive Element-wise Gradient Estimation" in body
    size = (checkpoint / "model.safetensors").stat().st_size
    assert f"{size:,}" in body


def test_card_sizes_are_computed_from_the_checkpoint(checkpoint, tmp_path):
    """The float size is 4 bytes x (parameters + buffers) of the dequantized model; written to README.md
    when write=True."""
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    card = hub.render_model_card(folder)
    assert (folder / "README.md").read_text() == str(card)
    model = pege_hf.from_pretrained(folder).dequantize()
    elements = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    text = str(card)
    assert f"{4 * elements:,}" in text and f"{elements - sum(b.numel() for b in model.buffers()):,} parameters" in text
    ratio = 4 * elements / (folder / "model.safetensors").stat().st_size
    assert f"{ratio:.1f}x smaller" in text and ratio > 5
    assert "`conv1`, `classifier`" in text  # the layers kept in full precision, found from the model
    # the default activation mask says what it drew
    assert "masks: progressive (weights), auto (hashed counter masks under compiled kernels" in text


def test_push_a_model_object(checkpoint, server, tmp_path):
    """A PreTrainedModel is saved to a temporary folder first. Loaded from a folder with metrics.json and
    unchanged, it carries that folder's measured accuracy; trained further, its accuracy is not measured."""
    model = pege_hf.from_pretrained(checkpoint)
    hub.push_to_hub(model, "tester/from-model", token=TOKEN, endpoint=server.url)
    files = server.files("tester/from-model")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    meta, _ = _front_matter(files["README.md"])
    assert _accuracy_in_model_index(meta) == ACCURACY

    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    hub.push_to_hub(model, "tester/from-model-changed", token=TOKEN, endpoint=server.url)
    meta, body = _front_matter(server.files("tester/from-model-changed")["README.md"])
    assert "model-index" not in meta and "accuracy of this checkpoint was not measured" in body


# ----------------------------------------------------------------------------------------------- push: failures


def test_no_token_fails_before_any_request(checkpoint, server, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    server.reset_log()
    with pytest.raises(hub.PushError, match="hf auth login") as err:
        hub.push_to_hub(checkpoint, "tester/no-token", endpoint=server.url)
    assert "HF_TOKEN" in str(err.value) and "--token" in str(err.value)
    assert server.requests == []


def test_rejected_token(checkpoint, server):
    with pytest.raises(hub.PushError, match="401") as err:
        hub.push_to_hub(checkpoint, "tester/wrong-token", token="hf_not_this_one", endpoint=server.url)
    assert "hf auth login" in str(err.value) and "tester/wrong-token" not in server.repos


def test_server_failure_mid_upload_then_push_again(checkpoint, server, monkeypatch):
    # huggingface_hub retries a failed commit 5 times, sleeping >= 1 s each time: skip the sleeps
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    before = _tree_hashes(checkpoint)
    server.reset_log()
    server.fail_commits = 100  # every commit fails, however often huggingface_hub retries (it retries 500s)
    with pytest.raises(hub.PushError, match="500") as err:
        hub.push_to_hub(checkpoint, "tester/flaky", token=TOKEN, endpoint=server.url)
    assert "unchanged" in str(err.value)
    # with hf_xet installed (the default on x86-64/arm64) upload_folder retries a failed commit 5 times;
    # without it, it goes through create_commit, which does not retry commits
    assert len(server.commit_requests()) in (6, 1)
    assert server.files("tester/flaky") == {}  # the repo exists, nothing was committed
    assert _tree_hashes(checkpoint) == before

    server.fail_commits = 0
    hub.push_to_hub(checkpoint, "tester/flaky", token=TOKEN, endpoint=server.url)
    assert set(server.files("tester/flaky")) == set(before) | {"README.md"}
    assert _tree_hashes(checkpoint) == before

    # a single transient 500 is retried by huggingface_hub (hf_xet's upload pipeline) and the push succeeds
    if importlib.util.find_spec("hf_xet") is not None:
        server.reset_log()
        server.fail_commits = 1
        hub.push_to_hub(checkpoint, "tester/flaky-once", token=TOKEN, endpoint=server.url)
        assert len(server.commit_requests()) == 2 and "README.md" in server.files("tester/flaky-once")


def test_folder_without_metrics_says_not_measured(checkpoint, server, tmp_path):
    folder = tmp_path / "no-metrics"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(checkpoint / name, folder / name)
    hub.push_to_hub(folder, "tester/no-metrics", token=TOKEN, endpoint=server.url)
    files = server.files("tester/no-metrics")
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    meta, body = _front_matter(files["README.md"])
    assert "model-index" not in meta and "metrics" not in meta
    assert "accuracy of this checkpoint was not measured" in body
    assert "%" not in body.split("## Accuracy")[1].split("## Size")[0]  # no accuracy number of any kind
    assert {"quantization", "qat", "pege", "w2a2"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # unknown without a training record


def test_not_a_checkpoint(server, tmp_path):
    server.reset_log()
    (tmp_path / "weights.bin").write_bytes(b"x")
    for bad in (tmp_path, tmp_path / "missing", tmp_path / "weights.bin"):
        with pytest.raises(FileNotFoundError, match="config.json|does not exist|not a checkpoint folder"):
            hub.push_to_hub(bad, "tester/bad", token=TOKEN, endpoint=server.url)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.render_model_card(tmp_path)
    assert server.requests == []
    args = cli.build_parser("push").parse_args(["push", str(tmp_path), "tester/bad", "--token", TOKEN])
    assert hub.main(args) == 2  # bad input: exit 2 with one line, as in every command


def test_card_links_must_be_hub_ids(checkpoint, server, tmp_path):
    """--base-model / --dataset become Hub links and metadata: a local path is refused before any request."""
    server.reset_log()
    (tmp_path / "fp").mkdir()
    for kwargs, flag in (({"base_model": str(tmp_path / "fp")}, "--base-model"), ({"dataset": "../data/cifar10"}, "--dataset")):
        with pytest.raises(ValueError, match=f"^{flag} .* is not a Hub id"):
            hub.push_to_hub(checkpoint, "tester/links", token=TOKEN, endpoint=server.url, **kwargs)
    assert server.requests == []


# ----------------------------------------------------------------------------------------------- cards of training runs


def test_card_of_a_local_training_run(checkpoint, tmp_path):
    """`pege train` records local paths: the card names them without leaking the path, links CIFAR-10, shows
    the float base's own measured accuracy, and puts no local path in the metadata. The base's card is a
    full-precision card."""
    fp = tmp_path / "runs" / "resnet20-fp"
    torch.manual_seed(0)
    cifar_resnet(20).save_pretrained(fp)
    (fp / "metrics.json").write_text(json.dumps({
        "accuracy": 0.9125, "top5": 0.99, "loss": 0.3, "num_test": 16, "max_test": 16, "seed": 0,
        "dataset": "/data/cifar10", "base_model": None, "arch": "resnet20",
        "command": ["/x/bin/pege", "train", "--arch", "resnet20"]}))
    qat = shutil.copytree(checkpoint, tmp_path / "runs" / "resnet20-w2a2-pege")
    metrics = json.loads((qat / "metrics.json").read_text())
    metrics.update(base_model=str(fp), dataset="/data/cifar10",
                   command=["/x/lib/python3.11/site-packages/pege_hf/train.py", "--model", str(fp)])
    (qat / "metrics.json").write_text(json.dumps(metrics))

    meta, body = _front_matter(str(hub.render_model_card(qat, write=False)))
    assert "base_model" not in meta and meta["datasets"] == ["uoft-cs/cifar10"]
    assert "a local float checkpoint (`resnet20-fp`)" in body and str(tmp_path) not in body.split("## How to use")[0]
    assert "| Float base model | 91.25%" in body and "the same test set as above" in body
    assert f"python -m pege_hf.train --model {fp}" in body
    metrics["seed"] = 1  # another random test subset: the card says the rows are not comparable
    (qat / "metrics.json").write_text(json.dumps(metrics))
    assert "a different test set than above" in str(hub.render_model_card(qat, write=False))

    meta, body = _front_matter(str(hub.render_model_card(fp, write=False)))
    assert "quantization" not in meta["tags"] and "full-precision" in meta["tags"]
    assert _accuracy_in_model_index(meta) == 0.9125 and "trained from scratch" in body
    meta, _ = _front_matter(str(hub.render_model_card(qat, base_model=BASE_ID, dataset="uoft-cs/cifar10",
                                                      write=False)))
    assert meta["base_model"] == BASE_ID  # the user names the Hub id of a local base


# ----------------------------------------------------------------------------------------------- subprocesses


FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch, pege_hf
    ref_file, folder, repo_id = sys.argv[1:4]
    ref = torch.load(ref_file)
    out = {}
    for name, source in (("folder", folder), ("hub_id", repo_id)):
        model = pege_hf.from_pretrained(source).eval()
        with torch.no_grad():
            logits = model(pixel_values=ref["input"]).logits
        out[name] = {"equal": bool(torch.equal(logits, ref["logits"])),
                     "max_diff": float((logits - ref["logits"]).abs().max()),
                     "quant_method": model.config.quantization_config.quant_method}
    # transformers' own push_to_hub of a PEGE model (HF_ENDPOINT was read at import)
    model = pege_hf.from_pretrained(folder)
    out["hooked"] = "_upload_modified_files" in model.__dict__
    model.push_to_hub("tester/via-transformers")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module", autouse=True)
def _start_background_first(request):
    """When a selected test needs the subprocesses, start them before the first test of the module, so that
    they run alongside the in-process tests."""
    if any("background" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("background")


@pytest.fixture(scope="module")
def background(local_hub, checkpoint, tmp_path_factory):
    """The subprocesses of this module, started together:
    - cli: `pege push` (endpoint and token from HF_ENDPOINT / HF_TOKEN);
    - offline: `pege push` with HF_HUB_OFFLINE=1, against a server of its own (which must see nothing);
    - fresh: a fresh Python process that loads the pushed files (written out of the server's storage) and
      the repo by its id through the Hub API, compares the logits with the trained model's, and pushes
      the loaded model with transformers' model.push_to_hub.
    They talk to servers of their own, so that the in-process tests see only their own requests."""
    tmp = tmp_path_factory.mktemp("background")
    server = HubServer().start()
    server.tokens = {TOKEN}
    hub.push_to_hub(checkpoint, "tester/fresh", token=TOKEN, endpoint=server.url)
    downloaded = server.write_repo("tester/fresh", tmp / "downloaded")
    offline_server = HubServer().start()
    env = _subprocess_env(server, tmp / "home", HF_TOKEN=TOKEN)
    jobs = {
        "cli": Background(["-m", "pege_hf.cli", "push", str(checkpoint), "tester/resnet20-w2a2-cli", "--private"],
                          env, ROOT),
        "offline": Background(["-m", "pege_hf.cli", "push", str(checkpoint), "tester/offline"],
                              _subprocess_env(offline_server, tmp / "home-offline", HF_TOKEN=TOKEN,
                                              HF_HUB_OFFLINE="1"), ROOT),
        "fresh": Background(["-c", FRESH_PROCESS, str(checkpoint.parent / "ref.pt"), str(downloaded),
                             "tester/fresh"], env, tmp),
    }
    jobs.update(server=server, offline_server=offline_server)
    yield jobs
    for job in jobs.values():
        if isinstance(job, Background):
            job.kill()
    offline_server.stop()
    server.stop()


def test_push_with_the_cli(background, checkpoint):
    server = background["server"]
    proc = background["cli"].wait()
    assert proc.returncode == 0, proc.stderr
    assert f"{server.url}/tester/resnet20-w2a2-cli" in proc.stdout
    files = server.files("tester/resnet20-w2a2-cli")
    assert server.repos["tester/resnet20-w2a2-cli"].private
    assert set(files) == set(_tree_hashes(checkpoint)) | {"README.md"}
    for name, digest in _tree_hashes(checkpoint).items():
        assert hashlib.sha256(files[name]).hexdigest() == digest, name
    meta, _ = _front_matter(files["README.md"])
    assert _accuracy_in_model_index(meta) == ACCURACY


@pytest.fixture(scope="module")
def fresh_process(background):
    proc = background["fresh"].wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_pushed_files(fresh_process):
    for name in ("folder", "hub_id"):
        assert fresh_process[name]["quant_method"] == "pege"
        assert fresh_process[name]["equal"], (name, fresh_process[name]["max_diff"])


def test_transformers_push_to_hub_uploads_the_pege_card(fresh_process, background):
    """model.push_to_hub (transformers' own method) uploads the PEGE card, for a model set up by the PEGE
    quantizer either way: loaded with from_pretrained (in the fresh process) or quantized with pege_hf.quantize."""
    quantized = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=2, a_bits=2))
    hooked = isinstance(quantized.__dict__.get("_upload_modified_files"), hub._PEGECardOnPush)
    assert hooked, "pege_hf.quantize must call pege_hf.hub.attach_model_card(model) (pege_hf/hf/quantizer.py)"
    assert fresh_process["hooked"], ("the PEGE quantizer's _process_model_after_weight_loading must call "
                                     "pege_hf.hub.attach_model_card(model) (pege_hf/hf/quantizer.py)")
    meta, body = _front_matter(background["server"].files("tester/via-transformers")["README.md"])
    assert meta["library_name"] == "pege-hf" and "w2a2" in meta["tags"]
    assert _accuracy_in_model_index(meta) == ACCURACY  # same weights as the folder it was loaded from
    assert 'from_pretrained("tester/via-transformers")' in body
    assert background["server"].unhandled == []  # the test hub answered everything the clients asked


def test_offline_mode_fails_at_once(background, checkpoint, server, monkeypatch):
    server.reset_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(hub.PushError, match="HF_HUB_OFFLINE"):
        hub.push_to_hub(checkpoint, "tester/offline", token=TOKEN, endpoint=server.url)
    assert time.monotonic() - started < 2
    assert server.requests == []
    # the command line, in a process that imported huggingface_hub with HF_HUB_OFFLINE=1: one line, exit 1,
    # no request, no hang (the process's time is mostly its imports)
    proc = background["offline"].wait(timeout=120)
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert background["offline_server"].requests == []
