"""The command line: list / run / show / train / demo, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import re
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
    assert f"smoke-example/{rid}" in out and "final_test_acc" in out
    assert re.search(r"^  dataset += digits$", out, flags=re.M)  # keys padded to one width
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


# --------------------------------------------------------------------------- version, help from the typed configs


def test_version_prints_the_installed_version(capsys):
    import importlib.metadata
    import platform

    import torch

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    expected = f"normlab {importlib.metadata.version('normlab')} ({versions})"
    assert capsys.readouterr().out.strip() == expected


def _source_comments(cls) -> dict[str, str]:
    """Oracle: ``name: type = default  # comment`` lines of the class body, read with a regex."""
    import inspect

    src = inspect.getsource(cls)
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s{4}(\w+): .*?  # (.*)$", src, flags=re.M)}


def _help_entries(text: str) -> dict[str, tuple[str, str]]:
    """``{key: (head line, comment line)}`` from the key listing printed by --help."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"^  (\w+): ", line)
        if m:
            nxt = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("      ") else ""
            out[m[1]] = (line, nxt.strip())
    return out


def _shown_value(head: str) -> str:
    """The default shown in ``  key: type = default   [others]``."""
    return head.split(" = ", 1)[1].split("   [", 1)[0]


def test_train_help_lists_every_config_key_with_type_default_and_unit(capsys):
    import dataclasses

    from normlab.lab.config import TrainConfig, _field_types, _type_name, parse_overrides

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    comments = _source_comments(TrainConfig)
    types = _field_types(TrainConfig)
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        head, unit = entries[f.name]
        assert head.startswith(f"  {f.name}: {_type_name(types[f.name])} = ")
        # the default as shown, given back to --set, is the default
        assert getattr(parse_overrides(default, [f"{f.name}={_shown_value(head)}"]), f.name) == getattr(default, f.name)
        assert unit == comments[f.name] and unit  # every TrainConfig field has its unit comment
    assert len(entries) == len(dataclasses.fields(TrainConfig))


def _bracketed(head: str) -> dict[str, str]:
    """``{"smoke": ..., "full": ...}`` from ``   [smoke X; full Y]`` at the end of a key's line."""
    if "   [" not in head:
        return {}
    inner = head.split("   [", 1)[1]
    assert inner.endswith("]")
    inner = inner[:-1]
    if inner.startswith("full "):
        return {"full": inner[5:]}
    assert inner.startswith("smoke ")
    smoke, sep, full = inner[6:].partition("; full ")
    return {"smoke": smoke, **({"full": full} if sep else {})}


