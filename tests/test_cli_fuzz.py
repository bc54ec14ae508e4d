"""Fuzzing the command line's ``--set key=value``: every outcome is exit status 0 or 2, never a traceback or a signal.

The values cover every field type of :class:`TrainConfig` (ints, floats,
bools, strings, literals, optionals, tuples, JSON objects) with numbers
including nan/inf/huge/negative, strings with shell metacharacters, and JSON.
The fast test drives ``normlab train`` in this process on a run of two steps
(an exception escaping ``main`` fails it); the slow ones run ``normlab`` in
fresh processes, where a signal or a traceback would show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normlab.lab.cli import main
from normlab.lab.config import TrainConfig

# every TrainConfig field but compile (torch.compile takes tens of seconds to start; its type, bool, is fuzzed
# through the other bool fields)
FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "compile"]
# a valid run of two steps; the fuzzed key=value comes last and replaces its field
BASE = [
    "dataset=digits", "n_train=64", "model=mlp", "epochs=1", "max_steps=2", "batch_size=32", "eval_batch_size=512",
    "device=cpu", "threads=1",
]  # fmt: skip

NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["nan", "inf", "-inf", "1e400", "-1e400", "1e30", "-0", "0", "1", "2", "0.5", "9223372036854775808",
         "9223372036854775807", "-9223372036854775809", "1e-320", "0x10", "1_000", "3,2", "0.9,0.999", "nan,nan"]
    ),
)  # fmt: skip
SHELL = st.one_of(
    st.sampled_from(
        ["$(touch pwned)", "`touch pwned`", "; rm -rf ./x", "a|b", "x && y", "'\"", "\\", "*", "~", "$HOME",
         "--help", "-1", "none", "null", "true", "false", "", " ", "batchnorm", "sgd", "adam", "step", "cosine",
         "auto", "cuda", "cuda:7", "mps", "flip+crop", "\u00e9\u00df\u2603", "a=b=c",
         # registered names, so that other models, norms and datasets meet the base config
         "digits", "synthetic-images", "synthetic-sequences", "cifar10", "mlp", "cnn", "resnet", "transformer",
         "layernorm", "rmsnorm", "groupnorm", "instancenorm", "batchrenorm", "ghostbatchnorm", "noisybatchnorm"]
    ),
    st.text(max_size=20),
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
).map(json.dumps)
VALUES = st.one_of(NUMBERS, SHELL, JSON)


def _train(root: str, item: str, capsys) -> tuple[int, str, str]:
    argv = ["train", "--root", root, "--no-progress", "--set", *BASE, item]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _check(code: int, out: str, err: str, item: str) -> None:
    assert code in (0, 2), (item, code, err[-2000:])
    assert "Traceback" not in err, (item, err[-2000:])
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (item, err)
    else:
        assert out.startswith(("finished", "DIVERGED", "already stored")), (item, out)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_train_set_any_value_exits_0_or_2(field, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a value such as data_dir=$(touch pwned) must create nothing, anywhere
    item = f"{field}={value}"
    code, out, err = _train(str(tmp_path / "runs"), item, capsys)
    _check(code, out, err, item)
    assert not [p for p in tmp_path.iterdir() if "pwned" in p.name]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_dotted_keys_of_any_field_exit_0_or_2(field, value):
    """``field.sub=value``: only dict fields take dotted keys; everything else is a one-line ConfigError."""
    from normlab.lab.config import ConfigError, parse_overrides

    try:
        cfg = parse_overrides(TrainConfig(), [f"{field}.x={value}"])
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(getattr(cfg, field), dict) and "x" in getattr(cfg, field)


def _normlab(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "normlab", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


@pytest.mark.slow
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_train_set_in_a_fresh_process_never_ends_in_a_signal_or_a_traceback(field, value, tmp_path):
    item = f"{field}={value}"
    p = _normlab(["train", "--root", "runs", "--no-progress", "--set", *BASE, item], tmp_path)
    assert p.returncode in (0, 2), (item, p.returncode, p.stderr[-2000:])  # a signal is a negative status
    _check(p.returncode, p.stdout, p.stderr, item)


SMOKE_FIELDS = ["seeds", "epochs", "lr", "batch_size", "width", "n_train", "norms"]


@pytest.mark.slow
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(SMOKE_FIELDS), value=VALUES)
def test_run_set_on_an_experiment_config_exits_0_or_2(field, value, tmp_path, capsys):
    """An experiment's own config (tuple[str, ...] among its types), at smoke scale with one seed."""
    item = f"{field}={value}"
    argv = ["run", "smoke-example", "--scale", "smoke", "--seeds", "1", "--root", str(tmp_path), "--no-progress"]
    argv += ["--device", "cpu", "--set", "n_train=100", "epochs=1", item]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, 2), (item, code, err[-2000:])
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (item, err)
