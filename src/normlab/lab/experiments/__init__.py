"""The lab's experiments: one module per claim, registered by name, on one framework.

::

    from normlab.lab.experiments import experiment_names, run_experiment
    experiment_names()                          # ["high-lr", ..., "smoke-example"]
    result = run_experiment("smoke-example", scale="smoke", root="runs")
    result.verdict.status, result.figures

Every module in this package (except ``framework``, ``verdicts`` and private
``_*`` modules) is imported the first time the registry is asked for names,
and registers its experiment with :func:`register_experiment`; adding a claim
means adding one module. The framework is in
:mod:`normlab.lab.experiments.framework`, the statistics engine that turns
seeds into verdicts in :mod:`normlab.lab.experiments.verdicts`.
"""

from normlab.lab.experiments.framework import (
    EXPERIMENTS,
    SCALES,
    STATUSES,
    Experiment,
    ExperimentResult,
    Part,
    Run,
    SeedPlan,
    Verdict,
    analyse_stored,
    experiment_names,
    get_experiment,
    group,
    pyplot,
    recheck_experiment,
    register_experiment,
    run_all,
    run_experiment,
    save_figure,
    values,
)

__all__ = [
    "EXPERIMENTS",
    "SCALES",
    "STATUSES",
    "Experiment",
    "ExperimentResult",
    "Part",
    "Run",
    "SeedPlan",
    "Verdict",
    "analyse_stored",
    "experiment_names",
    "get_experiment",
    "group",
    "pyplot",
    "recheck_experiment",
    "register_experiment",
    "run_all",
    "run_experiment",
    "save_figure",
    "values",
]
