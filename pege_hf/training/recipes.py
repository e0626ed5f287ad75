"""Recipes: plain dicts of PEGEConfig fields ("config") and training options ("training").

The config's defaults are the tuned recipe (benchmarks/tuning.md): MSE step-size init, discretization
lambda 0.1, and ``--quantizer-lr-scale`` 1. The recipes below name them explicitly so a benchmark plan
keeps its meaning if a default ever changes.
"""

from __future__ import annotations

# what the tuning chose for every estimator (the one under which STE trains soundly)
QAT = {"config": {"scale_init": "mse"}, "training": {"quantizer_lr_scale": 1.0}}
# PEGE's own tuned setting (reaches PEGE runs only)
PEGE = {"config": {"discretization_lambda": 0.1}, "training": {}}
# the quickstart's short QAT from the shipped full-precision ResNet-20 on the shipped 4,000-image sample
# (96 steps): at W4A4 and lr 0.001 that lands near FP; W2A2 needs the full training set and more epochs
# (the options measured: benchmarks/quickstart_options.json)
QUICKSTART = {"config": {"w_bits": 4, "a_bits": 4}, "training": {"epochs": 3, "lr": 0.001}}


def option_value(value) -> str:
    """A value as the command line writes it (1.0 -> '1', 0.1 -> '0.1', None -> 'none'); floats exactly."""
    if value is None:
        return "none"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def recipe_argv(recipe: dict) -> tuple[str, ...]:
    """A recipe as `pege train` options (config fields first, then training options): True -> ``--name``,
    False -> ``--no-name``, a list -> ``--name a b``."""
    argv: list[str] = []
    for name, value in [*recipe.get("config", {}).items(), *recipe.get("training", {}).items()]:
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(option_value, value)]
        elif isinstance(value, dict):
            raise ValueError(f"{name}: a dict has no command-line form; set it in Python (PEGEConfig)")
        else:
            argv += [flag, option_value(value)]
    return tuple(argv)
