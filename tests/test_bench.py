"""Benchmarks: the size benchmark measures the real files; the speed benchmark's bookkeeping."""

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks.pege_bench import matrix, tools
from benchmarks.pege_bench.__main__ import main as research_main
from conftest import ROOT
from pege_hf import bench, cli
from pege_hf.hf.cifar import cifar_resnet
from pege_hf.quant import grid


def test_size_benchmark_reports_real_bytes(tmp_path):
    result = bench.bench_size(lambda: cifar_resnet(20), bits_list=(2, 4), work_dir=tmp_path)
    assert result["float_bytes"] > 1_000_000
    w2, w4 = result["packed"]["W2A2"], result["packed"]["W4A4"]
    assert w2["ratio_vs_float"] == w2["bytes"] / result["float_bytes"] <= 0.1
    assert w2["bytes"] < w4["bytes"] and w4["ratio_vs_float"] <= 1 / 6
    assert "| W2A2 |" in bench.size_table(result)


def test_saved_activation_bytes_counts_distinct_storages():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU())
    x = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    # activations: the Linear's input (4x10), the ReLU's output (4x20), the loss's log-softmax (4x20);
    # the parameters (20x10 + 20 floats) are not activations and must not be counted
    got = bench.saved_activation_bytes(model, (x, y))
    activations = (4 * 10 + 4 * 20 + 4 * 20) * 4
    assert activations <= got < activations + 220 * 4


def test_speed_benchmark_structure():
    result = bench.bench_speed(lambda: cifar_resnet(20), batch_size=4, steps=2, warmup=1)
    variants = result["variants"]
    assert set(variants) == {"fp", "ste", "pege", "pege_counter", "pege_r1"}
    assert variants["fp"]["ratio_vs_fp"] == 1.0
    for v in variants.values():
        assert len(v["step_times_s"]) == 2 and v["median_step_s"] > 0
    # a quant layer keeps no float copy of its quantized input; PEGE's ramp adds a 1-byte mask per element
    assert variants["ste"]["memory_ratio_vs_fp"] <= variants["pege"]["memory_ratio_vs_fp"] <= 1.3
    assert variants["pege"]["saved_activation_mb"] > variants["pege_r1"]["saved_activation_mb"]
    # eager kernels get a counter mask materialised (as bool, the same bytes as a Bernoulli mask)
    assert variants["pege_counter"]["saved_activation_mb"] == variants["pege"]["saved_activation_mb"]


