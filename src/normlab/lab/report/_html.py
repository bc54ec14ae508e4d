"""The report as one self-contained HTML page: inline CSS, a small optional script, figures as data URIs.

The page reads completely without JavaScript (the script only makes the
overview table sortable), loads nothing from anywhere (a Content-Security-Policy
meta tag forbids every fetch except ``data:`` images), and links to the run
files with paths relative to the page's folder.
"""

from __future__ import annotations

import html
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from normlab.lab.experiments.framework import split_preregistration
from normlab.lab.experiments.verdicts import part_cells
from normlab.lab.report.builder import NOT_RUN, Entry, Figure, ReportData, _fmt_num

__all__ = ["render_html", "CSS", "SCRIPT", "CSP"]

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

STATUS_ORDER = {"holds": 0, "does not hold": 1, "inconclusive": 2, NOT_RUN: 3}
STATUS_CLASS = {
    "holds": "st-holds",
    "does not hold": "st-fails",
    "inconclusive": "st-inconclusive",
    NOT_RUN: "st-notrun",
}

CSS = """
:root { --fg:#1d2330; --muted:#5b6473; --line:#d9dde3; --bg:#ffffff; --soft:#f5f7fa; --accent:#2856a3;
        --holds:#1e7a3c; --holds-bg:#e3f4e8; --fails:#b42318; --fails-bg:#fde8e6;
        --inc:#8a5a00; --inc-bg:#fff3d6; --notrun:#5b6473; --notrun-bg:#eceef1; }
* { box-sizing: border-box; }
html { font-size: 15px; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
       font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; }
.page { max-width: 1180px; margin: 0 auto; padding: 1.2rem 1.5rem 4rem; }
h1 { font-size: 1.7rem; margin: 0.3rem 0 0.4rem; }
h2 { font-size: 1.35rem; margin: 0 0 0.3rem; display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: baseline; }
h3 { font-size: 1.05rem; margin: 1.3rem 0 0.4rem; color: var(--fg); }
a { color: var(--accent); }
code, pre, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.88em; }
code { background: var(--soft); padding: 0.05em 0.3em; border-radius: 3px; }
pre { background: var(--soft); padding: 0.7rem; overflow-x: auto; border-radius: 4px; }
.lede { color: var(--muted); max-width: 60rem; margin: 0.2rem 0 0.8rem; }
.tally { display: flex; flex-wrap: wrap; gap: 0.5rem; list-style: none; padding: 0; margin: 0.5rem 0 1rem; }
.badge { display: inline-block; padding: 0.08rem 0.55rem; border-radius: 999px; font-weight: 600; font-size: 0.85rem;
         white-space: nowrap; border: 1px solid transparent; }
.st-holds { color: var(--holds); background: var(--holds-bg); border-color: #b7e0c3; }
.st-fails { color: var(--fails); background: var(--fails-bg); border-color: #f5c2bc; }
.st-inconclusive { color: var(--inc); background: var(--inc-bg); border-color: #f0d795; }
.st-notrun { color: var(--notrun); background: var(--notrun-bg); border-color: #d5d9df; }
nav.toc { border: 1px solid var(--line); border-radius: 6px; padding: 0.4rem 1rem; margin: 0 0 1.2rem;
          background: var(--soft); font-size: 0.92rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 0.4rem 0.55rem; border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-size: 0.9rem; white-space: nowrap; }
.scroll { overflow-x: auto; }
code.cmd { white-space: normal; }
code.cmd span { white-space: nowrap; }
table.overview .name { font-weight: 600; }
table.overview td:nth-child(2) { min-width: 13rem; }
table.overview .title { display: block; color: var(--muted); font-size: 0.88rem; }
table.overview .summary { font-size: 0.9rem; }
ul.nums { list-style: none; margin: 0.3rem 0 0; padding: 0; font-size: 0.85rem; color: var(--muted); }
ul.nums li { white-space: nowrap; }
.num { font-variant-numeric: tabular-nums; border-bottom: 1px dotted var(--muted); cursor: help; }
th button.sort { all: unset; cursor: pointer; font-weight: 700; }
th button.sort::after { content: " \\2195"; color: var(--muted); font-weight: 400; }
th[aria-sort="ascending"] button.sort::after { content: " \\2191"; }
th[aria-sort="descending"] button.sort::after { content: " \\2193"; }
section.exp { border-top: 3px solid var(--line); padding-top: 1.2rem; margin-top: 2.2rem; }
section.exp .title { color: var(--muted); margin: 0 0 0.6rem; }
p.verdict { font-size: 1.02rem; margin: 0.4rem 0; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1rem; margin: 0.6rem 0;
           font-size: 0.92rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.notes { border-left: 4px solid #f0d795; background: var(--inc-bg); padding: 0.4rem 0.8rem; margin: 0.6rem 0;
         font-size: 0.9rem; }
.notes ul { margin: 0; padding-left: 1.2rem; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 460px), 1fr)); gap: 1rem; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 0.5rem; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: 0.85rem; color: var(--muted); margin-top: 0.3rem; }
.missing { color: var(--fails); font-weight: 600; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr)); gap: 0 1.5rem; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; width: 1%; }
table.kv td { font-size: 0.9rem; word-break: break-word; }
.doc p { margin: 0.4rem 0; max-width: 60rem; }
details { margin: 0.6rem 0; }
details > summary { cursor: pointer; font-weight: 600; }
.doc h4 { margin: 0.8rem 0 0.2rem; font-size: 0.95rem; }
table.runs td { font-size: 0.85rem; }
table.parts td { font-size: 0.88rem; vertical-align: top; }
table.parts td.says { color: var(--muted); max-width: 22rem; }
pre.prereg { white-space: pre-wrap; font-size: 0.86rem; background: var(--soft); padding: 0.6rem 0.8rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: 0.85rem; }
@media (max-width: 700px) { .page { padding: 0.8rem; } html { font-size: 14px; } }
@media print { nav.toc, th button.sort::after { display: none; } details { display: block; } }
"""

SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-sort');
    if (v === null) v = cell.textContent.trim();
    return /^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$/.test(v) ? parseFloat(v) : v.toLowerCase();
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      var button = document.createElement('button');
      button.type = 'button';
      button.className = 'sort';
      button.title = 'sort by this column';
      button.textContent = th.textContent;
      th.textContent = '';
      th.appendChild(button);
      th.setAttribute('aria-sort', 'none');
      button.addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.setAttribute('aria-sort', 'none'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (typeof x !== typeof y) { x = String(x); y = String(y); }
          var c = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _href(path: Path, base: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return quote(Path(rel).as_posix(), safe="/._-~")


def _inline(text: str) -> str:
    """Escape, then ``code``, **strong** and *emphasis* (docstrings are reStructuredText-ish)."""
    out = _e(text)
    out = re.sub(r":[a-z]+:`~?([^`\n]+?)`", r"``\1``", out)  # :func:`~a.b` and friends
    codes: list[str] = []

    def keep(m: re.Match) -> str:
        codes.append(m.group(1))
        return f"\x00{len(codes) - 1}\x00"

    out = re.sub(r"``(.+?)``", keep, out)
    out = re.sub(r"(?<![`\w])`([^`\n]+?)`(?!`)", keep, out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"\x00(\d+)\x00", lambda m: f"<code>{codes[int(m.group(1))]}</code>", out)


def _doc_html(text: str) -> str:
    """A docstring as paragraphs, bullet lists and literal blocks (after ``::``)."""
    text = inspect.cleandoc(text or "")
    if not text:
        return ""
    blocks = re.split(r"\n\s*\n", text)
    parts: list[str] = []
    literal_next = False
    for block in blocks:
        lines = block.splitlines()
        if literal_next:
            parts.append(f"<pre>{_e(inspect.cleandoc(block))}</pre>")
            literal_next = False
            continue
        if len(lines) >= 2 and re.fullmatch(r"\s*([-=~^])\1{2,}\s*", lines[1]):  # reST section title
            parts.append(f"<h4>{_inline(lines[0].strip())}</h4>")
            lines = lines[2:]
            block = "\n".join(lines)
            if not lines:
                continue
        if block.rstrip().endswith("::"):
            literal_next = True
            block = block.rstrip()[:-1]
            lines = block.splitlines()
        if lines and re.match(r"^\s*[*-] ", lines[0]):
            items: list[str] = []
            for line in lines:
                m = re.match(r"^\s*[*-] (.*)$", line)
                if m:
                    items.append(m.group(1))
                elif items:
                    items[-1] += " " + line.strip()
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return '<div class="doc">' + "".join(parts) + "</div>"


def _cmd(command: str) -> str:
    """A shell command that wraps only between words (copying it still gives plain spaces)."""
    return '<code class="cmd">' + " ".join(f"<span>{_e(w)}</span>" for w in command.split(" ")) + "</code>"


def _badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "st-notrun")}">{_e(status)}</span>'