def test_run_help_lists_every_key_of_every_experiment_per_scale(capsys):
    import dataclasses

    from normlab.lab.config import _field_types, _type_name
    from normlab.lab.experiments import experiment_names, get_experiment

    for name in experiment_names():
        exp = get_experiment(name)
        with pytest.raises(SystemExit) as e:
            main(["run", name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: normlab run" in out and f"config keys of {exp.claim + ' ' if exp.claim else ''}{exp.name}" in out
        entries = _help_entries(out.split("config keys of", 1)[1])
        comments = _source_comments(exp.config)
        types = _field_types(exp.config)
        quick = exp.scales["quick"]
        for f in dataclasses.fields(exp.config):
            head, unit = entries[f.name]
            assert head.startswith(f"  {f.name}: {_type_name(types[f.name])} = "), head
            shown = _shown_value(head)
            assert getattr(exp.config_for("quick", [f"{f.name}={shown}"]), f.name) == getattr(quick, f.name)
            others = _bracketed(head)
            for scale in ("smoke", "full"):
                value = getattr(exp.scales[scale], f.name)
                if value == getattr(quick, f.name):
                    assert scale not in others
                else:
                    assert getattr(exp.config_for(scale, [f"{f.name}={others[scale]}"]), f.name) == value
            assert unit == comments.get(f.name, "")
        assert len(entries) == len(dataclasses.fields(exp.config))


def test_run_help_with_unknown_experiment_is_one_line(capsys):
    assert main(["run", "no-such-experiment", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "known experiments:" in captured.err


# --------------------------------------------------------------------------- user errors: one line, exit status 2


@pytest.mark.parametrize(
    "argv, must",
    [
        (["train", "--set", "dataset=cifar10"], "no data_dir was given; pass data_dir= (CLI: --data-dir)"),
        (["train", "--set", "dataset=cifar10", "--data-dir", "{tmp}/none"], "CIFAR-10 not found: expected the folder"),
        (["run", "smoke-example", "--data-dir", "{tmp}"], "reads no data files (its config has no data_dir key)"),
        (["run", "high-lr", "--scale", "smoke", "--set", "dataset=cifar10"], "no data_dir was given"),
        (["--import", "no_such_normlab_plugin", "list"], "no module named 'no_such_normlab_plugin'"),
        (["--import", "my_plugin.py", "list"], "give a module name, not a file"),
    ],
)
def test_missing_data_and_bad_plugins_exit_2_with_one_line(argv, must, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, *(["--root", str(tmp_path / "runs")] if "list" not in argv else [])]) == 2
    err = capsys.readouterr().err
    assert must in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"normlab {'list' if 'list' in argv else argv[0]}: error: ")


def test_data_dir_reaches_the_dataset(tmp_path, capsys):
    """--data-dir is data_kwargs.data_dir for train and the data_dir key for experiments (the path is in the error)."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    assert main(["train", "--set", "dataset=cifar10", "--data-dir", str(folder), "--root", str(tmp_path)]) == 2
    assert f"missing in {folder}: data_batch_1" in capsys.readouterr().err
    argv = ["run", "high-lr", "--scale", "smoke", "--set", "dataset=cifar10", "--data-dir", str(folder)]
    assert main([*argv, "--root", str(tmp_path), "--no-progress"]) == 2
    assert f"missing in {folder}: data_batch_1" in capsys.readouterr().err


def test_bad_progress_mode_in_the_environment_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("NORMLAB_PROGRESS", "fancy")
    assert main(["list", "norms"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "$NORMLAB_PROGRESS='fancy' is not one of: auto, bar, lines, off" in err


_BLOCK_LAB_EXTRA = """
import contextlib, importlib.abc, io, json, sys
BLOCKED = {"sklearn", "tqdm", "matplotlib", "mnist1d", "pandas"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from normlab.lab.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_without_the_lab_extra_commands_say_how_to_install_it(tmp_path):
    root = str(tmp_path / "runs")
    commands = [
        ["train", *FAST_TRAIN, "--root", root],
        ["run", "smoke-example", "--scale", "smoke", "--root", root, "--device", "cpu"],
        ["demo", "--scale", "smoke", "--root", root, "--device", "cpu"],
        ["list", "norms"],  # needs nothing of the extra
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", _BLOCK_LAB_EXTRA, json.dumps(commands)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for argv, (code, err) in zip(commands[:3], results[:3]):
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith(f"normlab {argv[0]}: error: ")
        assert "No module named" in err and err.rstrip().endswith("pip install 'normlab[lab]'")
    assert results[3] == [0, ""]


# --------------------------------------------------------------------------- progress, pipes, show


def test_progress_to_a_pipe_is_whole_lines_with_elapsed_and_eta(tmp_path, capsys, monkeypatch):
    """Not a terminal (captured stderr): no carriage-return bar fragments; a line per finished run at most."""
    monkeypatch.delenv("NORMLAB_PROGRESS", raising=False)
    for flag in ([], ["--no-progress"]):
        root = str(tmp_path / f"runs{len(flag)}")
        argv = ["run", "smoke-example", "--scale", "smoke", "--root", root, "--device", "cpu", *flag]
        assert main(argv) == 0
        captured = capsys.readouterr()
        err = captured.err
        assert "\r" not in err and "\r" not in captured.out
        lines = [l for l in err.splitlines() if l.startswith("smoke-example [2 seeds]: ")]
        assert lines and len(lines) <= 4  # the first and the last, at most one per finished run between
        clock = r"(\d+s|\dm\d\ds)"
        pattern = rf"smoke-example \[2 seeds\]: ([1-4])/4 runs ran=\d stored=\d, elapsed {clock}, ETA ({clock}|\?)"
        assert all(re.fullmatch(pattern, l) for l in lines), lines
        assert lines[-1].startswith("smoke-example [2 seeds]: 4/4 runs ran=4 stored=0") and lines[-1].endswith("ETA 0s")


def test_no_progress_on_a_terminal_gives_lines_instead_of_bars(tmp_path, monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NORMLAB_PROGRESS", raising=False)
    for flag, bars in (([], True), (["--no-progress"], False)):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        root = str(tmp_path / f"runs{len(flag)}")
        assert main(["run", "smoke-example", "--scale", "smoke", "--root", root, "--device", "cpu", *flag]) == 0
        err = term.getvalue()
        assert ("\r" in err) == bars and ("| 4/4 [" in err) == bars  # tqdm's bar, or none
        assert (
            err.splitlines()[-1].startswith("smoke-example [2 seeds]: 4/4 runs ran=4")
        ) != bars  # a line per run instead
    assert "NORMLAB_PROGRESS" not in os.environ  # --no-progress is scoped to its command
    capsys.readouterr()


def test_closed_pipe_is_quiet(tmp_path):
    """`normlab show ... | head`: the reader goes away; no BrokenPipeError traceback, status 141 (SIGPIPE)."""
    from normlab.lab.store import RunStore

    store = RunStore(tmp_path)
    for width in range(40):
        store.save("train", {"model": "mlp", "model_kwargs": {"width": width}}, {"final_test_acc": 0.5})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "normlab", "show", "train", "--root", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    p.stdout.close()  # before the child writes anything (it is still importing torch)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_show_lists_every_differing_key_in_aligned_columns(tmp_path, capsys):
    from normlab.lab.config import TrainConfig
    from normlab.lab.store import RunStore

    store = RunStore(tmp_path)
    base = TrainConfig().to_dict()
    configs = [
        base,
        {**base, "model_kwargs": {"width": 4}},  # flattened to model_kwargs.width before: shown as None
        {**base, "world_size": 2},  # a 2-process run: the key only it has
        {
            **base,
            "lr": 0.1,
            "norm_kwargs": {"momentum": 0.01},
            "seed": 3,
            "epochs": 7,
            "batch_size": 8,
            "nesterov": True,
        },
    ]
    for i, c in enumerate(configs):
        store.save("train", c, {"final_test_acc": 0.5 + i / 10, "final_test_loss": 1.0 / (i + 1), "diverged": False})
    assert main(["show", "train", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("  run_id"))
    header, rows = lines[start], lines[start + 1 : start + 1 + len(configs)]
    cols = header.split()
    varying = ["model_kwargs", "norm_kwargs", "lr", "epochs", "batch_size", "nesterov", "seed", "world_size"]
    assert sorted(cols[1:-3]) == sorted(varying)
    assert cols[-3:] == ["final_test_acc", "final_test_loss", "diverged"]
    by_id = {store.run("train", c).run_id: c for c in configs}
    # a column's cells start where its header starts (text columns) or end where it ends (number columns)
    starts = {c: header.index(f"  {c}") + 2 for c in cols}
    ends = {c: starts[c] + len(c) for c in cols}
    width = {c: max(len(c), *(len(r[starts[c] :].split("  ")[0]) for r in rows)) for c in cols}
    for row in rows:
        cfg = by_id[row.split()[0]]
        assert row[starts["model_kwargs"] :].startswith(json.dumps(cfg["model_kwargs"]))
        assert row[starts["norm_kwargs"] :].startswith(json.dumps(cfg["norm_kwargs"]))
        ws = row[: ends["world_size"]].split()[-1]
        assert ws == (str(cfg["world_size"]) if "world_size" in cfg else "-")
        assert float(row[: ends["lr"]].split()[-1]) == cfg["lr"]
        assert row[starts["diverged"] :].strip() == "False"
    assert width  # every column found
