"""The report: built from a small run store written by the real framework, checked for content, images and links."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import statistics
import types
from html.parser import HTMLParser
from pathlib import Path

import _report_store as fake
import pytest

from normlab.lab.experiments import experiment_names, get_experiment
from normlab.lab.experiments import framework as base
from normlab.lab.experiments.verdicts import part_cells
from normlab.lab.report import NOT_RUN, ReportError, build_report, collect, report_main
from normlab.lab.store import RunStore, read_json

PNG = b"\x89PNG\r\n\x1a\n"
STATUS_WORDS = ("holds", "does not hold", "inconclusive", NOT_RUN)


class Page(HTMLParser):
    """The parts of the report a test reads: every tag, the overview rows (cell texts) and each section's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self.sections: dict[str, list[str]] = {}
        self.styles: list[str] = []
        self.texts: list[str] = []
        self._overview = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._section: str | None = None
        self._style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "table" and "overview" in a.get("class", "").split():
            self._overview = True
        elif self._overview and tag == "tr":
            self._row = []
        elif self._overview and tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "section" and a.get("id"):
            self._section = a["id"]
            self.sections[self._section] = []
        elif tag in ("style", "script"):
            self._style = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._overview = False
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row.append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None
        elif tag == "section":
            self._section = None
        elif tag in ("style", "script"):
            self._style = False

    def handle_data(self, data):
        if not self._style:
            self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section].append(data)
        if self._style:
            self.styles.append(data)  # style sheets and scripts: not text

    def row(self, name: str) -> list[str]:
        hits = [r for r in self.rows if r[1].split(" ")[0] == name]
        assert len(hits) == 1, f"expected one overview row for {name!r}, found {len(hits)}: {self.rows}"
        return hits[0]

    def section(self, name: str) -> str:
        key = "exp-" + re.sub(r"[^a-z0-9_-]+", "-", name.lower())
        assert key in self.sections, f"no section {key!r}; sections: {list(self.sections)}"
        return " ".join(" ".join(self.sections[key]).split())

    def images(self) -> list[dict]:
        return [a for t, a in self.tags if t == "img"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fake claims registered, a store made by ``run_experiment`` (plus smoke-example), and the report built."""
    with pytest.MonkeyPatch.context() as mp:
        fakes = fake.registered_fakes(mp)
        root = fake.make_store(tmp_path_factory.mktemp("report") / "runs")
        html_path = build_report(root)
        yield types.SimpleNamespace(
            root=root, html_path=html_path, html=html_path.read_text(encoding="utf-8"),
            page=Page(html_path.read_text(encoding="utf-8")), md=html_path.with_suffix(".md"), fakes=fakes, mp=mp,
        )  # fmt: skip


def _stored_verdict(root: Path, name: str) -> dict | None:
    p = root / name / "verdict.json"
    return read_json(p) if p.is_file() else None


# --------------------------------------------------------------------------- the overview


def test_report_is_written_next_to_the_store_with_a_markdown_summary(built):
    assert built.html_path == built.root / "report.html"
    assert built.html.startswith("<!DOCTYPE html>") and built.html.rstrip().endswith("</html>")
    assert built.md.is_file() and built.md.name == "report.md"


def test_every_registered_claim_is_in_the_overview_with_its_stored_verdict_or_not_run(built):
    claims = experiment_names(include_examples=False)
    assert {"report-fake-holds", "report-fake-notrun"} <= set(claims)
    statuses = set()
    for name in claims:
        exp = get_experiment(name)
        row = built.page.row(name)
        assert row[0] == exp.claim
        verdict = _stored_verdict(built.root, name)
        expected = verdict["status"] if verdict else NOT_RUN
        assert row[2] == expected, (name, row)
        statuses.add(expected)
        if verdict is None:
            assert row[4] == "—" and row[5] == f"normlab run {name} --scale quick"
    # the store was made so that every kind of verdict is on the page
    assert statuses >= set(STATUS_WORDS)
    # claims in claim order, then the example that has stored runs
    order = [r[1].split(" ")[0] for r in built.page.rows]
    assert order[: len(claims)] == claims and order[len(claims) :] == ["smoke-example"]


def test_overview_effects_and_intervals_are_recomputed_from_the_stored_runs(built):
    from scipy import stats

    table = RunStore(built.root).table()
    for name, part in (("report-fake-holds", "bn-better"), ("report-fake-fails", "bn-better"),
                       ("report-fake-unsure", "bn-better"), ("smoke-example", "bn-not-worse")):  # fmt: skip
        row = built.page.row(name)
        v = _stored_verdict(built.root, name)
        (p,) = [p for p in v["parts"] if p["name"] == part]
        mine = [r for r in table if r["experiment"] == name]
        by_seed = {norm: {r["seed"]: r["final_test_acc"] for r in mine if r["norm"] == norm}
                   for norm in ("bn", "none", "batchnorm")}  # fmt: skip
        a, b = (by_seed["bn"], by_seed["none"]) if by_seed["bn"] else (by_seed["batchnorm"], by_seed["none"])
        seeds = sorted(a)[: v["seeds"]]
        diffs = [a[s] - b[s] for s in seeds]
        assert p["effect"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
        ci = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(p["level"])
        assert p["ci"] == pytest.approx([ci.low, ci.high], abs=1e-12)
        c = part_cells(p)
        assert f"{part}: {c['effect']} {c['interval']} → {c['decision']}" in row[3]


def test_overview_gives_scale_seeds_and_the_command_from_the_verdict(built):
    for name in ("report-fake-holds", "smoke-example"):
        v = _stored_verdict(built.root, name)
        row = built.page.row(name)
        assert row[4] == f"{v['scale']} · {v['seeds']} seeds"
        assert row[5] == v["command"] and row[5].startswith(f"normlab run {name} --scale smoke")


# --------------------------------------------------------------------------- figures


def _data_uri_pngs(page: Page) -> list[bytes]:
    out = []
    for img in page.images():
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def test_every_stored_figure_is_embedded_as_a_decodable_png_equal_to_the_file(built):
    from PIL import Image

    stored = []
    for name in experiment_names():
        v = _stored_verdict(built.root, name)
        stored += [built.root / name / f for f in (v or {}).get("figures", [])]
    assert len(stored) == 9  # fake-holds 2, fake-fails 1, fake-unsure 1, smoke-example 1, and four forest plots
    embedded = _data_uri_pngs(built.page)
    assert len(embedded) == len(stored)
    assert sorted(embedded) == sorted(p.read_bytes() for p in stored)
    for data, img in zip(embedded, built.page.images()):
        assert data.startswith(PNG)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (int(img["width"]), int(img["height"])) and min(im.size) > 50
        assert img.get("alt")


def test_matplotlib_reads_the_embedded_figures_too(built):
    import matplotlib.image as mpimg

    for data in _data_uri_pngs(built.page):
        arr = mpimg.imread(io.BytesIO(data), format="png")
        assert arr.ndim == 3 and arr.shape[0] > 50 and arr.std() > 0.01  # not a blank image


# --------------------------------------------------------------------------- self-contained


_RESOURCE_ATTRS = ("src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href")


def test_no_reference_to_any_external_resource(built):
    page = built.page
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed", "video", "audio", "source", "base", "frame"), tag
        if tag == "script":
            assert "src" not in attrs
        for k in _RESOURCE_ATTRS:
            v = attrs.get(k, "").strip().lower()
            assert not re.match(r"^(https?:|ftp:|wss?:|//)", v), (tag, k, v[:80])
        assert "url(" not in attrs.get("style", "")
    css = "".join(page.styles)
    assert "@import" not in css and not re.search(r"url\(\s*['\"]?(?!data:)", css)
    # a web address may appear only as text (e.g. a citation in a docstring), never as something to load
    text = "".join(page.texts)
    for scheme in ("http://", "https://"):
        assert built.html.count(scheme) == text.count(scheme)
    csp = [
        a["content"]
        for t, a in page.tags
        if t == "meta" and a.get("http-equiv", "").lower() == "content-security-policy"
    ]
    assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]


def test_relative_links_all_point_to_existing_run_files(built):
    base_dir = built.html_path.parent
    links = [a["href"] for t, a in built.page.tags if t == "a" and "href" in a and not a["href"].startswith("#")]
    assert links
    for href in links:
        assert not href.startswith(("/", "file:")), href
        target = (base_dir / href).resolve()
        assert target.exists(), href
    # every run of a verdict links to its four files
    v = _stored_verdict(built.root, "report-fake-holds")
    for rid in v["runs"]:
        for f in ("config.json", "env.json", "metrics.json", "result.json"):
            assert f"report-fake-holds/{rid}/{f}" in links


def test_internal_anchors_resolve(built):
    ids = {a["id"] for _, a in built.page.tags if "id" in a}
    for t, a in built.page.tags:
        if t == "a" and a.get("href", "").startswith("#"):
            assert a["href"][1:] in ids, a["href"]


# --------------------------------------------------------------------------- sections


def test_each_section_shows_what_was_measured_config_environment_and_verdict(built):
    for name in ("report-fake-holds", "report-fake-fails", "report-fake-unsure", "smoke-example"):
        text = built.page.section(name)
        v = _stored_verdict(built.root, name)
        exp = get_experiment(name)
        assert v["summary"] in text
        assert " ".join(exp.title.split()) in text
        for key in v["config"]:
            assert key in text
        run = RunStore(built.root).find(f"{name}/{v['runs'][0]}")
        env = run.env()
        for key in ("torch", "numpy", "python", "threads", "device", "git_revision"):
            assert f"{key} {env[key]}" in text, (name, key)
        assert f"{len(v['runs'])} run folder(s)" in text


def test_a_section_for_a_claim_that_was_not_run_says_so_and_how_to_run_it(built):
    text = built.page.section("report-fake-notrun")
    assert "not run" in text and "normlab run report-fake-notrun --scale quick" in text
    assert "Fake claim that is registered but never run." in text


def test_each_section_shows_the_preregistration_and_every_part_against_its_margin(built):
    for name in ("report-fake-holds", "report-fake-fails", "report-fake-unsure"):
        text = built.page.section(name)
        v = _stored_verdict(built.root, name)
        assert "Pre-registration" in text and "Deciding part bn-better" in text
        assert v["preregistration"].startswith("Deciding part bn-better")
        for p in v["parts"]:  # the stored numbers, formatted once for every display
            c = part_cells(p)
            for key in ("part", "effect", "interval", "ci95", "margin", "n"):
                assert html.escape(c[key]) in text, (name, key)
            assert p["status"] in text
    holds = built.page.section("report-fake-holds")
    assert "as in the paper: BN 34.7 vs GN 24.1" in holds  # the source's number is part of the pre-registration
    assert "figures/parts.png" in json.dumps(_stored_verdict(built.root, "report-fake-holds")["figures"])


def test_smoke_verdicts_say_they_mean_nothing(built):
    assert "smoke scale: checks the plumbing only" in built.page.section("smoke-example")
    assert "smoke scale: checks the plumbing only" in built.page.section("report-fake-holds")


# --------------------------------------------------------------------------- markdown


def _md_text(md: str) -> str:
    """What CommonMark shows for text without markup: backslash escapes and HTML entities resolved."""
    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", md))


def test_markdown_summary_lists_every_claim_with_verdict_numbers_and_command(built):
    md = built.md.read_text(encoding="utf-8")
    for name in experiment_names(include_examples=False):
        v = _stored_verdict(built.root, name)
        status = v["status"] if v else NOT_RUN
        line = next(l for l in md.splitlines() if l.startswith("| ") and f"| {name} |" in l)
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # a table's cells: unescaped pipes
        assert cells[2] == f"**{status}**"
        if v:
            for p in v["parts"]:
                if p["decides"]:
                    c = part_cells(p)
                    assert f"{c['part']}: {c['effect']} {c['interval']} → {c['decision']}" in _md_text(cells[3])
            assert cells[5] == f"`{v['command']}`"
        else:
            assert cells[5] == f"`normlab run {name} --scale quick`"
        assert f"## {get_experiment(name).claim} {name}: {status}" in md
    # figures are linked by relative paths that exist
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 9  # five figures of the experiments and a forest plot of the parts for each of four
    for rel in images:
        assert (built.md.parent / rel).is_file() and (built.md.parent / rel).read_bytes().startswith(PNG)
    shown = {_md_text(l) for l in md.splitlines()}
    assert any(l.startswith("| bn-better | decides |") for l in shown) and "<summary>Pre-registration</summary>" in md


# --------------------------------------------------------------------------- reading only


def test_building_never_runs_analyses_or_plots(built, monkeypatch, tmp_path):
    import normlab.lab.train

    def forbidden(*a, **k):
        raise AssertionError("the report must only read the store")

    for mod, attr in (
        (normlab.lab.train, "train"),
        (base, "run_experiment"),
        (base, "analyse_stored"),
        (base, "sweep"),
    ):
        monkeypatch.setattr(mod, attr, forbidden)
    for k in fake.ALLOW_RUNNING:
        monkeypatch.setitem(fake.ALLOW_RUNNING, k, False)
    before = {
        p: p.stat().st_mtime_ns for p in built.root.rglob("*") if p.is_file() and not p.name.startswith("report.")
    }
    out = build_report(built.root, tmp_path / "again.html")
    assert Page(out.read_text(encoding="utf-8")).row("report-fake-holds")[2] == "holds"
    after = {p: p.stat().st_mtime_ns for p in built.root.rglob("*") if p.is_file() and not p.name.startswith("report.")}
    assert before == after  # the store is untouched
    assert out.with_suffix(".md").is_file()


def test_missing_figure_and_interrupted_sweep_are_reported_not_hidden(built, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(built.root, root)
    (root / "report-fake-holds" / "figures" / "accuracy.png").unlink()
    (root / "report-fake-fails" / "verdict.json").unlink()
    RunStore(root).save("train", {"lr": 0.1, "seed": 0}, {"final_test_acc": 0.5}, env={})  # a lone `normlab train` run
    some_run = next(p for p in sorted((root / "report-fake-fails").iterdir()) if (p / "result.json").is_file())
    (some_run / "result.json").unlink()
    page = Page(build_report(root).read_text(encoding="utf-8"))
    assert len(page.images()) == 6  # 9 stored, one deleted, one experiment (2 figures) without its verdict
    holds = page.section("report-fake-holds")
    assert "accuracy.png: file missing" in holds
    fails = page.row("report-fake-fails")
    assert fails[2] == NOT_RUN and "5 complete and 1 incomplete runs stored" in fails[3]
    assert "incomplete run folder" in page.section("report-fake-fails")
    other = " ".join(" ".join(page.sections["other-runs"]).split())
    assert "train/ 1 0" in other and "train" not in [r[1].split(" ")[0] for r in page.rows]


def test_only_some_experiments(built, tmp_path):
    out = build_report(built.root, tmp_path / "one.html", experiments=["C901", "smoke-example"])
    page = Page(out.read_text(encoding="utf-8"))
    assert [r[1].split(" ")[0] for r in page.rows] == ["report-fake-holds", "smoke-example"]
    with pytest.raises(ReportError, match="unknown experiment 'nope'"):
        build_report(built.root, tmp_path / "x.html", experiments=["nope"])


def test_a_store_with_nothing_run_still_lists_every_claim(built, tmp_path):
    (tmp_path / "empty").mkdir()
    data = collect(tmp_path / "empty")
    names = [e.name for e in data.entries]
    assert names == experiment_names(include_examples=False)
    assert all(e.status == NOT_RUN and not e.figures for e in data.entries)


# --------------------------------------------------------------------------- command line


def test_report_main_prints_the_path_and_fails_in_one_line_on_a_missing_store(built, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert report_main(["--root", str(built.root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(out) and out.is_file() and out.with_suffix(".md").is_file()

    missing = tmp_path / "no-such-store"
    assert report_main(["--root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-store" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(ReportError, match="does not exist"):
        build_report(missing)
    assert report_main(["--no-such-option"]) == 2
    assert "usage: normlab report" in capsys.readouterr().err
    assert not missing.exists()
    with pytest.raises(ReportError, match="must end in .html"):
        build_report(built.root, tmp_path / "page.txt")


def test_public_surface():
    import normlab.lab.report as report

    assert set(report.__all__) >= {"build_report", "report_main", "ReportError"}
    for name in report.__all__:
        assert hasattr(report, name)
    assert json.loads(json.dumps(report.__all__))  # plain names


# --------------------------------------------------------------------------- audit


def _audit_json() -> tuple[str, list[dict]]:
    """An audit of a tiny model with two pitfalls, by ``normlab.audit`` when it exists, else in its JSON format."""
    import importlib

    try:
        mod = importlib.import_module("normlab.audit")
    except ImportError:
        mod = None
    if mod is not None and hasattr(mod, "audit"):
        import torch.nn as nn

        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()  # a bias before BN; statistics never trained
        report = mod.audit(model)
        d = report.to_dict()
        assert d["findings"], "the audit found nothing in a model made to have pitfalls"
        return report.to_json(), d["findings"]
    findings = [
        {"check": "bias-before-norm", "severity": "info", "module": "0", "message": "the bias is removed by BN",
         "fix": "bias=False", "related": ["1"], "details": {}},
        {"check": "untrained-running-stats", "severity": "error", "module": "1", "message": "never trained",
         "fix": "normlab.recalibrate(model, batches)", "related": [], "details": {}},
    ]  # fmt: skip
    d = {"normlab_audit": 1, "model": "Sequential", "expect": "eval", "graph": "torch.fx", "batches": 0,
         "samples": 0, "summary": {"error": 1, "warning": 0, "info": 1}, "findings": findings, "notes": []}  # fmt: skip
    return json.dumps(d), findings


def test_stored_audit_results_get_a_section_only_when_normlab_audit_exists(built, tmp_path, monkeypatch):
    from normlab.lab.report import builder

    root = tmp_path / "runs"
    shutil.copytree(built.root, root)
    (root / "audit").mkdir()
    text, findings = _audit_json()
    (root / "audit" / "tiny.json").write_text(text, encoding="utf-8")
    monkeypatch.setattr(builder, "_audit_available", lambda: True)
    page = Page(build_report(root).read_text(encoding="utf-8"))
    audit = " ".join(" ".join(page.sections["audit"]).split())
    for f in findings:
        assert f["check"] in audit and " ".join(f["fix"].split()) in audit and (f["module"] or "(model)") in audit
        assert f["severity"] in audit
    assert "tiny.json" in audit and "Other stored runs" not in " ".join(page.sections.get("other-runs", []))
    assert "audit" not in [r[1].split(" ")[0] for r in page.rows]
    assert "tiny.json" in (root / "report.md").read_text(encoding="utf-8")

    monkeypatch.setattr(builder, "_audit_available", lambda: False)
    page = Page(build_report(root).read_text(encoding="utf-8"))
    assert "audit" not in page.sections
