"""The lab's experiments: one module per claim (see ``CLAIMS.md``), registered by name, on one framework.

::

    from normlab.lab.experiments import experiment_names, run_experiment
    experiment_names()                          # ["high-lr", ..., "smoke-example"]
    result = run_experiment("smoke-example", scale="smoke", root="runs")
    result.verdict.status, result.figures

Every module in this package (except ``framework`` and private ``_*`` modules) is
imported the first time the registry is asked for names, and registers its
experiment with :func:`register_experiment`; adding a claim means adding one
module. The framework itself is in :mod:`normlab.lab.experiments.framework`.
"""

from normlab.lab.experiments.framework import (
    SCALES,
    STATUSES,
    Experiment,
    ExperimentResult,
    Run,
    Verdict,
    analyse_stored,
    combine,
    compare,
    experiment_names,
    fmt_mean_std,
    get_experiment,
    group,
    mean_std,
    pyplot,
    register_experiment,
    run_experiment,
    save_figure,
    threshold,
    values,
)

__all__ = [
    "SCALES",
    "STATUSES",
    "Experiment",
    "ExperimentResult",
    "Run",
    "Verdict",
    "analyse_stored",
    "combine",
    "compare",
    "experiment_names",
    "fmt_mean_std",
    "get_experiment",
    "group",
    "mean_std",
    "pyplot",
    "register_experiment",
    "run_experiment",
    "save_figure",
    "threshold",
    "values",
]
