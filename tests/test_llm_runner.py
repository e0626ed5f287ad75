"""The causal-LM benchmark runner (benchmarks/llm/run.py): its plan parses, and a run folder keeps its settings."""

from __future__ import annotations

import json

import pytest

from benchmarks.llm import run
from pege_hf.training.lm_args import parse_args


def test_every_planned_run_parses_to_the_intended_config(tmp_path):
    args = run.parse(["--work", str(tmp_path)])
    planned = dict(run.plan(args))
    assert set(planned) >= {"fp", "FPcont-fp", "W2g32-pege_step", "W4g32A8-torchao"}
    step = parse_args(planned["W2g32-pege_step"] + ["--output-dir", str(tmp_path / "o")])
    assert (step.estimator, step.w_bits, step.group_size) == ("pege", 2, 32)
    assert (step.discretization_lambda, step.discretization_target) == (0.1, "step_size")
    assert parse_args(planned["W2g32-pege"] + ["--output-dir", str(tmp_path / "o")]).discretization_target is None  # default


def test_a_run_started_with_other_settings_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch):
    args = run.parse(["--work", str(tmp_path)])
    name, argv = run.plan(args)[2]
    out = tmp_path / "runs" / name
    out.mkdir(parents=True)
    (out / "argv.json").write_text(json.dumps(argv))
    run.check_settings(out, argv)  # the same settings: fine
    changed = [a if a != "0.0003" else "0.001" for a in argv]
    with pytest.raises(ValueError, match=r"other settings \(0.0003 -> 0.001\)"):
        run.check_settings(out, changed)
    # the runner stops with one line before preparing the corpus or launching anything
    monkeypatch.setattr(run, "prepare", lambda work: {})
    monkeypatch.setattr(run, "launch", lambda *a: pytest.fail("launched"))
    assert run.main(["--work", str(tmp_path), "--qat-lr", "0.001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "0.0003 -> 0.001" in err and err.count("\n") == 1


def test_a_second_qat_seed_runs_beside_the_first_from_the_same_fp_model(tmp_path):
    from benchmarks.llm.report import split_name

    first = dict(run.plan(run.parse(["--work", str(tmp_path)])))
    second = dict(run.plan(run.parse(["--work", str(tmp_path), "--qat-seed", "1", "--schemes", "W2g32"])))
    assert set(second) == {"fp", "FPcont-fp-s1"} | {f"W2g32-{m}-s1" for m in run.METHODS}
    assert second["fp"] == first["fp"]  # the same FP model
    for name in ("FPcont-fp", "W2g32-ste_sym", "W2g32-torchao"):
        a, b = first[name], second[f"{name}-s1"]
        assert parse_args(b + ["--output-dir", "o"]).seed == 1 and parse_args(a + ["--output-dir", "o"]).seed == 0
        at = a.index("--seed") + 1
        assert a[:at] + a[at + 1:] == b[:at] + b[at + 1:]  # nothing but the seed differs
    assert split_name("W2g32-pege_step_sym-s1") == ("W2g32", "pege_step_sym", 1)
    assert split_name("W2g32-torchao") == ("W2g32", "torchao", 0) and split_name("fp") == ("fp", "", 0)


def test_the_seed_summary_compares_each_run_with_its_own_seeds_control(tmp_path):
    """benchmarks/llm/seeds.py: perplexity / control - 1 per seed with that seed's control, mean and sample
    standard deviation over the seeds a method ran, from llm.json files in the layout run.py writes."""
    from benchmarks.llm import seeds

    def row(name, seed, ppl):
        scheme, _, method = name.partition("-")
        return {"run": name, "scheme": scheme, "method": method.split("-s")[0], "seed": seed, "perplexity": ppl}

    (tmp_path / "seed1").mkdir()
    (tmp_path / "llm.json").write_text(json.dumps({"runs": [
        row("fp", 0, 120.0), row("FPcont-fp", 0, 100.0), row("W2g32-ste", 0, 101.0), row("W2g32-pege", 0, 103.0),
        {"run": "W2g32-torchao", "scheme": "W2g32", "method": "torchao", "seed": 0}]}))  # unfinished: no perplexity
    (tmp_path / "seed1" / "llm.json").write_text(json.dumps({"runs": [
        row("FPcont-fp-s1", 1, 80.0), row("W2g32-ste-s1", 1, 80.4), row("W2g32-torchao-s1", 1, 80.8)]}))
    result = seeds.summary(seeds.load_runs(tmp_path))["W2g32"]
    by = {r["method"]: r for r in result["methods"]}
    assert result["seeds"] == [0, 1] and set(by) == {"ste", "pege", "torchao"}
    assert by["ste"]["per_seed"] == pytest.approx({"0": 0.01, "1": 0.005})
    assert by["ste"]["mean"] == pytest.approx(0.0075) and by["ste"]["std"] == pytest.approx(0.0025 * 2 ** 0.5)
    assert by["pege"]["seeds"] == 1 and by["pege"]["std"] is None
    assert [r["method"] for r in result["methods"]] == ["ste", "torchao", "pege"]  # most seeds first, then by mean
    assert "| STE (pege_hf) | +1.00% | +0.50% | +0.75% | 0.35 |" in seeds.markdown({"W2g32": result})
