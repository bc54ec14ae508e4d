"""The report: one self-contained HTML page (and a Markdown summary) built from the run store alone.

::

    from normlab.lab.report import build_report
    path = build_report("runs")            # runs/report.html and runs/report.md
    # or on the command line:  normlab report --root runs --out report.html

The page has an overview table (every registered claim: its verdict — holds /
does not hold / inconclusive / not run — the key numbers with spread over
seeds, the scale and the command that reproduces it) and one section per
experiment (figures, what was measured, config, environment, links to the raw
run files, the source paper's number where one is known). Figures are
embedded as base64 PNGs and nothing is loaded from the network, so the file
can be mailed. Building it never trains or re-analyses anything: it reads
``verdict.json``, the figures and the run folders written by
:func:`normlab.lab.experiments.run_experiment`.
"""

from normlab.lab.report.builder import (
    NOT_RUN,
    Entry,
    Figure,
    ReportData,
    ReportError,
    RunFiles,
    build_report,
    collect,
    report_main,
)

__all__ = [
    "NOT_RUN",
    "Entry",
    "Figure",
    "ReportData",
    "ReportError",
    "RunFiles",
    "build_report",
    "collect",
    "report_main",
]
