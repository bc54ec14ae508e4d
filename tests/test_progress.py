"""Progress: bars on a terminal only; elsewhere whole lines with elapsed time and ETA, at most one every few seconds."""

from __future__ import annotations

import io
import re

import pytest

from normlab.lab import progress
from normlab.lab.progress import Progress, format_duration, resolve_mode


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.setattr(progress, "_last_line", [float("-inf")])


def test_mode_is_bar_on_a_terminal_lines_elsewhere_and_the_environment_overrides_auto(monkeypatch):
    assert resolve_mode(True, _Terminal()) == "bar"
    assert resolve_mode(True, io.StringIO()) == "lines"
    assert resolve_mode(False, _Terminal()) == "off"
    assert resolve_mode("lines", _Terminal()) == "lines"
    monkeypatch.setenv(progress.ENV_VAR, "lines")
    assert resolve_mode(True, _Terminal()) == "lines"
    monkeypatch.setenv(progress.ENV_VAR, "off")
    assert resolve_mode(True, _Terminal()) == "off"
    assert resolve_mode("bar", io.StringIO()) == "bar"  # an explicit mode wins over the environment
    monkeypatch.setenv(progress.ENV_VAR, "sparkly")
    with pytest.raises(ValueError, match="'sparkly'.*not one of: auto, bar, lines, off"):
        resolve_mode(True)


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (7322, "2h02m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_lines_at_most_one_per_interval_with_first_last_elapsed_and_eta():
    clock, out = _Clock(), io.StringIO()
    p = Progress(100, "sweep", unit="run", progress=True, interval=5.0, stream=out, clock=clock)
    assert p.mode == "lines"
    printed = []
    for i in range(100):
        clock.t += 0.5  # every run takes 0.5 s
        before = out.getvalue().count("\n")
        p.update(1)
        if out.getvalue().count("\n") > before:
            printed.append((clock.t, i + 1))
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == len(printed)
    assert printed[0][1] == 1 and printed[-1][1] == 100  # the first and the last update always print
    gaps = [b[0] - a[0] for a, b in zip(printed, printed[1:-1])]
    assert all(g >= 5.0 for g in gaps)  # between them, never closer than the interval
    assert len(lines) <= 50 / 5 + 2
    for (t, done), line in zip(printed, lines):
        left = 100 - done
        expected = f"sweep: {done}/100 runs, elapsed {format_duration(t - 1000.0)}, ETA {format_duration(0.5 * left)}"
        assert line == expected


def test_units_that_took_no_time_do_not_shorten_the_eta():
    clock, out = _Clock(), io.StringIO()
    p = Progress(10, "sweep", progress="lines", interval=0.0, stream=out, clock=clock)
    p.update(4, timed=False, stored=4)  # found stored: instant
    assert out.getvalue().splitlines()[-1].endswith("ETA ?")  # no timed unit yet: unknown
    clock.t += 30
    p.update(1, stored=4)  # one real run: 30 s
    assert out.getvalue().splitlines()[-1] == "sweep: 5/10 runs stored=4, elapsed 30s, ETA 2m30s"


def test_nested_progress_waits_for_any_line():
    """A training run inside a sweep (own=False, first=False) prints only after `interval` of silence."""
    clock, out = _Clock(), io.StringIO()
    outer = Progress(3, "sweep", progress="lines", interval=5.0, stream=out, clock=clock)
    inner = Progress(100, "train", unit="step", progress="lines", interval=30.0, own=False, first=False,
                     last=False, stream=out, clock=clock)  # fmt: skip
    for _ in range(100):
        clock.t += 0.2  # 20 s of steps: no line
        inner.update(1)
    outer.update(1)  # the sweep's first line
    assert [l.split(":")[0] for l in out.getvalue().splitlines()] == ["sweep"]
    inner2 = Progress(1000, "train", unit="step", progress="lines", interval=30.0, own=False, first=False,
                      last=False, stream=out, clock=clock)  # fmt: skip
    for _ in range(200):
        clock.t += 0.2  # 40 s of steps: one line after 30 s of silence
        inner2.update(1, loss="0.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and re.fullmatch(r"train: 150/1000 steps loss=0\.5, elapsed 30s, ETA 2m50s", lines[1])


def test_bar_on_a_terminal_uses_tqdm():
    term = _Terminal()
    p = Progress(3, "sweep", progress=True, stream=term)
    assert p.mode == "bar"
    for _ in range(3):
        p.update(1, ran=1)
    p.close()
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_training_to_a_file_prints_whole_lines(monkeypatch, capsys):
    from normlab.lab import train as train_module
    from normlab.lab.config import TrainConfig

    monkeypatch.setattr(train_module, "TRAIN_INTERVAL", 0.0)  # a line at every step
    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"width": 8}, epochs=2, max_steps=30, device="cpu")
    train_module.train(cfg, progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 30
    pattern = r"mlp/batchnorm lr=0\.05: (\d+)/30 steps.*, elapsed \S+, ETA \S+"
    assert [int(re.fullmatch(pattern, l)[1]) for l in lines] == list(range(1, 31))
    assert "epoch=1/2 loss=" in lines[-1] and "test_acc=" in lines[-1]  # after the first epoch's evaluation
