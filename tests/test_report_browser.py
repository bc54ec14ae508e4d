"""The report in a real browser: headless Chromium loads it from disk, every figure renders, nothing is fetched.

Chromium is Debian's ``chromium`` package; when it is missing, the test
set-up installs it (``scripts/ensure_chromium.sh``: ``apt-get update`` then
``apt-get install -y chromium``). The tests are skipped only when that is
impossible here (not root and no password-less sudo, or no apt-get).

Screenshots are written to ``$NORMLAB_SCREENSHOTS`` (default: this test's
temporary folder) and their paths printed.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import _browser
import _report_store as fake
import pytest

from normlab.lab.experiments import experiment_names
from normlab.lab.report import build_report
from normlab.lab.store import read_json

FIRST_SECTION_WITH_FIGURES = "section.exp:has(img)"


@pytest.fixture(scope="module")
def exe():
    try:
        return _browser.chromium()
    except _browser.ChromiumUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        fake.registered_fakes(mp)
        root = fake.make_store(tmp_path_factory.mktemp("report-browser") / "runs", smoke_example=False)
        figures = sum(len(read_json(p).get("figures", [])) for p in root.glob("*/verdict.json"))
        yield build_report(root), figures, experiment_names(include_examples=False)


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("NORMLAB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def loaded(exe, report):
    path, _, _ = report
    return _browser.load(exe, path.resolve().as_uri(), elements=(FIRST_SECTION_WITH_FIGURES,))


def _say(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def _image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_every_figure_loads_and_renders(loaded, report, shots_dir, capsys):
    from PIL import ImageChops, ImageStat

    path, n_figures, _ = report
    embedded = [base64.b64decode(u) for u in re.findall(r'<img src="data:image/png;base64,([^"]+)"', path.read_text())]
    top, full, section = (shots_dir / f"report-{k}.png" for k in ("top", "full", "section"))
    top.write_bytes(loaded.screenshot)
    full.write_bytes(loaded.full_screenshot)
    section.write_bytes(loaded.element_shots[FIRST_SECTION_WITH_FIGURES])
    _say(
        capsys, f"report screenshots: {top} (first screen), {section} (first section with figures), {full} (whole page)"
    )
    assert _image(loaded.screenshot).size == (1366, 860)
    assert _image(section.read_bytes()).size[1] > 300

    assert len(loaded.images) == len(embedded) == n_figures == 7  # 4 of the fakes, 3 forest plots
    assert loaded.broken_images == [], loaded.broken_images
    assert len(loaded.figure_shots) == n_figures
    for i, (img, shot) in enumerate(zip(loaded.images, loaded.figure_shots)):
        rendered = _image(shot).convert("L")
        # the figure's area of the page is not blank ...
        assert ImageStat.Stat(rendered).stddev[0] > 10, img["alt"]
        # ... and shows the stored figure: compare with the embedded PNG scaled to the rendered size
        original = _image(embedded[i]).convert("RGBA")
        flat = original.copy()
        flat.paste((255, 255, 255, 255), (0, 0) + original.size)
        flat.alpha_composite(original)
        expected = flat.convert("L").resize(rendered.size)
        diff = ImageStat.Stat(ImageChops.difference(rendered, expected)).mean[0]
        assert diff < 12, (img["alt"], diff)
    (shots_dir / "report-first-figure.png").write_bytes(loaded.figure_shots[0])


def test_the_page_makes_no_network_request_and_logs_no_error(loaded):
    assert loaded.requests and loaded.requests[0].startswith("file://")
    assert loaded.network_requests == []
    assert loaded.failed == []
    assert loaded.errors == []


def test_the_overview_is_sortable_with_javascript(loaded, report):
    _, _, claims = report
    check = loaded.sort_check
    assert check and check["buttons"] == 6
    ids = check["before"]
    assert ids[: len(claims)] == [c for c in ids if c.startswith("C")]
    numeric = sorted((c for c in ids if c.startswith("C")), key=lambda c: int(c[1:]))
    assert check["byClaim"][: len(numeric)] == numeric
    assert check["byClaimDesc"] == list(reversed(check["byClaim"]))
    order = ["holds", "does not hold", "inconclusive", "not run"]
    ranks = [order.index(v) for v in check["byVerdict"]]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4


def test_the_page_reads_fully_without_javascript(exe, report):
    path, n_figures, claims = report
    page = _browser.load(exe, path.resolve().as_uri(), javascript=False, screenshots=False)
    assert 'class="sort"' not in page.html  # the script really did not run
    assert page.broken_images == [] and len(page.images) == n_figures
    assert page.network_requests == []
    for name in claims:
        assert name in page.text
    for word in (
        "holds",
        "does not hold",
        "inconclusive",
        "not run",
        "Parts of the claim",
        "Pre-registration",
        "Environment",
        "Config",
    ):
        assert word in page.text


def test_the_harness_catches_broken_images_and_network_requests(exe, tmp_path):
    """The checks above can fail: a page with a missing file and a web image trips both."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>bad page</p>"
        '<img src="missing.png" alt="missing"><img src="https://normlab-report-test.invalid/x.png" alt="web">'
        "</body></html>",
        encoding="utf-8",
    )
    page = _browser.load(exe, bad.resolve().as_uri(), screenshots=False)
    assert [i["alt"] for i in page.broken_images] == ["missing", "web"]
    assert page.network_requests == ["https://normlab-report-test.invalid/x.png"]
