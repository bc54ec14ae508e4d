#!/usr/bin/env python3
"""Publish a run of the claims suite into the repository: results, figures, the README's claims table, CLAIMS.md.

    python scripts/publish_results.py --root runs   # after `normlab run --all` (and `--recheck`)
    python scripts/publish_results.py --check       # exit 1 if README.md or docs/CLAIMS.md disagree with docs/results
    python scripts/publish_results.py --regenerate  # rewrite both from docs/results (after editing a docstring)

Publishing copies ``<root>/suite.json`` and each claim's ``verdict.json`` to
``docs/results/``, each verdict's figures to ``docs/figures/<experiment>/``,
and regenerates from those files alone (never by hand):

* the block of README.md between ``<!-- claims:begin -->`` and
  ``<!-- claims:end -->``: one row per claim with its verdict, the deciding
  parts' effects with 95 % intervals and margins, the seeds used, the time,
  and whether the verdict survived the recheck with another thread count;
* ``docs/CLAIMS.md``: every claim's pre-registration and declared parts
  (from the registered experiments) beside its measured verdict.

``--check`` regenerates both in memory and compares; a test runs it, so the
README cannot drift from the stored results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
FIGURES = REPO / "docs" / "figures"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
BENCH_BEGIN, BENCH_END = "<!-- bench:begin -->", "<!-- bench:end -->"
BENCH = REPO / "docs" / "bench"
FIGURE_LINK = "docs/figures"  # README links are relative to the repository root


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _g(x: float) -> str:
    return f"{x:.3g}"


def _load_results() -> tuple[dict | None, dict[str, dict]]:
    suite = json.loads((RESULTS / "suite.json").read_text()) if (RESULTS / "suite.json").is_file() else None
    verdicts = {}
    for p in sorted(RESULTS.glob("*.json")):
        if p.name != "suite.json":
            v = json.loads(p.read_text())
            verdicts[v["experiment"]] = v
    return suite, verdicts


def _part_text(p: dict) -> str:
    sh = p["shown"]
    ratio = p["scale"] == "log10 ratio"
    x = "×" if ratio else ""
    text = (
        f"`{p['name']}` {x}{_g(sh['effect'])} [{_g(sh['ci95'][0])}, {_g(sh['ci95'][1])}] "
        f"(δ {'×' if ratio else '±'}{_g(sh['margin'])}) → {p['status']}"
    )
    if p["status"] == "inconclusive" and p.get("seeds_to_decide"):
        text += f" (≈{p['seeds_to_decide']} seeds would decide)"
    return text


def _what_decides(v: dict) -> str:
    """An inconclusive claim: how many seeds would decide its open deciding parts, as its verdict estimates."""
    if v["status"] != "inconclusive":
        return ""
    open_parts = [p for p in v["parts"] if p["decides"] and p["status"] == "inconclusive"]
    known = [p["seeds_to_decide"] for p in open_parts if p.get("seeds_to_decide")]
    unknown = [f"`{p['name']}`" for p in open_parts if not p.get("seeds_to_decide")]
    text = f"<br>budget {v['config'].get('max_seeds', v['seeds'])} seeds spent;"
    if known:
        text += f" ≈{max(known)} seeds per arm would decide {'it' if not unknown else 'the rest'}"
    if unknown:
        text += (
            f"{';' if known else ''} no seed count can be estimated for {', '.join(unknown)}: the observed effect "
            "is at the margin or at zero, where no number of seeds is sure to decide"
        )
    return text


def _recheck_text(v: dict) -> str:
    r = v.get("recheck")
    if not r:
        return "not rechecked"
    threads = f"{r['threads_before']}→{r['threads']} threads"
    if r.get("same_parts") and r.get("same_claim"):
        return f"same ({threads})"
    claim = "claim same" if r.get("same_claim") else f"**claim {r['status_before']} → {r['status_after']}**"
    moved = "; ".join(f"`{k}` {a} → {b}" for k, (a, b) in r.get("parts", {}).items() if a != b)
    return f"{claim}; **{moved}** ({threads})"


def _power_line() -> str:
    path = REPO / "docs" / "power.json"
    if not path.is_file():
        return ""
    power = json.loads(path.read_text())
    at = {name: next(p for p in pts if p["effect"] == 1.5)["holds"] for name, pts in power["curves"].items()}
    null = {name: pts[0]["holds"] for name, pts in power["curves"].items()}
    parts = "; ".join(f"{name}: {at[name]:.2f} (no effect: {null[name]:.3f})" for name in at)
    return (
        f"Power of the rule at this budget (simulated, {power['simulations']} experiments per point, margin "
        f"{power['margin_sd']} SD; `docs/power.json`): P(holds) at a true effect of 1.5 per-seed SD — {parts}."
    )


def claims_block(suite: dict | None, verdicts: dict[str, dict], titles: dict[str, str]) -> str:
    """The README's claims section body, from the published results only."""
    if suite is None:
        return "No suite has been published yet: run `normlab run --all --recheck`, then `scripts/publish_results.py`."
    n = len(suite["claims"])
    counts = ", ".join(f"{k}: {v}" for k, v in suite["counts"].items())
    rechecked = [v for v in verdicts.values() if v.get("recheck")]
    same = sum(1 for v in rechecked if v["recheck"].get("same_parts") and v["recheck"].get("same_claim"))
    same_claim = sum(1 for v in rechecked if v["recheck"].get("same_claim"))
    m = suite["machine"]
    lines = [
        f"Measured by `normlab run --all` (scale {suite['scale']}, {suite['executor']} executor, "
        f"{suite.get('workers') or m.get('cores')} worker processes, 1 thread per run) on {suite['time'][:10]}, on "
        f"{m.get('cores')} cores ({m.get('cpu')}), at git {str(suite.get('git_revision'))[:12]}: {n} claims in "
        f"**{suite['wall_time'] / 60:.1f} minutes** — {counts}. Rechecked from scratch with 2 threads per run "
        f"(`normlab run <claim> --recheck`): {same_claim} of {len(rechecked)} claims reached the same verdict, "
        f"{same} of them the same decision in every part. "
        f"Intervals are 95 % (the decisions use the Holm/Bonferroni-adjusted level stored beside them); "
        f"effects of log-scale parts are ratios (×).",
        "",
        _power_line(),
        "",
        "| | claim | verdict | deciding parts: effect [95 % interval] (margin δ) → decision | seeds | time | recheck "
        "| figures |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for entry in suite["claims"]:
        v = verdicts.get(entry["experiment"])
        if v is None:
            continue
        deciding = "<br>".join(_part_text(p) for p in v["parts"] if p["decides"])
        figs = " ".join(
            f"[{Path(f).stem}]({FIGURE_LINK}/{v['experiment']}/{Path(f).name})" for f in v.get("figures", [])
        )
        lines.append(
            f"| {v['claim']} | {_cell(titles.get(v['experiment'], v['title']))} | **{v['status']}**{_what_decides(v)} "
            f"| {deciding} "
            f"| {v['seeds']} | {v['wall_time']:.0f} s | {_recheck_text(v)} | {figs} |"
        )
    return "\n".join(lines)


def claims_document(verdicts: dict[str, dict]) -> str:
    """docs/CLAIMS.md: every registered claim's pre-registration and declared parts, with its measured verdict."""
    from normlab.lab.experiments import experiment_names, get_experiment

    out = [
        "# The claims normlab tests",
        "",
        "Generated by `scripts/publish_results.py` from the registered experiments (their pre-registrations and",
        "declared parts, in `src/normlab/lab/experiments/`) and the published results in `docs/results/`. Each",
        "claim comes from one of five short reference articles on Batch Normalization (in Chinese), cited as",
        "S0–S4: S0 derives BN from the gradient's Lipschitz constant; S1 reports experiments on learning rate,",
        "batch size and dropout; S2 gives the BN/LN algorithms and from-scratch code; S3 covers internal covariate",
        "shift, EMA momentum, BN vs LN and shuffling; S4 summarises De & Smith (2020) on residual networks and",
        "SkipInit. The verdict rule is in `src/normlab/lab/experiments/verdicts.py`.",
        "",
    ]
    for name in experiment_names(include_examples=False):
        exp = get_experiment(name)
        cfg = exp.config_for("quick")
        out += [f"## {exp.claim} `{name}` — {exp.title}", "", exp.preregistration, ""]
        out += [
            "| part | role | says | metric | arms | direction | margin δ | why δ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in exp.declared_parts(cfg):
            margin = f"×{p.margin:g}" if p.log else f"±{p.margin:g}"
            arms = f"{p.arm_a} vs {p.arm_b}" + (", paired by seed" if p.paired and p.b is not None else "")
            out.append(
                f"| `{p.name}` | {'decides' if p.decides else 'reported'} | {_cell(p.says)} | {_cell(p.metric)} "
                f"| {_cell(arms)} | {p.direction} | {margin} | {_cell(p.why)} |"
            )
        v = verdicts.get(name)
        if v is None:
            out += ["", "Not measured in the published suite.", ""]
            continue
        out += ["", f"**Measured ({v['scale']}, {v['seeds']} seeds): {v['status']}.**"]
        if v.get("finding"):
            out.append(v["finding"])
        out += [""] + [f"- {_part_text(p)}" for p in v["parts"]] + [""]
    return "\n".join(out).rstrip() + "\n"


def _fill(text: str, begin: str, end: str, block: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def _readme_with(claims: str, bench: str) -> str:
    return _fill(_fill((REPO / "README.md").read_text(), BEGIN, END, claims), BENCH_BEGIN, BENCH_END, bench)


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target(met: bool) -> str:
    return "**met**" if met else "**not met**"


def bench_block() -> str:
    """The README's benchmark section body: the stored `make bench` measurements and the targets they meet."""
    layers_path, tuned_path, train_path = BENCH / "layers.json", BENCH / "layers-tuned.json", BENCH / "train.json"
    if not layers_path.is_file():
        return "No benchmark has been stored yet: run `make bench`, then `scripts/publish_results.py --regenerate`."
    layers = json.loads(layers_path.read_text())
    out = [
        f"Measured by `make bench` on {layers['meta']['time'][:10]} (`python benchmarks/bench_layers.py --json "
        "docs/bench/layers.json`, the same with `--tuned-malloc`, and `benchmarks/bench_train.py`); the numbers "
        "below are read from `docs/bench/`.",
        "",
        "**Default allocator** (`benchmarks/bench_layers.py`):",
        "",
        _bench_module("bench_layers").tables(layers),
    ]
    ratio = {r["name"] + " " + "×".join(map(str, r["shape"])): r["normlab"] / r["torch"] for r in layers["layers"]}
    tiny = next(r for r in layers["tiny"] if r["name"] == "BatchNorm2d")
    steps = {r["name"]: r["normlab"] / r["torch"] for r in layers["steps"]}
    lab = [v for k, v in steps.items() if k.startswith("lab-style")]
    compiled = [v for k, v in steps.items() if k.startswith("torch.compile")]
    peak = [r for r in layers["layers"] if r["name"].startswith(("LayerNorm", "GroupNorm"))]
    cl16 = ratio.get("BatchNorm2d channels-last 32×16×64×64")
    out += [
        "",
        "Against the operators issue's targets (computed from the same file):",
        "",
        f"* tiny BatchNorm2d step ≤ 1.3× torch: {tiny['normlab'] / tiny['torch']:.2f}× — "
        f"{_target(tiny['normlab'] / tiny['torch'] <= 1.3)}",
        f"* lab-style training step ≤ 1.05× (BN, GN, LN): {', '.join(f'{v:.2f}×' for v in lab)} — "
        f"{_target(all(v <= 1.05 for v in lab))}",
        f"* LayerNorm/GroupNorm peak memory ≤ torch's: "
        f"{', '.join('{:.2f} vs {:.2f} MiB'.format(r['normlab_peak'], r['torch_peak']) for r in peak)} — "
        f"{_target(all(r['normlab_peak'] <= r['torch_peak'] for r in peak))}",
    ]
    if cl16 is not None:
        out.append(f"* channels-last 16-channel BatchNorm ≤ 1.1×: {cl16:.2f}× — {_target(cl16 <= 1.1)}")
    if compiled:
        out.append(f"* `torch.compile`d small CNN: {compiled[0]:.2f}× the compiled torch.nn model")
    if tuned_path.is_file():
        tuned = json.loads(tuned_path.read_text())
        out += ["", "**Tuned allocator** (`--tuned-malloc`):", "", _bench_module("bench_layers").tables(tuned)]
    if train_path.is_file():
        out += ["", "**Training epoch** (`benchmarks/bench_train.py`):", ""]
        out.append(_bench_module("bench_train").table(json.loads(train_path.read_text())))
    return "\n".join(out).rstrip()


def _titles() -> dict[str, str]:
    from normlab.lab.experiments import experiment_names, get_experiment

    return {n: get_experiment(n).title for n in experiment_names(include_examples=False)}


def publish(root: Path) -> None:
    suite = json.loads((root / "suite.json").read_text())
    if RESULTS.is_dir():
        shutil.rmtree(RESULTS)
    RESULTS.mkdir(parents=True)
    (RESULTS / "suite.json").write_text(json.dumps(suite, indent=1) + "\n")
    for entry in suite["claims"]:
        name = entry["experiment"]
        v = json.loads((root / name / "verdict.json").read_text())
        (RESULTS / f"{name}.json").write_text(json.dumps(v, indent=1) + "\n")
        dest = FIGURES / name
        if dest.is_dir():
            shutil.rmtree(dest)
        old = FIGURES / f"{name}.png"  # the layout before figures had a folder per experiment
        if old.is_file():
            old.unlink()
        dest.mkdir(parents=True)
        for f in v.get("figures", []):
            shutil.copyfile(root / name / f, dest / Path(f).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs"), help="the run store to publish (default: runs)")
    ap.add_argument("--check", action="store_true", help="only check that README.md and docs/CLAIMS.md are current")
    ap.add_argument("--regenerate", action="store_true", help="rewrite README.md and docs/CLAIMS.md from docs/results")
    args = ap.parse_args(argv)
    if not (args.check or args.regenerate):
        publish(args.root)
    suite, verdicts = _load_results()
    readme = _readme_with(claims_block(suite, verdicts, _titles()), bench_block())
    claims = claims_document(verdicts)
    if args.check:
        stale = [p for p, text in ((REPO / "README.md", readme), (REPO / "docs" / "CLAIMS.md", claims))
                 if not p.is_file() or p.read_text() != text]  # fmt: skip
        if stale:
            print(f"out of date: {', '.join(str(p.relative_to(REPO)) for p in stale)}; run scripts/publish_results.py")
            return 1
        return 0
    (REPO / "README.md").write_text(readme)
    (REPO / "docs" / "CLAIMS.md").write_text(claims)
    print(f"published {len(verdicts)} verdicts into {RESULTS.relative_to(REPO)}/, README.md and docs/CLAIMS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