def test_speed_cli_channels_last_writes_its_own_files(tmp_path, capsys):
    """`pege bench speed --channels-last`: the models run channels-last, the files say so and sit beside the
    contiguous ones instead of replacing them."""
    from pege_hf import cli

    threads = torch.get_num_threads()
    assert cli.main(["bench", "speed", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--channels-last",
                     "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    result = json.loads((tmp_path / "speed_channels_last.json").read_text())
    assert result["channels_last"] is True and result["threads"] == 1
    assert set(result["variants"]) == {"fp", "ste", "pege", "pege_counter", "pege_r1"}
    assert "quantizer kernels eager, channels-last weights;" in (tmp_path / "speed_channels_last.md").read_text()
    assert (tmp_path / "speed_channels_last.png").is_file() and not (tmp_path / "speed.json").exists()


def test_speed_benchmark_on_a_transformer_writes_ratios_of_its_own_medians(tmp_path, monkeypatch):
    """`--model distilbert`'s task (tiny sizes): the LLM recipe on every quantized variant, torchao's row exactly when
    torchao is importable, and ratios in the JSON recomputable from the step times it stores."""
    tiny = dict(seq_len=8, dim=32, layers=1, heads=2, hidden=64, vocab=100)
    task = bench.token_task(2, 4, 0.3, **tiny)
    cfg = task["variants"]["pege"][0]
    assert (cfg.w_bits, cfg.group_size, cfg.a_bits, cfg.a_quantizer) == (4, 32, 8, "dynamic_token")
    assert ("torchao" in task["variants"]) == (bench.torchao_version() is not None)
    result = bench.bench_speed(task=task, bits=4, steps=2, warmup=1, device="cpu")
    bench.write_result(result, bench.speed_table(result), tmp_path, "speed_distilbert")
    saved = json.loads((tmp_path / "speed_distilbert.json").read_text())
    assert saved["model"] == "distilbert" and saved["seq_len"] == 8 and saved["batch_size"] == 2
    variants = saved["variants"]
    peers = {"torchao"} if "torchao" in task["variants"] else set()
    assert set(variants) == {"fp", "ste", "pege", "pege_counter", "pege_r1"} | peers
    fp = statistics.median(variants["fp"]["step_times_s"])
    for name, v in variants.items():
        assert len(v["step_times_s"]) == 2
        assert v["median_step_s"] == statistics.median(v["step_times_s"])
        assert v["ratio_vs_fp"] == pytest.approx(v["median_step_s"] / fp, rel=1e-12)
        assert f"| {name} | {v['median_step_s']:.4f} | {v['ratio_vs_fp']:.2f}x |" in (tmp_path / "speed_distilbert.md").read_text()
    # quantized variants really are quantized: the fake-quantizers add saved tensors to the backward pass
    assert variants["ste"]["memory_ratio_vs_fp"] > 1

    monkeypatch.setattr(bench, "torchao_version", lambda: None)  # without torchao: no peer row, and the table says so
    task = bench.token_task(2, 4, 0.3, **tiny)
    assert "torchao" not in task["variants"] and task["peers"] == {"torchao": None}
    result = {**saved, "peers": task["peers"], "variants": {k: v for k, v in variants.items() if k != "torchao"}}
    assert "Peer `torchao` not importable in this run" in bench.speed_table(result)


def test_speed_cli_rejects_bad_input_before_running(capsys):
    with pytest.raises(SystemExit) as exit_info:  # an unknown model: argparse's one-line error, exit 2
        cli.main(["bench", "speed", "--model", "bert-large"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pege bench speed: error: argument --model: invalid choice: 'bert-large'")
    assert cli.main(["bench", "speed", "--model", "distilbert", "--bits", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("pege bench: error: --bits must be 4 or 2 with --model distilbert "
                                               "(W{bits} group-32 weights); got 3")
    assert cli.main(["bench", "speed", "--model", "distilbert", "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1; got 0" in capsys.readouterr().err
    assert cli.main(["bench", "speed", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "pege bench: error: --threads must be >= 1; got 0"
    # options the chosen model cannot use are errors, not silently dropped
    assert cli.main(["bench", "speed", "--model", "distilbert", "--channels-last"]) == 2
    assert capsys.readouterr().err.strip() == ("pege bench: error: --channels-last lays out 4-D (convolution) weights; "
                                               "--model distilbert has none")
    assert cli.main(["bench", "speed", "--seq-len", "64"]) == 2
    assert "--seq-len is the token count of --model distilbert; --model resnet20 takes images" in capsys.readouterr().err
    assert cli.main(["bench", "speed", "--warmup", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "pege bench: error: --warmup must be >= 0; got -1"
    assert cli.main(["bench", "speed", "--device", "tpu9"]) == 2
    assert "--device 'tpu9' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "speed", "--device", "cuda"]) == 2
        assert "--device cuda: not available on this machine" in capsys.readouterr().err


def test_speed_plot_writes_a_png(tmp_path):
    result = json.loads((ROOT / "benchmarks" / "speed.json").read_text())
    bench.speed_plot(result, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_plots_one_panel_per_bit_width(tmp_path):
    """Seed-0 QAT curves grouped by bit width, one colour per estimator, ablations dotted, FP as a line."""
    runs = {}
    for bits in (2, 4):
        for est in ("ste", "pege"):
            runs[f"w{bits}-{est}-s0"] = {"estimator": est, "bits": bits, "seed": 0, "variant": "main",
                                         "epoch_accuracy": [0.7, 0.8 + bits / 100]}
    runs["w2-pege-s1"] = {**runs["w2-pege-s0"], "seed": 1}
    runs["w2-pege-lambda0-s0"] = {**runs["w2-pege-s0"], "variant": "lambda0", "epoch_accuracy": [0.75, 0.79]}
    runs["w2-pege-linear-s0"] = {**runs["w2-pege-s0"], "variant": "linear", "epoch_accuracy": [0.74, 0.78]}
    runs["fp"] = {"estimator": "fp", "bits": None, "seed": 0, "variant": "main", "epoch_accuracy": [0.5, 0.85]}
    result = {"runs": runs, "fp_accuracy": 0.85, "summary": [
        {"estimator": "pege", "variant": "main", "bits": 2, "mean": 0.82, "spread": 0.01}]}
    plt = bench.pyplot()
    fig = matrix.accuracy_over_training_figure(plt, result)
    assert [ax.get_title() for ax in fig.axes] == ["W2A2", "W4A4"]
    w2 = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(w2) == {"PEGE", "PEGE (lambda0)", "PEGE (linear)", "STE", "FP (final)"}  # no seed 1, no FP curve
    assert w2["PEGE"].get_color() != w2["STE"].get_color()
    styles = {label: w2[label].get_linestyle() for label in ("PEGE", "PEGE (lambda0)", "PEGE (linear)")}
    assert styles["PEGE"] == "-" and len(set(styles.values())) == 3  # each ablation told apart, none solid
    legend = [t.get_text() for t in fig.legends[0].get_texts()]  # one legend for all panels, each label once
    assert sorted(legend) == sorted({line.get_label() for ax in fig.axes for line in ax.get_lines()})
    assert list(w2["PEGE"].get_ydata()) == pytest.approx([70.0, 82.0])
    assert list(w2["FP (final)"].get_ydata()) == [85.0, 85.0]
    plt.close(fig)
    matrix.accuracy_plots(result, tmp_path)
    for name in ("accuracy_vs_bits.png", "accuracy_over_training.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matrix.accuracy_over_training_figure(plt, {**result, "runs": {"fp": runs["fp"]}}) is None


def test_accuracy_vs_bits_draws_estimators_and_ablations_run_at_several_widths():
    """Main rows solid per estimator with their half-range as error bars; an ablation at two or more widths is a
    curve in its estimator's colour and its own style (the same as in the over-training figure); one at one width
    stays a table row."""
    row = lambda est, b, mean, variant="main", spread=0.0: {  # noqa: E731
        "estimator": est, "bits": b, "variant": variant, "mean": mean, "spread": spread}
    summary = [row("ste", 2, 0.84, spread=0.002), row("ste", 4, 0.87), row("pege", 2, 0.83), row("pege", 4, 0.86),
               row("pege", 2, 0.845, "instant"), row("pege", 4, 0.872, "instant"), row("pege", 2, 0.84, "lambda0")]
    runs = {f"{r['estimator']}-{r['variant']}-{r['bits']}": {**r, "seed": 0, "epoch_accuracy": [r["mean"]]}
            for r in summary}
    result = {"runs": runs, "fp_accuracy": 0.88, "summary": summary}
    plt = bench.pyplot()
    fig = matrix.accuracy_vs_bits_figure(plt, result)
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}  # errorbar: label on the container
    assert set(lines) == {"STE", "PEGE", "PEGE (instant)"}
    assert [line.get_label() for line in fig.axes[0].get_lines() if line.get_label() == "FP"] == ["FP"]
    assert list(lines["PEGE (instant)"].get_xdata()) == [2, 4]
    assert list(lines["PEGE (instant)"].get_ydata()) == pytest.approx([84.5, 87.2])
    assert lines["PEGE (instant)"].get_color() == lines["PEGE"].get_color() != lines["STE"].get_color()
    assert lines["PEGE"].get_linestyle() == "-" and lines["PEGE (instant)"].get_linestyle() != "-"
    over = matrix.accuracy_over_training_figure(plt, result)
    w2 = {line.get_label(): line for line in over.axes[0].get_lines()}
    assert w2["PEGE (instant)"].get_linestyle() == lines["PEGE (instant)"].get_linestyle()
    caps = [c for c in fig.axes[0].collections]  # the STE error bar spans its half-range: 84 +- 0.2
    segs = [seg for c in caps for seg in c.get_segments() if seg[0][0] == 2 and seg[0][1] != seg[1][1]]
    assert any(sorted([seg[0][1], seg[1][1]]) == pytest.approx([83.8, 84.2]) for seg in segs)
    plt.close(fig), plt.close(over)


def test_init_benchmark_times_and_scores_each_rule():
    result = bench.bench_init(shape=(32, 200), bits=2, repeats=2)
    rules = result["rules"]
    assert set(rules) == {"lsq", "mse", "mse-grid80"}
    for r in rules.values():
        assert len(r["times_s"]) == 2 and r["median_s"] == pytest.approx(sum(r["times_s"]) / 2)
        assert r["ratio_vs_lsq"] == pytest.approx(r["median_s"] / rules["lsq"]["median_s"])
    # the search beats LSQ's closed form and is at least as good as the grid it replaced (finer steps)
    assert rules["mse"]["quantization_mse"] < rules["lsq"]["quantization_mse"]
    assert rules["mse"]["quantization_mse"] <= rules["mse-grid80"]["quantization_mse"] * 1.001
    assert "| mse-grid80 |" in bench.init_table(result)
    with pytest.raises(ValueError, match=r"--bits must be in \[2, 8\], got 9"):
        bench.bench_init(shape=(4, 4), bits=9)
    with pytest.raises(ValueError, match="--shape must be two positive sizes, got 0 4"):
        bench.bench_init(shape=(0, 4))


def test_accuracy_plan_protocol():
    plan = matrix.accuracy_plan(data="D", fp_epochs=60, qat_epochs=15)
    names = [r.name for r in plan]
    assert names[0] == "resnet20-fp" and len(names) == len(set(names))
    qat = [r for r in plan if r.estimator != "fp"]
    assert all(r.depends == "resnet20-fp" for r in qat)
    # identical recipe across estimators: the settings differ only in the estimator and PEGE's own
    # tuned settings (and ablation settings)
    def recipe(r):
        config = {k: v for k, v in r.config.items() if k != "estimator"}
        if r.estimator == "pege":
            assert matrix.PEGE_TUNED["config"].items() <= config.items()
            config = {k: v for k, v in config.items() if k not in matrix.PEGE_TUNED["config"]}
        return json.dumps([config, r.training], sort_keys=True)
    for b in (2, 3, 4):
        main = [r for r in qat if r.bits == b and r.variant == "main" and r.seed == 0]
        assert {r.estimator for r in main} == {"ste", "ewgs", "pege"}
        assert len({recipe(r) for r in main}) == 1
    # the tuned shared recipe reaches every QAT run, not the FP one
    shared = matrix.QAT_RECIPE
    # the chosen recipe's settings are those of one recipe `pege bench tune` tried (which also spells out the
    # defaults of the time)
    assert any(all(tried[k].items() >= shared[k].items() for k in shared) for tried in matrix.TUNING_RECIPES.values())
    assert all(shared["config"].items() <= r.config.items() and shared["training"].items() <= r.training.items()
               for r in qat)
    assert plan[0].config is None and not shared["training"].items() & plan[0].training.items()
    assert matrix.train_argv(plan[0])[:2] == ["--estimator", "none"]  # FP: trained in full precision
    assert len([r for r in qat if r.bits == 2 and r.variant == "main"]) == 9  # 3 seeds at W2A2
    assert {r.variant for r in qat if r.variant != "main"} == {"lambda0", "linear", "instant"}
    instant = [r for r in qat if r.variant == "instant"]
    assert len([r for r in qat if r.bits == 3 and r.variant == "main"]) == 6  # 2 seeds at the other widths
    assert [(r.estimator, r.bits, r.seed) for r in instant] == [("pege", 2, 0), ("pege", 2, 1), ("pege", 2, 2), ("pege", 3, 0),
                                                                 ("pege", 3, 1), ("pege", 4, 0), ("pege", 4, 1)]
    assert all(r.config["curriculum"] == "instant" for r in instant)
    # what the report needs first comes first: every estimator at W2A2, then the shipped PEGE widths
    assert [(r.estimator, r.bits, r.seed) for r in plan[1:6]] == [
        ("pege", 2, 0), ("ste", 2, 0), ("ewgs", 2, 0), ("pege", 4, 0), ("pege", 3, 0)]
    # then the other seeds of the pair the target compares (STE, PEGE at W2A2) before EWGS's
    assert [(r.estimator, r.bits, r.seed) for r in plan[6:12]] == [
        ("ste", 2, 1), ("pege", 2, 1), ("ste", 2, 2), ("pege", 2, 2), ("ewgs", 2, 1), ("ewgs", 2, 2)]
    # at the other widths too: STE and PEGE of every seed before EWGS, ablations last
    assert [(r.estimator, r.bits, r.seed) for r in plan[12:22]] == [
        ("ste", 3, 0), ("ste", 4, 0), ("ste", 3, 1), ("pege", 3, 1), ("ste", 4, 1), ("pege", 4, 1),
        ("ewgs", 3, 0), ("ewgs", 4, 0), ("ewgs", 3, 1), ("ewgs", 4, 1)]
    assert all(r.variant != "main" for r in plan[22:])


def _parsed(run) -> dict:
    """What `pege train` makes of a run's command line (the launch argv), as a dict of its options."""
    return vars(cli.build_parser("train").parse_args(["train", *matrix.train_argv(run)]))


def test_accuracy_plan_pege_recipe_reaches_only_pege_and_ablations_override_it():
    plan = matrix.accuracy_plan(data="D", pege={"config": {"discretization_lambda": 0.5, "alpha": 3.0}})
    for r in plan[1:]:  # alpha shapes the log curriculum: the linear-curriculum ablation does not read it
        assert ("alpha" in r.config) == (r.estimator == "pege" and r.config.get("curriculum", "log") == "log")
    lambda0 = _parsed(next(r for r in plan if r.variant == "lambda0"))
    assert lambda0["discretization_lambda"] == 0.0 and lambda0["alpha"] == 3.0  # the ablation's own setting wins
    # a recipe given replaces the tuned one, for every QAT run alike
    plan = matrix.accuracy_plan(data="D", qat={"config": {"scale_init": "lsq"}, "training": {"quantizer_lr_scale": 0.5}})
    assert {(_parsed(r)["scale_init"], _parsed(r)["quantizer_lr_scale"]) for r in plan[1:]} == {("lsq", 0.5)}
    assert _parsed(plan[0])["quantizer_lr_scale"] == 1.0  # FP: untouched (the default)
    # the runner's --train-arg (speed flags, say) reaches every run, the FP one too
    plan = matrix.accuracy_plan(data="D", extra=matrix.recipe_from_argv(["--compile-kernels", "--max-train", "256"]))
    assert all(_parsed(r)["compile_kernels"] and _parsed(r)["max_train"] == 256 for r in plan)


def test_tuning_plan_changes_one_setting_on_a_fixed_validation_split():
    plan = matrix.tuning_plan(model="fp", data="train.parquet", epochs=3)
    parsed = {r.name: _parsed(r) for r in plan}
    assert plan[0].name == "w2a2-ste" and plan[1].name == "w2a2-pege-default"
    assert len(parsed) == len(plan) == 2 * len(matrix.TUNING_RECIPES) + len(matrix.TUNING_VARIANTS) - 1
    default = parsed["w2a2-pege-default"]
    for r in plan:
        args = parsed[r.name]
        # the carved validation split depends on the dataset and the seed: identical for every run
        assert args["seed"] == 0 and args["dataset"] == "train.parquet" and args["test_split"] is None
        changed = {k for k in args if args[k] != default[k]}
        own = matrix.merge(matrix.TUNING_RECIPES[matrix._tuning_parts(r.variant)[1]],
                           {"config": matrix._variant_config(matrix._tuning_parts(r.variant)[0])})
        # only the run's own settings differ (plus the estimator for STE), each one stated; a setting equal to
        # today's default (the tuned recipe became the default) differs in name only
        assert changed <= {*own["config"], *own["training"], "estimator"}
        stated = {k: v for k, v in own["config"].items() if k in r.config or r.estimator == "pege"}  # STE: no lambda
        assert stated.items() <= r.config.items() and own["training"].items() <= r.training.items()
    # every recipe is tried for STE and for PEGE alike; the STE run leaves out what only PEGE reads (its lambda),
    # which `pege train` refuses for STE
    from pege_hf.config import ESTIMATOR_FIELDS

    pege_only = set(ESTIMATOR_FIELDS["pege"])
    for recipe in matrix.TUNING_RECIPES:
        tail = f"-{recipe}" if recipe else ""
        ste, pege = parsed[f"w2a2-ste{tail}"], parsed[f"w2a2-pege-default{tail}"]
        assert all(ste[k] is None for k in pege_only)
        assert {k: v for k, v in ste.items() if k not in pege_only} | {"estimator": "pege"} == \
            {k: v for k, v in pege.items() if k not in pege_only}


@pytest.mark.parametrize("recipe", ["", "mse", "mse-qlr1"])
def test_tuning_plan_tries_pege_settings_under_the_chosen_recipe(recipe):
    plan = matrix.tuning_plan(model="fp", data="train.parquet", recipe=recipe)
    tail = f"-{recipe}" if recipe else ""
    base = _parsed(next(r for r in plan if r.name == f"w2a2-pege-default{tail}"))
    variants = [r for r in plan if r.variant.split("-")[0] not in ("ste", "default")]
    assert len(variants) == len(matrix.TUNING_VARIANTS) - 1
    chosen = matrix.merge(matrix.TUNING_RECIPES[recipe])
    for r in variants:
        assert r.name.endswith(f"-{r.variant}") and matrix._tuning_parts(r.variant)[1] == recipe
        args = _parsed(r)
        assert args["scale_init"] == chosen["config"].get("scale_init")  # None: PEGEConfig's default
        assert args["quantizer_lr_scale"] == chosen["training"].get("quantizer_lr_scale", 1.0)  # 1: the default
        # only the variant's own setting differs from PEGE's defaults under that recipe
        name = matrix._tuning_parts(r.variant)[0]
        assert {k for k in args if args[k] != base[k]} == set(matrix.TUNING_VARIANTS[name])
    # combinations: the settings of every part, named by the parts
    plan = matrix.tuning_plan(model="fp", data="train.parquet", recipe=recipe, combine=("lambda1+amask-progressive",))
    combo = plan[-1]
    assert combo.name == f"w2a2-pege-lambda1+amask-progressive{tail}"
    args = _parsed(combo)
    assert args["discretization_lambda"] == 1.0 and args["a_mask"] == "progressive"
    assert len({k for k in args if args[k] != base[k]}) == 2
    setting = matrix._tuning_setting(combo.variant).split()  # the recipe's settings with the parts' over them
    assert setting[setting.index("--discretization-lambda") + 1] == "1" and setting.count("--discretization-lambda") == 1
    assert setting[setting.index("--a-mask") + 1] == "progressive"
    for bad in ("lambda1", "lambda1+fast", "default+lambda1"):
        with pytest.raises(ValueError, match=f"--combine '{re.escape(bad)}'"):
            matrix.tuning_plan(model="fp", data="train.parquet", combine=(bad,))
    # a dash inside a setting's name is not read as a recipe
    assert matrix._tuning_parts("mask-error") == ("mask-error", "")
    assert matrix._tuning_parts("mask-error-qlr1") == ("mask-error", "qlr1")
    with pytest.raises(ValueError, match="unknown tuning recipe 'fast'"):
        matrix.tuning_plan(model="fp", data="train.parquet", recipe="fast")


def test_tuning_report_compares_each_pege_run_with_ste_under_the_same_recipe(tmp_path):
    plan = matrix.tuning_plan(model="fp", data="D", recipe="mse")
    accuracy = {"w2a2-ste": 0.45, "w2a2-pege-default": 0.74, "w2a2-ste-mse": 0.83, "w2a2-pege-default-mse": 0.8234,
                "w2a2-pege-lambda1-mse": 0.8401}
    for name, acc in accuracy.items():
        (tmp_path / "tuning" / name).mkdir(parents=True)
        history = [{"epoch": e, "accuracy": acc - 0.1 * (3 - e)} for e in (1, 2, 3)]
        (tmp_path / "tuning" / name / "metrics.json").write_text(json.dumps({"accuracy": acc, "history": history}))
    result = matrix.write_tuning_report(plan, tmp_path / "tuning", tmp_path)
    assert result["ste_accuracy_by_recipe"] == {"": 0.45, "mse": 0.83}
    assert set(result["missing"]) == {r.name for r in plan} - set(accuracy)
    rows = [line.split(" | ") for line in (tmp_path / "tuning.md").read_text().splitlines() if line.startswith("| w2a2")]
    assert [r[0].strip("| ") for r in rows] == sorted(accuracy, key=lambda n: -accuracy[n])  # best first
    by_name = {r[0].strip("| "): r for r in rows}
    assert by_name["w2a2-pege-lambda1-mse"][1:] == ["--scale-init mse --discretization-lambda 1 --quantizer-lr-scale 0.1", "84.01", "+1.01 |"]
    assert by_name["w2a2-pege-default"][3] == "+29.00 |" and by_name["w2a2-ste-mse"][3] == "- |"
    assert result["runs"]["w2a2-pege-lambda1-mse"]["epoch_accuracy"] == pytest.approx([0.6401, 0.7401, 0.8401])
    assert (tmp_path / "tuning.png").stat().st_size > 0


class _FakeProcess:
    """Stands in for a training child: 'finishes' (writes the files a finished run has) when polled,
    or fails, or diverges (writes diverged.json and fails, as pege_hf.train does)."""

    def __init__(self, run_dir, outcome, log):
        self.run_dir, self.outcome, self.log = run_dir, outcome, log

    def poll(self):
        if self.outcome == "ok":
            (self.run_dir / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "history": []}))
            (self.run_dir / "config.json").write_text("{}")
        if self.outcome == "diverge":
            (self.run_dir / "diverged.json").write_text(json.dumps({"step": 7}))
        self.log.append(("end", self.run_dir.name))
        return 0 if self.outcome == "ok" else 1


def _fake_scheduler(monkeypatch, tmp_path, fail=(), diverge=()):
    log = []

    def start(run, runs_dir, threads=None):
        log.append(("start", run.name, threads))
        (runs_dir / run.name).mkdir(parents=True, exist_ok=True)
        outcome = "fail" if run.name in fail else "diverge" if run.name in diverge else "ok"
        return _FakeProcess(runs_dir / run.name, outcome, log)

    monkeypatch.setattr(matrix, "start_run", start)
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    (tmp_path / "runs").mkdir(parents=True)
    return log


def test_run_plan_waits_for_fp_then_shares_the_cores(monkeypatch, tmp_path):
    log = _fake_scheduler(monkeypatch, tmp_path)
    plan = matrix.accuracy_plan(data="D", bits=(2,), estimators=("ste", "pege"), seeds_low_bits=1, ablations=False)
    matrix.run_plan(plan, tmp_path / "runs", jobs=2)
    starts = [e for e in log if e[0] == "start"]
    # FP alone with every core; nothing starts before it ends; then two runs side by side, 2 cores each
    assert starts[0] == ("start", "resnet20-fp", 4) and log[1] == ("end", "resnet20-fp")
    assert starts[1:] == [("start", "resnet20-w2a2-pege-s0", 2), ("start", "resnet20-w2a2-ste-s0", 2)]
    assert log.index(starts[2]) < log.index(("end", "resnet20-w2a2-pege-s0"))  # overlapping
    log.clear()
    matrix.run_plan(plan, tmp_path / "runs", jobs=2)
    assert log == []  # finished runs are never redone


def test_run_plan_leaves_a_run_another_process_is_training_alone(monkeypatch, tmp_path, capsys):
    from pege_hf.training.state import lock_output_dir

    log = _fake_scheduler(monkeypatch, tmp_path)
    plan = matrix.tuning_plan(model="fp", data="D", recipes={"": {}}, variants={"default": {}, "sum": {}})
    held = lock_output_dir(tmp_path / "runs" / "w2a2-pege-default")
    matrix.run_plan(plan, tmp_path / "runs", jobs=2)
    assert [e[1] for e in log if e[0] == "start"] == ["w2a2-ste", "w2a2-pege-sum"]
    assert "skip w2a2-pege-default: another process is training it" in capsys.readouterr().out
    held.close()
    matrix.run_plan(plan, tmp_path / "runs", jobs=2)
    assert [e[1] for e in log if e[0] == "start"][-1] == "w2a2-pege-default"


def test_a_diverged_run_is_a_result_the_runner_goes_on_and_never_redoes(monkeypatch, tmp_path, capsys):
    log = _fake_scheduler(monkeypatch, tmp_path, diverge={"w2a2-pege-sum"})
    plan = matrix.tuning_plan(model="fp", data="D", recipes={"": {}}, variants={"default": {}, "sum": {"discretization_reduction": "sum"}, "alpha3": {}})
    matrix.run_plan(plan, tmp_path / "runs", jobs=1)
    assert [e[1] for e in log if e[0] == "start"] == ["w2a2-ste", "w2a2-pege-default", "w2a2-pege-sum",
                                                       "w2a2-pege-alpha3"]
    assert "w2a2-pege-sum diverged at step 7" in capsys.readouterr().out
    log.clear()
    matrix.run_plan(plan, tmp_path / "runs", jobs=1)
    assert log == []
    result = matrix.write_tuning_report(plan, tmp_path / "runs", tmp_path)
    assert result["diverged_at_step"] == {"w2a2-pege-sum": 7} and result["missing"] == []
    assert "| w2a2-pege-sum | --scale-init lsq --discretization-lambda 0.0001 --discretization-reduction sum --quantizer-lr-scale 0.1 | diverged (loss NaN at step 7) | - |" in (
        tmp_path / "tuning.md").read_text()
    accuracy = matrix.collect_accuracy(plan, tmp_path / "runs")
    assert accuracy["diverged_at_step"] == {"w2a2-pege-sum": 7} and "w2a2-pege-sum (loss NaN at step 7)" in (
        matrix.accuracy_table(accuracy))


def test_run_plan_stops_starting_after_a_failure_and_respects_max_runs(monkeypatch, tmp_path, capsys):
    log = _fake_scheduler(monkeypatch, tmp_path, fail={"resnet20-fp"})
    plan = matrix.accuracy_plan(data="D", bits=(2,), estimators=("ste",), seeds_low_bits=1, ablations=False)
    matrix.run_plan(plan, tmp_path / "runs", jobs=2)
    assert [e[1] for e in log if e[0] == "start"] == ["resnet20-fp"]
    out = capsys.readouterr().out
    assert "resnet20-fp exited with code 1" in out and "skip resnet20-w2a2-ste-s0: resnet20-fp has not finished" in out
    log = _fake_scheduler(monkeypatch, tmp_path / "again")
    matrix.run_plan(plan, tmp_path / "again" / "runs", jobs=1, max_runs=1)
    assert [e[1] for e in log if e[0] == "start"] == ["resnet20-fp"]


def test_target_checks_answer_the_issue_targets_from_the_finished_runs():
    def run(est, b, seed, acc, variant="main"):
        return {"estimator": est, "bits": b, "seed": seed, "variant": variant, "accuracy": acc}

    runs = {str(i): r for i, r in enumerate([
        run("pege", 2, 0, 0.80), run("pege", 2, 1, 0.84), run("pege", 2, 2, 0.85),  # seed 2: no STE partner
        run("ste", 2, 0, 0.79), run("ste", 2, 1, 0.82), run("pege", 2, 0, 0.99, "instant"),
        run("pege", 4, 0, 0.88), run("pege", 3, 0, 0.874)])}
    summary = [{"estimator": "pege", "bits": 2, "variant": "main", "mean": 0.83},
               {"estimator": "ste", "bits": 2, "variant": "main", "mean": 0.805},
               {"estimator": "pege", "bits": 2, "variant": "instant", "mean": 0.99},
               {"estimator": "pege", "bits": 4, "variant": "main", "mean": 0.88},
               {"estimator": "pege", "bits": 3, "variant": "main", "mean": 0.874}]
    result = {"fp_accuracy": 0.88, "runs": runs, "summary": summary}
    checks = {c["target"]: (c["measured"], c["met"]) for c in matrix.target_checks(result)}
    assert checks == {
        "FP >= 89.00": ("88.00", False),
        "PEGE W4A4 >= FP": ("88.00 (FP +0.00)", True),  # equal is met
        "PEGE W3A3 >= FP -0.50": ("87.40 (FP -0.60)", False),
        "PEGE W2A2 >= FP -1.50": ("83.00 (FP -5.00)", False),
        # 83.0 - 80.5 = +2.5 >= 1.0; per seed only where both ran, the instant ablation left out
        "PEGE W2A2 >= STE + 1.00": ("PEGE 83.00, STE 80.50: +2.50 (per seed: s0 +1.00, s1 +2.00)", True)}
    table = matrix.accuracy_table({**result, "summary": [], "diverged_at_step": {}, "missing": []})
    assert "| target | measured | met |\n|---|---|---|\n| FP >= 89.00 | 88.00 | no |\n" in table
    assert matrix.target_checks({**result, "fp_accuracy": None}) == []  # nothing to compare against yet
    no_ste = [r for r in summary if r["estimator"] != "ste"]
    assert [c["target"] for c in matrix.target_checks({**result, "summary": no_ste})][-1] == "PEGE W2A2 >= FP -1.50"


def test_bn_reestimation_column_and_runner_step(monkeypatch, tmp_path):
    """Finished runs get one BN re-estimation each (never redone, the run's files untouched, unfinished runs
    skipped); the table shows the re-estimated mean over seeds beside the plain one, "-" until every seed has it."""
    import pege_hf.evaluate

    plan = matrix.accuracy_plan(data="D", bits=(2,), estimators=("ste",), seeds_low_bits=3, ablations=False)
    runs = tmp_path / "runs"
    finals = {"resnet20-fp": 0.88, "resnet20-w2a2-ste-s0": 0.80, "resnet20-w2a2-ste-s1": 0.82}
    for name, acc in finals.items():
        (runs / name).mkdir(parents=True)
        epochs = 60 if name == "resnet20-fp" else 15
        (runs / name / "metrics.json").write_text(json.dumps({"accuracy": acc, "epochs": epochs}))
        (runs / name / "config.json").write_text("{}")
    calls = []

    def fake_eval(model, dataset, *, reestimate_bn):
        calls.append((Path(model).name, dataset, reestimate_bn))
        return {"accuracy": finals[Path(model).name] + 0.01, "bn_reestimation": {"batches": reestimate_bn}}

    monkeypatch.setattr(pege_hf.evaluate, "evaluate_checkpoint", fake_eval)
    (runs / "resnet20-w2a2-ste-s1" / matrix.BN_FILE).write_text(json.dumps({"accuracy": 0.85}))  # done before
    before = {p: p.read_bytes() for p in runs.glob("*/metrics.json")}
    assert matrix.reestimate_finished_runs(plan, runs, 7) == ["resnet20-fp", "resnet20-w2a2-ste-s0"]
    assert calls == [("resnet20-fp", "D", 7), ("resnet20-w2a2-ste-s0", "D", 7)]  # s2 has not finished
    assert before == {p: p.read_bytes() for p in runs.glob("*/metrics.json")}
    saved = json.loads((runs / "resnet20-w2a2-ste-s0" / matrix.BN_FILE).read_text())
    assert saved["accuracy"] == pytest.approx(0.81) and saved["accuracy_before"] == 0.80
    assert saved["command"].endswith("resnet20-w2a2-ste-s0 --dataset D --reestimate-bn 7 --json")
    assert matrix.reestimate_finished_runs(plan, runs, 7) == [] and len(calls) == 2

    row = matrix.collect_accuracy(plan, runs)["summary"][0]
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(0.81) and row["mean_bn"] == pytest.approx(0.83)
    assert row["spread_bn"] == pytest.approx(0.02) and row["delta_bn_vs_fp"] == pytest.approx(0.83 - 0.88)
    table = matrix.accuracy_table(matrix.collect_accuracy(plan, runs))
    assert "| W2A2 | ste | main | 2 | 81.00 +- 1.00 | -7.00 | 83.00 +- 2.00 | -5.00 |" in table
    assert "QAT (15 epochs) from one FP model" in table and "Full precision (60 epochs): 88.00" in table
    (runs / "resnet20-w2a2-ste-s0" / matrix.BN_FILE).unlink()  # one seed without it: no re-estimated mean
    row = matrix.collect_accuracy(plan, runs)["summary"][0]
    assert row["mean_bn"] is None and row["delta_bn_vs_fp"] is None
    assert "| W2A2 | ste | main | 2 | 81.00 +- 1.00 | -7.00 | - | - |" in matrix.accuracy_table(
        matrix.collect_accuracy(plan, runs))


@pytest.mark.slow
def test_accuracy_runner_is_resumable(tmp_path):
    """A tiny matrix runs end to end; a second invocation redoes nothing."""
    from pege_hf.data import DEFAULT_DATASET

    runs = tmp_path / "runs"
    plan = matrix.accuracy_plan(data=DEFAULT_DATASET, fp_epochs=1, qat_epochs=1, bits=(2,), estimators=("ste", "pege"),
                               seeds_low_bits=1, ablations=False, runs_dir=runs,
                               extra={"training": {"max_train": 256, "max_test": 128, "batch_size": 64}})
    result = matrix.run_accuracy(plan, runs, tmp_path, jobs=2)  # FP alone, then the two QAT runs side by side
    assert not result["missing"] and set(result["runs"]) == {r.name for r in plan}
    fp = json.loads((runs / "resnet20-fp" / "metrics.json").read_text())
    assert result["fp_accuracy"] == fp["accuracy"]
    assert (tmp_path / "accuracy.md").is_file() and (tmp_path / "accuracy_vs_bits.png").is_file()
    assert all(0 <= r["accuracy_bn"] <= 1 for r in result["runs"].values())  # each run re-estimated once
    stamps = {p: p.stat().st_mtime_ns for p in [*runs.glob("*/metrics.json"), *runs.glob(f"*/{matrix.BN_FILE}")]}
    matrix.run_accuracy(plan, runs, tmp_path)
    assert stamps == {p: p.stat().st_mtime_ns for p in [*runs.glob("*/metrics.json"), *runs.glob(f"*/{matrix.BN_FILE}")]}

    # shipping: FP and PEGE W2A2 copied byte for byte with a card quoting the run's own accuracy; W3/W4 not run
    dest = tmp_path / "models"
    assert tools.ship_models(runs, dest) == ["resnet20-fp", "resnet20-pege-w2a2"]
    for name, run in (("resnet20-fp", "resnet20-fp"), ("resnet20-pege-w2a2", "resnet20-w2a2-pege-s0")):
        for file in tools.SHIPPED_FILES:
            assert (dest / name / file).read_bytes() == (runs / run / file).read_bytes()
        accuracy = json.loads((runs / run / "metrics.json").read_text())["accuracy"]
        card = (dest / name / "README.md").read_text()
        assert f"{100 * accuracy:.2f}%" in card
        assert f"# {name}\n" in card and f'from_pretrained("{dest / name}")' in card and ".tmp" not in card
    assert sorted(p.name for p in dest.iterdir()) == ["resnet20-fp", "resnet20-pege-w2a2"]


def test_latency_benchmark_times_the_four_shipped_models():
    result = tools.bench_latency(n=3)
    assert set(result["per_model_median_ms"]) == {"fp", "w4", "w3", "w2"}
    assert result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert "median" in tools.latency_table(result)


def test_docs_link_only_files_that_exist():
    """The README and docs quote results by linking the files benchmarks wrote (never copies of them):
    every relative link resolves, and nothing points outside the repository."""
    import re

    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert path.exists(), f"{doc.relative_to(ROOT)} links a missing file: {target}"


def test_readme_is_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"20\d\d-\d\d-\d\d|\bsession \d|\bcommit [0-9a-f]{7}", text)  # no diary
    assert "../" not in text  # no path outside the repository
    first_block = text.split("```")[1]  # the README starts with the two commands that set everything up
    assert "pege train" in first_block and "pytest" in first_block and text.startswith("# pege-hf\n\n```")


def _all_plans() -> list:
    return [*matrix.accuracy_plan(data="D", extra=matrix.recipe_from_argv(["--compile-kernels", "--max-test", "64"])),
            *matrix.tuning_plan(model="fp", data="D", recipe="mse-qlr1", combine=("lambda0.1+instant",))]


def test_plan_round_trips_through_the_command_line():
    """plan -> `pege train` argv (built at launch) -> what `pege train` parses = the plan's config and options."""
    from pege_hf.training.args import build_quant_config, given_config_options

    for run in _all_plans():
        args = cli.build_parser("train").parse_args(["train", *matrix.train_argv(run)])
        config = build_quant_config(args)
        if run.config is None:
            assert config is None and args.estimator == "none"
            continue
        assert given_config_options(args) == run.config  # exactly the fields the plan states, nothing else
        assert {k: v for k, v in config.to_dict().items() if k in run.config} == run.config
        assert {k: getattr(args, k) for k in run.training} == run.training
        assert matrix.recipe_from_argv(matrix.train_argv(run))["config"] == run.config
    # values that need care on a command line: exact floats, booleans, lists, None
    run = matrix.Run("r", {"estimator": "pege", "w_bits": 2, "a_bits": None, "discretization_lambda": 0.123456789,
                           "skip_head": False, "modules_to_not_convert": ["fc", "conv1"]}, {"model": "m", "lr": 1e-05})
    args = cli.build_parser("train").parse_args(["train", *matrix.train_argv(run)])
    assert given_config_options(args) == run.config and args.lr == 1e-05


def _record(run_dir, run, *, finished, **changed):
    """The settings record a real `pege train` leaves in run_dir: metrics.json (finished) or the config line
    metrics.jsonl starts with (in progress), as pege_hf.training writes them."""
    from pege_hf.training.tracking import JSONLTracker, flat_hparams

    args = cli.build_parser("train").parse_args(["train", *matrix.train_argv(run)])
    for k, v in changed.items():
        setattr(args, k, v)
    from pege_hf.training.args import build_quant_config
    from pege_hf.training.loop import run_info

    info = run_info(args, build_quant_config(args), type("Data", (), {"image_column": "img", "label_column": "label"}),
                    1, 0, 100)
    run_dir.mkdir(parents=True, exist_ok=True)
    if finished:
        (run_dir / "metrics.json").write_text(json.dumps({"accuracy": 0.5, **info, "command": ["whatever"]}))
    else:
        JSONLTracker(run_dir / "metrics.jsonl").store_init_configuration(flat_hparams(info))


@pytest.mark.parametrize("finished", [False, True])
def test_runner_refuses_a_run_folder_trained_with_other_settings(tmp_path, finished):
    """`--epochs 15` must not reuse (or continue) a 3-epoch run that sits in the same folder; the settings come
    from what the run recorded (never from its command line)."""
    short = matrix.tuning_plan(model="m", data="d", epochs=3)[:1]
    longer = matrix.tuning_plan(model="m", data="d", epochs=15)[:1]
    _record(tmp_path / short[0].name, short[0], finished=finished)
    matrix.check_run_settings(short, tmp_path)  # the same settings: continued / reused
    with pytest.raises(ValueError, match=r"w2a2-ste was trained with other settings than this plan asks for "
                                         r"\(epochs: 3 -> 15\); pass another --out"):
        matrix.run_plan(longer, tmp_path)
    # a changed PEGEConfig field, spelled as the config names it
    other = matrix.tuning_plan(model="m", data="d", epochs=3, recipes={"": {"config": {"scale_init": "mse"}}})[:1]
    with pytest.raises(ValueError, match=r"\(quantization_config/scale_init: lsq -> mse\)"):
        matrix.check_run_settings(other, tmp_path)
    # options that change speed, not results, are not settings
    matrix.check_run_settings(matrix.tuning_plan(model="m", data="d", epochs=3,
                                                 extra=matrix.recipe_from_argv(["--compile-kernels"]))[:1], tmp_path)
    # a setting neither `pege train` nor PEGEConfig accepts is refused before anything runs
    bad = matrix.tuning_plan(model="m", data="d", recipes={"": {"config": {"w_bits": 9}}})[:1]
    with pytest.raises(ValueError, match="PEGEConfig.w_bits must be an integer from 2 to 8; got 9"):
        matrix.run_plan(bad, tmp_path / "fresh")
    _record(tmp_path / "b" / short[0].name, short[0], finished=finished, lr=0.05)
    with pytest.raises(ValueError, match=r"\(lr: 0.05 -> 0.01\)"):
        matrix.check_run_settings(short, tmp_path / "b")


COMMITTED_PLANS = {  # committed run folders -> the plan (and runner options) that trained them
    "benchmarks/fp200/runs": lambda runs: matrix.accuracy_plan(
        data="../shared/data/cifar10", fp_epochs=200, runs_dir=runs,
        extra=matrix.recipe_from_argv(["--compile-kernels", "--channels-last"])),
    "benchmarks/runs": lambda runs: matrix.accuracy_plan(data="../shared/data/cifar10", fp_epochs=60, runs_dir=runs),
    "benchmarks/tuning": lambda runs: matrix.tuning_plan(
        model="benchmarks/runs/resnet20-fp", data="../shared/data/cifar10/train.parquet", recipe="mse-qlr1",
        combine=("lambda0.1+amask-progressive",)),
    "benchmarks/tune15/tuning": lambda runs: matrix.tuning_plan(
        model="benchmarks/runs/resnet20-fp", data="../shared/data/cifar10/train.parquet", epochs=15, recipe="mse-qlr1",
        combine=("lambda0.1+instant", "lambda0.1+pull-ramp")),
}


@pytest.mark.parametrize("folder", sorted(COMMITTED_PLANS))
def test_committed_runs_are_finished_and_match_their_plan(folder):
    """The runs trained before plans held config (their metrics.json written by older pege train versions, some
    with fewer settings recorded) are still recognised: finished ones are never redone, none is refused."""
    runs = ROOT / folder
    plan = COMMITTED_PLANS[folder](Path(folder))
    on_disk = {p.parent.name for p in runs.glob("*/metrics.json")}
    assert on_disk and on_disk <= {r.name for r in plan}
    assert {r.name for r in plan if matrix.run_is_finished(runs / r.name)} == on_disk
    matrix.check_run_settings(plan, runs)
    compared = [matrix.planned_settings(r).keys() & matrix.recorded_settings(runs / r.name).keys()
                for r in plan if r.name in on_disk]
    assert min(len(c) for c in compared) >= 5  # model or arch, dataset, epochs, lr, estimator/bits ...
    # and a plan that differs is refused on the same files
    longer = COMMITTED_PLANS[folder](Path(folder))
    changed = [matrix.Run(r.name, r.config, {**r.training, "epochs": r.training["epochs"] + 1}) for r in longer]
    with pytest.raises(ValueError, match=r"epochs: (\d+) -> (?!\1)\d+"):
        matrix.check_run_settings(changed, runs)


def test_select_runs_keeps_plan_order_and_names_unknown_runs(capsys):
    plan = matrix.tuning_plan(model="fp", data="train.parquet", recipe="mse-qlr1")
    chosen = matrix.select_runs(plan, ["w2a2-pege-ramp0.25-mse-qlr1", "w2a2-ste-mse-qlr1"])
    assert [r.name for r in chosen] == ["w2a2-ste-mse-qlr1", "w2a2-pege-ramp0.25-mse-qlr1"]
    assert matrix.select_runs(plan, []) == plan
    with pytest.raises(ValueError, match="not runs of this plan: w2a2-pege-nope; its runs are: w2a2-ste, "):
        matrix.select_runs(plan, ["w2a2-ste", "w2a2-pege-nope"])
    # the CLI says so in one line before it looks for the FP model
    assert research_main(["tune", "--only", "w2a2-nope", "--model", "missing-fp", "--out", "unused"]) == 2
    assert "pege bench: error: not runs of this plan: w2a2-nope" in capsys.readouterr().err


def test_tune_only_reports_the_selected_runs(tmp_path):
    """`--only` narrows the report too: a 15-epoch comparison of four runs is not listed as 21 unfinished."""
    chosen = ["w2a2-ste-mse-qlr1", "w2a2-pege-lambda0.1-mse-qlr1"]
    assert research_main(["tune", "--recipe", "mse-qlr1", "--report-only", "--only", *chosen,
                     "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tuning.json").read_text())
    assert report["missing"] == chosen
    assert f"Not finished yet (2): {', '.join(chosen)}" in (tmp_path / "tuning.md").read_text()
    assert research_main(["tune", "--recipe", "mse-qlr1", "--report-only", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "tuning.json").read_text())["missing"]) > len(chosen)


# ---------------------------------------------------------------------------------------------
# grid: where latent weights sit relative to their quantization grid
# ---------------------------------------------------------------------------------------------
def test_grid_position_against_hand_values():
    s = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.25, -0.4, 1.0, 3.5], [-2.1, 0.5, 1.2, -3.0, 0.05]], dtype=torch.float64)  # w / s
    got = grid.grid_position(v * s, s, qmin=-2.0, qmax=1.0)
    inside = [0.0, 0.25, -0.4, 1.0, 0.5, 0.05]  # 3.5, -2.1, 1.2 and -3.0 lie outside [-2, 1]
    assert got["n"] == 10 and got["in_range"] == len(inside)
    assert got["distance_sum"] == pytest.approx(0 + 0.25 + 0.4 + 0 + 0.5 + 0.05, abs=1e-12)
    hist = got["histogram"]
    assert len(hist) == grid.GRID_BINS and sum(hist) == len(inside)
    bin_of = lambda off: min(int((off + 0.5) * grid.GRID_BINS), grid.GRID_BINS - 1)  # noqa: E731
    # offsets v - round(v): 0, .25, -.4, 0, .5 (round half to even: 0.5 -> 0), .05
    for off in (0.0, 0.25, -0.4, 0.5, 0.05):
        assert hist[bin_of(off)] >= 1
    assert hist[bin_of(0.0)] == 2


def _grid_run(tmp_path, changed_codes: int):
    """A finished QAT run folder with two training checkpoints; the second moves `changed_codes` weights of one
    layer by exactly one grid step."""
    from safetensors.torch import save_file

    import pege_hf
    from pege_hf import PEGEConfig

    torch.manual_seed(0)
    model = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=2, a_bits=2)).eval()
    model(torch.randn(2, 3, 32, 32))
    run = tmp_path / "resnet20-w2a2-pege-s0"
    model.save_pretrained(run)
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "quantization_config": {"w_bits": 2, "estimator": "pege"}}))
    for step in (1, 2):
        if step == 2:
            layer = model.layer2[0].conv1
            q = layer.weight_quantizer.quantizer
            s = q.scale_tensor().view(-1, 1, 1, 1).expand_as(layer.weight).flatten()
            codes = torch.round(torch.clamp(layer.weight.detach().flatten() / s, float(q.qmin), float(q.qmax)))
            movable = ((codes < float(q.qmax)) & (codes > float(q.qmin))).nonzero().flatten()[:changed_codes]
            with torch.no_grad():
                layer.weight.view(-1)[movable] += s[movable]  # one grid step up: the code changes by one
        ckpt = run / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
        (ckpt / "trainer_state.json").write_text("{}")
    return run, model


def test_grid_reports_distance_and_changed_codes(tmp_path):
    from pege_hf.quant.modules import QuantLayer

    run, model = _grid_run(tmp_path, changed_codes=7)
    result = tools.bench_grid(run)
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    n = sum(m.weight.numel() for m in layers)
    assert result["steps"] == [1, 2] and result["weights"] == n
    assert result["codes_changed_fraction"] == pytest.approx(7 / n)
    # the reference: float64 over every quantized layer's weight at the newest checkpoint
    dist, inside = 0.0, 0
    for m in layers:
        q = m.weight_quantizer.quantizer
        v = m.weight.detach().double() / q.scale_tensor().double().view(-1, 1, 1, 1)
        ok = (v >= float(q.qmin)) & (v <= float(q.qmax))
        dist += float((v - v.round()).abs()[ok].sum())
        inside += int(ok.sum())
    assert result["mean_distance"] == pytest.approx(dist / inside, rel=1e-9)
    assert result["clipped_fraction"] == pytest.approx(1 - inside / n)
    assert sum(result["histogram"]) == inside
    tools.grid_plot([result], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| resnet20-w2a2-pege-s0 | 1 -> 2 |" in tools.grid_table([result])
    # what `pege bench grid` picks with no RUN_DIR: finished QAT runs with checkpoints, not FP runs
    fp = tmp_path / "resnet20-fp"
    cifar_resnet(20).save_pretrained(fp)
    (fp / "metrics.json").write_text("{}")
    shutil.copytree(run / "checkpoints", fp / "checkpoints")
    assert tools.finished_qat_runs_with_checkpoints(tmp_path) == [run]


def test_grid_needs_training_checkpoints(tmp_path):
    run, _ = _grid_run(tmp_path, changed_codes=0)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="resnet20-w2a2-pege-s0: needs a finished run .* training checkpoints"):
        tools.bench_grid(run)
    assert research_main(["grid", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_long_budget_report_and_probe_read_what_the_runs_recorded(tmp_path, monkeypatch):
    """report.py: last and best epoch from a run's log (a resumed run's repeated epoch keeps its last value) and
    the probe's records beside them; probe.py: the run's PEGEConfig back from its flattened config event."""
    from benchmarks.long_budget import probe, report
    from pege_hf import PEGEConfig
    from pege_hf.training.tracking import flat_hparams

    qc = PEGEConfig(w_bits=2, a_bits=2, discretization_target="step_size", a_mask="bernoulli")
    config = flat_hparams({"quantization_config": qc.to_dict(), "epochs": 100})
    run = tmp_path / "runs" / "w2a2-pege"
    run.mkdir(parents=True)
    events = [{"event": "config", "config": config}, {"epoch": 1, "eval/accuracy": 0.5},
              {"epoch": 2, "eval/accuracy": 0.7}, {"epoch": 2, "eval/accuracy": 0.6},  # resumed: epoch 2 again
              {"epoch": 3, "eval/accuracy": 0.65, "eval/accuracy_bn_reestimated": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    probes = tmp_path / "probe.json"
    probes.write_text(json.dumps([{"run": "w2a2-pege", "step": 900, "epoch": 2.3, "accuracy_bn_reestimated": 0.7123},
                                  {"run": "other", "step": 5, "epoch": 0.1, "accuracy_bn_reestimated": 0.1}]))
    monkeypatch.setattr(report, "PROBE", probes)
    result = report.collect(tmp_path / "runs")["runs"]["w2a2-pege"]
    assert result["last"] == {"epoch": 3, "accuracy": 0.65} and result["best"] == {"epoch": 3, "accuracy": 0.65}
    assert result["curve"] == {1: 0.5, 2: 0.6, 3: 0.65} and not result["finished"]
    assert result["curve_bn_reestimated"] == {3: 0.8} and result["best_bn_reestimated"] == {"epoch": 3, "accuracy": 0.8}
    assert [p["step"] for p in result["probe"]] == [900]
    md = report.markdown({"fp_accuracy": None, "runs": {"w2a2-pege": result}})
    assert "| 65.00 (epoch 3) | 65.00 (epoch 3) | 80.00 (epoch 3) | 80.00 (epoch 3) |" in md
    assert "| w2a2-pege | 900 | 2.3 | 71.23 |" in md
    assert probe.quantization_config(report.epoch_curve(run / "metrics.jsonl")[1]) == qc
