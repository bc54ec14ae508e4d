"""Run functions for tests/test_scale_out.py, importable by spawned pool workers (module level, picklable).

``train_run(config)`` trains a small digits MLP from a config dict and logs
``start <run id> <pid>`` / ``done <run id> <pid>`` lines to
``$NORMLAB_TEST_LOG`` (appends of one short line: atomic under O_APPEND). A
config with ``"kill_once": true`` SIGKILLs its own worker the first time it
runs (a marker file next to the log remembers it).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from normlab.lab.store import run_id


def _log(event: str, config: dict) -> None:
    path = os.environ.get("NORMLAB_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{event} {run_id(config)} {os.getpid()}\n")


def train_run(config: dict) -> dict:
    import time

    from normlab.lab.config import TrainConfig
    from normlab.lab.train import train

    _log("start", config)
    if config.get("kill_once"):
        marker = Path(os.environ["NORMLAB_TEST_LOG"] + ".killed")
        if not marker.exists():
            marker.write_text("killed once\n")
            time.sleep(0.3)  # let the other worker get going, then die mid-run
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        model_kwargs={"width": 16},
        norm=config["norm"],
        lr=config["lr"],
        epochs=1,
        max_steps=8,
        batch_size=32,
        device="cpu",
        threads=1,
        seed=config["seed"],
    )
    result = train(cfg)
    out = {k: v for k, v in result.to_metrics().items() if not k.endswith("time")}  # timings vary
    out["per_epoch"] = [{k: v for k, v in e.items() if k not in ("time", "eval_time")} for e in out["per_epoch"]]
    _log("done", config)
    return out


def fixed_env(config: dict) -> dict:
    return {"seed": config["seed"]}
