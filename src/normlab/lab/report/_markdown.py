"""The report's Markdown summary: the overview table and one short section per experiment.

Figures are linked (relative paths to the PNGs in the run store), not
embedded: the Markdown file is for reading in a repository browser or a
terminal; the HTML page is the one to mail.
"""

from __future__ import annotations

import re
from pathlib import Path

from normlab.lab.experiments.verdicts import part_cells
from normlab.lab.report._html import _href
from normlab.lab.report.builder import ReportData

__all__ = ["render_markdown"]


# Markdown (CommonMark/GFM) passes raw HTML through and turns [text](url) into links, so every string that comes
# from an experiment or the store is escaped: HTML's three characters as entities; link brackets, emphasis
# asterisks, backticks, backslashes and table pipes with a backslash. Code spans cannot hold escapes; they are
# fenced with more backticks than the text holds (in a table a pipe is still escaped, even inside a code span).
_MD = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "`": "\\`", "*": "\\*", "[": "\\[", "]": "\\]",
     "|": "\\|"}
)  # fmt: skip


def _one_line(text: object) -> str:
    return " ".join(str("" if text is None else text).split())


def _cell(text: object) -> str:
    """``text`` on one line, escaped so that Markdown shows it literally (no HTML, links or emphasis)."""
    return _one_line(text).translate(_MD)


def _code(text: object, *, in_table: bool = False) -> str:
    """``text`` on one line as an inline code span that no backtick inside it can end."""
    body = _one_line(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", body)), default=0) + 1)
    if body.startswith("`") or body.endswith("`"):
        body = f" {body} "
    if in_table:
        body = body.replace("|", "\\|")
    return f"{fence}{body}{fence}"


def render_markdown(data: ReportData, base: Path, html_name: str = "report.html") -> str:
    """The summary as Markdown; links are relative to ``base`` (the folder it is written to).

    Every string read from the store or an experiment is escaped (:func:`_cell`, :func:`_code`): a title
    holding ``<script>`` or ``[x](javascript:...)`` shows as text in any Markdown renderer.
    """
    counts = data.counts()
    lines = [
        "# normlab report: claims, verdicts, figures",
        "",
        f"Built from the run store {_code(data.root)} only (nothing retrained) at {_cell(data.generated)} "
        f"by normlab {_cell(data.normlab_version)}. The full page with the figures embedded: "
        f"[{_cell(html_name)}]({_href(base / html_name, base)}).",
        "",
        "Claims: " + ", ".join(f"{_cell(s)}: {n}" for s, n in counts.items()) + ".",
        "",
    ]
    if data.registry_problem:
        lines += [f"> **Warning:** {_cell(data.registry_problem)}", ""]
    lines += [
        "| Claim | Experiment | Verdict | Deciding parts: effect [interval] → decision | Scale | Reproduce |",
        "|---|---|---|---|---|---|",
    ]
    for e in data.entries:
        scale = f"{e.scale}, {e.seeds} seeds" if e.verdict is not None else "—"
        cells = [part_cells(p) for p in e.parts if p.get("decides")]
        parts = "; ".join(f"{c['part']}: {c['effect']} {c['interval']} → {c['decision']}" for c in cells) or e.summary
        row = [_cell(e.label), _cell(e.name), f"**{_cell(e.status)}**", _cell(parts), _cell(scale)]
        lines.append("| " + " | ".join([*row, _code(e.command, in_table=True)]) + " |")
    for e in data.entries:
        lines += ["", f"## {_cell(e.label)} {_cell(e.name)}: {_cell(e.status)}", ""]
        if e.title:
            lines += [f"*{_cell(e.title.strip())}*", ""]
        lines += [f"- **Verdict:** {_cell(e.status)}" + (f" — {_cell(e.finding)}" if e.finding else "")]
        if not e.meaningful:
            lines.append("- **Smoke scale:** checks the plumbing only; this verdict means nothing about the claim")
        if e.verdict is not None:
            lines.append(
                f"- **Scale:** {_cell(e.scale)}, {_cell(e.seeds)} seed(s); {e.stored_complete} complete runs stored"
            )
        lines.append(f"- **Reproduce:** {_code(e.command)}")
        if e.recheck is not None:
            same = e.recheck.get("same_parts") and e.recheck.get("same_claim")
            lines.append(
                f"- **Recheck** ({e.recheck.get('threads')} threads): {'same' if same else 'DIFFERENT'} decisions"
            )
        if e.parts:
            lines += ["", "| part | role | effect | interval (level) | 95 % interval | δ | n | decision |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for p in e.parts:
                c = {k: _cell(v) for k, v in part_cells(p).items()}
                lines.append(
                    f"| {c['part']} | {c['role']} | {c['effect']} | {c['interval']} ({c['level']}) "
                    f"| {c['ci95']} | {c['margin']} | {c['n']} | {c['decision']} |"
                )
        if e.preregistration:  # a fenced block shows its text literally; the fence cannot be closed from inside
            fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", e.preregistration)), default=0))
            lines += ["", "<details><summary>Pre-registration</summary>", "", f"{fence}text", e.preregistration,
                      fence, "", "</details>"]  # fmt: skip
        for n in e.notes:
            lines.append(f"- *Note:* {_cell(n)}")
        for f in e.figures:
            if f.ok:
                lines += ["", f"![{_cell(e.label)} {_cell(e.name)}: {_cell(f.name)}]({_href(f.path, base)})"]
            else:
                lines += ["", f"*figure {_cell(f.path.name)}: {_cell(f.problem)}*"]
        if e.folder.is_dir():
            lines += ["", f"Run files: [{_cell(e.folder.name)}/]({_href(e.folder, base)}/)"]
    if data.audit:
        lines += ["", "## Audit", ""]
        for path, result in data.audit:
            n = (
                len(result.get("findings", []))
                if isinstance(result, dict) and isinstance(result.get("findings"), list)
                else None
            )
            found = f": {n} finding(s)" if n is not None else ""
            lines.append(f"- [{_cell(path.name)}]({_href(path, base)}){found}")
    if data.other:
        lines += ["", "## Other stored runs", ""]
        for name, done, todo in data.other:
            lines.append(f"- [{_cell(name)}/]({_href(data.root / name, base)}/): {done} complete, {todo} incomplete")
    return "\n".join(lines) + "\n"