def _value(v: Any) -> str:
    if v is None:
        return "<em>None</em>"
    if isinstance(v, float):
        return f'<span class="num" title="{_e(repr(v))}">{_e(_fmt_num(v, 4))}</span>' if math.isfinite(v) else _e(v)
    if isinstance(v, (dict, list)):
        return f"<code>{_e(json.dumps(v, default=str))}</code>"
    return _e(v)


def _scale(e: Entry) -> str:
    if e.verdict is None:
        return "—"
    seeds = e.seeds
    return _e(e.scale) + (f" · {_e(seeds)} seed{'s' if seeds != 1 else ''}" if seeds is not None else "")


def _claim_sort(e: Entry) -> str:
    if e.claim and e.claim[1:].isdigit():
        return str(int(e.claim[1:]))
    return "100000"


def _overview(data: ReportData) -> str:
    rows = []
    for e in data.entries:
        deciding = [part_cells(p) for p in e.parts if p.get("decides")]
        shown = "".join(
            f"<li>{_e(c['part'])}: {_e(c['effect'])} {_e(c['interval'])} → {_e(c['decision'])}</li>"
            for c in deciding[:4]
        )
        if len(deciding) > 4:
            shown += f'<li><a href="#{e.anchor}-parts">+{len(deciding) - 4} more</a></li>'
        rows.append(
            "<tr>"
            f'<td data-sort="{_claim_sort(e)}"><a href="#{e.anchor}">{_e(e.label)}</a></td>'
            f'<td><a class="name" href="#{e.anchor}">{_e(e.name)}</a><span class="title">{_e(e.title)}</span></td>'
            f'<td data-sort="{STATUS_ORDER.get(e.status, 9)}">{_badge(e.status)}</td>'
            f'<td><span class="summary">{_e(e.finding or ("" if e.verdict is not None else e.summary))}</span>'
            + (f'<ul class="nums">{shown}</ul>' if shown else "")
            + "</td>"
            f"<td>{_scale(e)}</td>"
            f"<td>{_cmd(e.command)}</td>"
            "</tr>"
        )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in (
            "Claim",
            "Experiment",
            "Verdict",
            "Deciding parts: effect [interval] → decision",
            "Scale",
            "Reproduce",
        )
    )
    return (
        '<section id="overview"><h2>Overview</h2>'
        '<div class="scroll"><table class="overview sortable">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _figure(f: Figure, base: Path, entry: Entry) -> str:
    cap = f'{_e(f.name)} — stored as <a href="{_href(f.path, base)}">{_e(f.path.name)}</a>'
    if not f.ok:
        missing = f'<p class="missing">figure {_e(f.path.name)}: {_e(f.problem)}</p>'
        return f"<figure>{missing}<figcaption>{cap}</figcaption></figure>"
    alt = f"{entry.label} {entry.name}: {f.name}"
    return (
        f'<figure><a href="{_href(f.path, base)}" title="open the stored PNG at full size">'
        f'<img src="{f.data_uri()}" width="{f.width}" height="{f.height}" alt="{_e(alt)}"></a>'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _kv(rows: list[tuple[str, str]]) -> str:
    return (
        '<table class="kv"><tbody>'
        + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )


def _config(e: Entry) -> str:
    if e.verdict is None or not isinstance(e.verdict.get("config"), dict):
        return "<p>No stored configuration (not run).</p>"
    rows = [(k, _value(v)) for k, v in e.verdict["config"].items()]
    overrides = e.verdict.get("overrides") or []
    rows.append(("overrides", _value(overrides) if overrides else "none"))
    rows.append(("device requested", _e(e.verdict.get("device"))))
    return _kv(rows)


def _environment(e: Entry) -> str:
    if not e.env:
        return "<p>No stored environment (no runs).</p>"
    rows = [
        (k, "<br>".join(_e(v) for v in vals) + (" <em>(differs across runs)</em>" if len(vals) > 1 else ""))
        for k, vals in e.env.items()
    ]
    if e.env_time:
        a, b = e.env_time
        rows.append(("run time (UTC)", _e(a if a == b else f"{a} … {b}")))
    if e.verdict is not None:
        rows.append(("verdict written", _e(f"{e.verdict.get('time')} at git {e.verdict.get('git_revision')}")))
    return _kv(rows)


def _runs(e: Entry, base: Path) -> str:
    if not e.runs:
        return ""
    cols = e.varying[:6]
    head = "<th>run</th><th>seed</th>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "<th>files</th>"
    body = []
    for r in e.runs:
        if not r.exists:
            files = '<span class="missing">missing from the store</span>'
        else:
            files = " ".join(f'<a href="{_href(p, base)}">{_e(p.stem)}</a>' for p in r.files)
            if not r.complete:
                files += ' <span class="missing">(incomplete)</span>'
        run = (
            f'<a href="{_href(r.path, base)}/" class="mono">{_e(r.run_id)}</a>'
            if r.exists
            else f'<span class="mono">{_e(r.run_id)}</span>'
        )
        body.append(
            f"<tr><td>{run}</td><td>{_e(r.seed)}</td>"
            + "".join(f"<td>{_value(r.params.get(c))}</td>" for c in cols)
            + f"<td>{files}</td></tr>"
        )
    more = f" (the first {len(cols)} of {len(e.varying)} varying settings shown)" if len(e.varying) > len(cols) else ""
    return (
        f"<details><summary>Raw run files: {len(e.runs)} run folder(s) under "
        f'<a href="{_href(e.folder, base)}/">{_e(e.folder.name)}/</a>{_e(more)}</summary>'
        f'<div class="scroll"><table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        "</div></details>"
    )


def _parts(e: Entry) -> str:
    if not e.parts:
        return "<p>This verdict stores no parts (made by an older normlab).</p>" if e.verdict is not None else ""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("part", "what it says", "role", "effect", "interval (level)", "95 % interval", "margin δ", "n",
                  "decision")
    )  # fmt: skip
    body = []
    for p in e.parts:
        c = part_cells(p)
        body.append(
            f'<tr><td><strong>{_e(c["part"])}</strong></td><td class="says">{_e(c["says"])}</td>'
            f"<td>{_e(c['role'])}</td><td>{_e(c['effect'])}</td><td>{_e(c['interval'])} ({_e(c['level'])})</td>"
            f'<td>{_e(c["ci95"])}</td><td title="{_e(c["why"])}">{_e(c["margin"])}</td><td>{_e(c["n"])}</td>'
            f"<td>{_badge(p['status'])}{_e(c['decision'][len(p['status']) :])}</td></tr>"
        )
    why = "".join(
        f"<li><strong>{_e(p['name'])}</strong>: δ {_e(part_cells(p)['margin'])} — {_e(p.get('why_margin'))}</li>"
        for p in e.parts
    )
    v = e.verdict or {}
    rule = (
        f"<p>Rule: {_e(v.get('rule'))} (version {_e(v.get('rule_version'))}); α = {_e(v.get('alpha'))} split over "
        f"the looks {_e(v.get('looks'))}; this verdict stopped at {_e(v.get('seeds'))} seeds.</p>"
    )
    return (
        f'<div class="scroll"><table class="parts"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        f"</table></div>{rule}<details><summary>Why each margin</summary><ul>{why}</ul></details>"
    )


def _prereg(e: Entry) -> str:
    text = e.preregistration
    return f'<pre class="prereg">{_e(text)}</pre>' if text else "<p><em>No pre-registration stored.</em></p>"


def _recheck(e: Entry) -> str:
    r = e.recheck
    if r is None:
        return "not rechecked"
    same = "same decisions" if r.get("same_parts") and r.get("same_claim") else "DIFFERENT decisions"
    return _e(f"{same} when rerun from scratch with {r.get('threads')} thread(s) ({r.get('time')})")


def _section(e: Entry, base: Path) -> str:
    facts = [
        ("verdict", _badge(e.status)),
        ("scale", _scale(e)),
        (
            "runs stored",
            _e(
                f"{e.stored_complete} complete" + (f", {e.stored_incomplete} incomplete" if e.stored_incomplete else "")
            ),
        ),
        ("reproduce", _cmd(e.command)),
    ]
    if e.verdict is not None:
        facts.insert(2, ("recheck", _recheck(e)))
        if not e.meaningful:
            facts.insert(
                1, ("note", "<strong>smoke scale: checks the plumbing only; this verdict means nothing</strong>")
            )
    if not e.registered:
        facts.append(("registry", "<em>not registered in this normlab (shown from the store only)</em>"))
    parts = [
        f'<section class="exp" id="{e.anchor}">',
        f'<h2><span>{_e(e.label)}</span> <span class="mono">{_e(e.name)}</span> {_badge(e.status)}</h2>',
        f'<p class="title">{_e(e.title)}</p>',
        f'<p class="verdict"><strong>Verdict:</strong> {_e(e.finding or e.summary)}</p>',
        '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
    ]
    if e.notes:
        parts.append('<div class="notes"><ul>' + "".join(f"<li>{_e(n)}</li>" for n in e.notes) + "</ul></div>")
    if e.verdict is not None:
        parts.append("<h3>Figures</h3>")
        own = [f for f in e.figures if f.path.name != "parts.png"]
        forest = [f for f in e.figures if f.path.name == "parts.png"]
        if own:
            parts.append('<div class="figures">' + "".join(_figure(f, base, e) for f in own) + "</div>")
        else:
            parts.append("<p>No figure stored with this verdict.</p>")
        parts.append(f'<h3 id="{e.anchor}-parts">Parts of the claim</h3>' + _parts(e))
        parts.extend(_figure(f, base, e) for f in forest)
    parts.append("<h3>Pre-registration</h3>" + _prereg(e))
    parts.append(
        "<h3>What was measured</h3>"
        + (_doc_html(split_preregistration(e.description)[1]) or f"<p>{_e(e.title) or 'No description stored.'}</p>")
    )
    if e.verdict is not None or e.env:
        parts.append(
            '<div class="two"><div><h3>Config</h3>' + _config(e) + "</div>"
            "<div><h3>Environment</h3>" + _environment(e) + "</div></div>"
        )
    parts.append(_runs(e, base))
    if e.numbers:
        parts.append(
            "<details><summary>All numbers stored in verdict.json</summary>"
            f"<pre>{_e(json.dumps(e.numbers, indent=1, default=str))}</pre></details>"
        )
    parts.append("</section>")
    return "".join(parts)


_AUDIT_COLS = (
    ("severity", ("severity", "level")),
    ("module", ("module", "qualname", "name", "where")),
    ("check", ("check", "kind", "code", "rule", "title")),
    ("what it means", ("message", "what", "meaning", "detail", "description")),
    ("fix", ("fix", "remedy", "suggestion")),
)


def _audit(data: ReportData, base: Path) -> str:
    """Stored ``normlab audit --json`` results (``<root>/audit/*.json``): one table of findings per audited model."""
    if not data.audit:
        return ""
    out = [
        '<section class="exp" id="audit"><h2>Audit</h2>',
        "<p>Normalisation pitfalls found by <code>normlab audit</code> in the models whose results are stored "
        f"under <code>{_e(data.root.name)}/audit/</code>.</p>",
    ]
    for path, result in data.audit:
        findings = result.get("findings") if isinstance(result, dict) else result if isinstance(result, list) else None
        title = result.get("model") if isinstance(result, dict) and result.get("model") else path.stem
        out.append(
            f'<h3>{_e(title)} <span class="title">(<a href="{_href(path, base)}">{_e(path.name)}</a>)</span></h3>'
        )
        if isinstance(result, dict) and "expect" in result:
            counts = result.get("summary") if isinstance(result.get("summary"), dict) else {}
            tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no findings"
            out.append(
                f"<p>Audited for {_e(result.get('expect'))} (graph: {_e(result.get('graph'))}; "
                f"{_e(result.get('batches'))} batches, {_e(result.get('samples'))} samples): {_e(tally)}.</p>"
            )
        if isinstance(findings, list) and all(isinstance(f, dict) for f in findings):
            if findings:
                head = "".join(f"<th>{_e(c)}</th>" for c, _ in _AUDIT_COLS)
                rows = []
                for f in findings:
                    cells = [next((f[k] for k in keys if f.get(k) not in (None, "")), "") for _, keys in _AUDIT_COLS]
                    if cells[1] == "" and "module" in f:
                        cells[1] = "(model)"
                    sev = str(cells[0])
                    cls = {"error": "st-fails", "warning": "st-inconclusive"}.get(sev, "st-notrun")
                    rows.append(
                        f'<tr><td><span class="badge {cls}">{_e(sev)}</span></td>'
                        + "".join(f"<td>{_e(c)}</td>" for c in cells[1:])
                        + "</tr>"
                    )
                out.append(
                    f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                    f"<tbody>{''.join(rows)}</tbody></table></div>"
                )
            notes = result.get("notes") if isinstance(result, dict) else None
            if notes:
                out.append("<ul>" + "".join(f"<li>note: {_e(n)}</li>" for n in notes) + "</ul>")
        else:
            out.append(f"<pre>{_e(json.dumps(result, indent=1, default=str))}</pre>")
    out.append("</section>")
    return "".join(out)


def _other(data: ReportData, base: Path) -> str:
    if not data.other:
        return ""
    rows = "".join(
        f'<tr><td><a href="{_href(data.root / n, base)}/">{_e(n)}/</a></td><td>{done}</td><td>{todo}</td></tr>'
        for n, done, todo in data.other
    )
    return (
        '<section class="exp" id="other-runs"><h2>Other stored runs</h2>'
        "<p>Run folders in the store that belong to no registered experiment and have no verdict "
        "(e.g. single runs from <code>normlab train</code>).</p>"
        "<table><thead><tr><th>folder</th><th>complete runs</th><th>incomplete</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def render_html(data: ReportData, base: Path) -> str:
    """The whole page; links are relative to ``base`` (the folder the page is written to)."""
    counts = data.counts()
    tally = "".join(f"<li>{_badge(s)} {n}</li>" for s, n in counts.items())
    claims = sum(counts.values())
    extra = [("#audit", "Audit")] if data.audit else []
    extra += [("#other-runs", "Other stored runs")] if data.other else []
    nav = " · ".join(f'<a href="{h}">{t}</a>' for h, t in [("#overview", "Overview"), *extra])
    problem = f'<div class="notes"><ul><li>{_e(data.registry_problem)}</li></ul></div>' if data.registry_problem else ""
    store_link = f'<a href="{_href(data.root, base)}/">{_e(data.root)}</a>'
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="generator" content="normlab report">',
            "<title>normlab report: claims, verdicts, figures</title>",
            f'<style>{CSS}</style></head><body><div class="page">',
            "<header><h1>normlab report: claims, verdicts, figures</h1>",
            '<p class="lede">Each claim about normalization is a registered experiment that trained or probed real '
            "models, stored every run, drew its figure and stated a verdict — <strong>holds</strong>, "
            "<strong>does not hold</strong> or <strong>inconclusive</strong> (spread over seeds too wide) — "
            f"with mean ± sample std over seeds. This page was built from the run store {store_link} only "
            f"(nothing retrained) at {_e(data.generated)} by normlab {_e(data.normlab_version)}.</p>",
            f'<p>{claims} claim experiment(s) registered:</p><ul class="tally">{tally}</ul>',
            problem,
            "</header>",
            f'<nav class="toc" aria-label="contents">{nav} — each claim id and name in the overview links to its '
            "section.</nav>"
            if extra
            else "",
            "<main>",
            _overview(data),
            "".join(_section(e, base) for e in data.entries),
            _audit(data, base),
            _other(data, base),
            "</main>",
            "<footer>Figures are embedded as PNG data; links to run files are relative to this page's folder "
            "and work where the page sits next to its run store. Rebuild with <code>normlab report</code>.</footer>",
            f"</div><script>{SCRIPT}</script></body></html>\n",
        ]
    )
