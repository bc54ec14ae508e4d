"""The command line: list / run / show / train / demo, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from normlab.lab.cli import main

FAST_TRAIN = ["--set", "dataset=digits", "model=mlp", "model_kwargs.width=16", "epochs=1", "device=cpu"]


def test_list_names_experiments_datasets_models_norms(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smoke-example" in out
    for line_start, must in (("datasets:", "digits"), ("models:", "mlp"), ("norms:", "batchnorm")):
        line = next(l for l in out.splitlines() if l.startswith(line_start))
        assert must in line
    assert main(["list", "norms"]) == 0
    assert capsys.readouterr().out.startswith("norms: ")


def test_run_show_and_resume(tmp_path, capsys):
    root = str(tmp_path / "runs")
    argv = ["run", "smoke-example", "--scale", "smoke", "--root", root, "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "smoke-example [smoke, 2 seeds," in out and "4 run now, 0 found stored" in out
    assert "(smoke scale: plumbing only, not a verdict)" in out
    verdict = json.loads((tmp_path / "runs" / "smoke-example" / "verdict.json").read_text())
    assert verdict["status"] in ("holds", "does not hold", "inconclusive") and verdict["status"] in out
    assert "bn-not-worse" in out and "decides" in out  # the parts table
    assert (tmp_path / "runs" / "smoke-example" / verdict["figures"][0]).is_file()

    assert main(argv) == 0
    assert "0 run now, 4 found stored" in capsys.readouterr().out

    assert main(["show", "smoke-example", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "4 complete runs stored" in out and "pre-registration:" in out and "bn-not-worse" in out
    assert out.index("pre-registration:") < out.index("verdict [smoke, 2 seeds]")

    rid = verdict["runs"][0]
    assert main(["show", rid[:8], "--root", root, "--epochs"]) == 0
    out = capsys.readouterr().out
    assert f"smoke-example/{rid}" in out and "final_test_acc" in out and "dataset = digits" in out
    assert "test_acc" in out.split("epochs:")[1]


def test_train_stores_a_run_and_skips_it_next_time(tmp_path, capsys):
    root = str(tmp_path)
    assert main(["train", *FAST_TRAIN, "--root", root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("finished: 22 steps") and "stored: " in out
    path = out.split("stored: ")[1].strip()
    assert json.loads(open(os.path.join(path, "config.json")).read())["model_kwargs"] == {"width": 16}
    assert main(["train", *FAST_TRAIN, "--root", root, "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("already stored")


def test_train_divergence_is_a_result(tmp_path, capsys):
    argv = ["train", *FAST_TRAIN, "norm=none", "lr=1000", "--root", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("DIVERGED at step ")


@pytest.mark.parametrize(
    "argv, must",
    [
        (["train", "--set", "lrr=0.1"], "unknown key 'lrr'"),
        (["train", "--set", "optimizer=adamw"], "is not one of: 'sgd', 'adam'"),
        (["train", "--set", "epochs=many"], "epochs='many' is not a valid int"),
        (["train", "--set", "norm=bn"], "norm='bn' is not one of:"),
        (["run", "no-such-experiment"], "known experiments:"),
        (["run", "smoke-example", "--scale", "huge"], "invalid choice: 'huge'"),
        (["run", "smoke-example", "--set", "nope=1"], "valid keys: seeds, max_seeds, threads, epochs"),
        (["run", "smoke-example", "--seeds", "0"], "must be >= 1"),
        (["show", "deadbeef"], "no run 'deadbeef'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, must, tmp_path, capsys):
    root = [] if argv[0] == "frobnicate" else ["--root", str(tmp_path)]
    with_root = argv + root if argv[0] in ("run", "show", "train") else argv
    try:
        code = main(with_root)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert must in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_error_has_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "normlab", "train", "--set", "batch_size=big", "--root", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip() == "normlab train: error: batch_size='big' is not a valid int"


@pytest.mark.parametrize("cmd", [[], ["list"], ["run"], ["show"], ["train"], ["demo"]])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0 and "usage: normlab" in capsys.readouterr().out


def test_demo_runs_the_registered_headline_claims(tmp_path, capsys, monkeypatch):
    from dataclasses import dataclass

    from normlab.lab import cli
    from normlab.lab.experiments import framework as base

    @dataclass(frozen=True)
    class Cfg:
        seeds: int = 2  # seeds per round
        max_seeds: int = 2  # seed budget
        threads: int = 1  # torch threads per run

    ran = []
    exp = base.Experiment(
        name="test-headline", claim="C998", title="t", config=Cfg, scales={s: Cfg() for s in base.SCALES},
        grid=lambda cfg: [{"arm": "x"}], run_one=lambda run: ran.append((run.scale, run.seed)) or {"v": 1.0},
        parts=lambda cfg: [base.Part("v", "v above 0.5", "v", {"arm": "x"}, bound=0.5, margin=0.1, why="test")],
    )  # fmt: skip
    base.register_experiment(exp)
    try:
        monkeypatch.setattr(cli, "HEADLINE_CLAIMS", ("C998", "C997"))  # C997: not registered, skipped
        assert main(["demo", "--root", str(tmp_path), "--no-progress"]) == 0
    finally:
        base.EXPERIMENTS.unregister("test-headline")
    out = capsys.readouterr().out
    assert ran == [("quick", 0), ("quick", 1)]  # quick scale by default
    assert "C998 test-headline [quick, 2 seeds" in out and "HOLDS" in out
    assert f"figures and verdicts are under {tmp_path.resolve()}/<experiment>/" in out


def test_demo_falls_back_to_the_example_and_prints_where_figures_are(tmp_path, capsys, monkeypatch):
    from normlab.lab import cli

    monkeypatch.setattr(cli, "HEADLINE_CLAIMS", ("C997",))
    assert main(["demo", "--scale", "smoke", "--root", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "running 'smoke-example'" in out and "smoke-example [smoke, 2 seeds," in out
    assert "figure: " in out and (tmp_path / "smoke-example" / "verdict.json").is_file()


def test_report_and_audit_are_handed_to_their_own_parsers(tmp_path, capsys):
    from normlab.lab.cli import main

    assert main(["report", "--root", str(tmp_path / "missing")]) == 2  # one-line error from report_main
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert main(["audit", "no_such_file.py:build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_file.py" in err[0]
