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
