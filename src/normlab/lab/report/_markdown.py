"""The report's Markdown summary: the overview table and one short section per experiment.

Figures are linked (relative paths to the PNGs in the run store), not
embedded: the Markdown file is for reading in a repository browser or a
terminal; the HTML page is the one to mail.
"""

from __future__ import annotations

from pathlib import Path

from normlab.lab.experiments.verdicts import part_cells
from normlab.lab.report._html import _href
from normlab.lab.report.builder import ReportData

__all__ = ["render_markdown"]


def _cell(text: object) -> str:
    return " ".join(str("" if text is None else text).split()).replace("|", "\\|")


def render_markdown(data: ReportData, base: Path, html_name: str = "report.html") -> str:
    """The summary as Markdown; links are relative to ``base`` (the folder it is written to)."""
    counts = data.counts()
    lines = [
        "# normlab report: claims, verdicts, figures",
        "",
        f"Built from the run store `{data.root}` only (nothing retrained) at {data.generated} "
        f"by normlab {data.normlab_version}. The full page with the figures embedded: [{html_name}]({html_name}).",
        "",
        "Claims: " + ", ".join(f"{s}: {n}" for s, n in counts.items()) + ".",
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
        lines.append(
            f"| {_cell(e.label)} | {_cell(e.name)} | **{_cell(e.status)}** | {_cell(parts)} | {_cell(scale)} "
            f"| `{_cell(e.command)}` |"
        )
    for e in data.entries:
        lines += ["", f"## {e.label} {e.name}: {e.status}", ""]
        if e.title:
            lines += [f"*{e.title.strip()}*", ""]
        lines += [f"- **Verdict:** {e.status}" + (f" — {e.finding}" if e.finding else "")]
        if not e.meaningful:
            lines.append("- **Smoke scale:** checks the plumbing only; this verdict means nothing about the claim")
        if e.verdict is not None:
            lines.append(f"- **Scale:** {e.scale}, {e.seeds} seed(s); {e.stored_complete} complete runs stored")
        lines.append(f"- **Reproduce:** `{e.command}`")
        if e.recheck is not None:
            same = e.recheck.get("same_parts") and e.recheck.get("same_claim")
            lines.append(
                f"- **Recheck** ({e.recheck.get('threads')} threads): {'same' if same else 'DIFFERENT'} decisions"
            )
        if e.parts:
            lines += ["", "| part | role | effect | interval (level) | 95 % interval | δ | n | decision |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for p in e.parts:
                c = part_cells(p)
                lines.append(
                    f"| {_cell(c['part'])} | {c['role']} | {_cell(c['effect'])} | {_cell(c['interval'])} ({c['level']}) "
                    f"| {_cell(c['ci95'])} | {_cell(c['margin'])} | {c['n']} | {_cell(c['decision'])} |"
                )
        if e.preregistration:
            lines += ["", "<details><summary>Pre-registration</summary>", "", "```text", e.preregistration, "```",
                      "", "</details>"]  # fmt: skip
        for n in e.notes:
            lines.append(f"- *Note:* {n}")
        for f in e.figures:
            if f.ok:
                lines += ["", f"![{e.label} {e.name}: {f.name}]({_href(f.path, base)})"]
            else:
                lines += ["", f"*figure {f.path.name}: {f.problem}*"]
        if e.folder.is_dir():
            lines += ["", f"Run files: [{e.folder.name}/]({_href(e.folder, base)}/)"]
    if data.audit:
        lines += ["", "## Audit", ""]
        for path, result in data.audit:
            n = (
                len(result.get("findings", []))
                if isinstance(result, dict) and isinstance(result.get("findings"), list)
                else None
            )
            lines.append(f"- [{path.name}]({_href(path, base)})" + (f": {n} finding(s)" if n is not None else ""))
    if data.other:
        lines += ["", "## Other stored runs", ""]
        for name, done, todo in data.other:
            lines.append(f"- [{name}/]({_href(data.root / name, base)}/): {done} complete, {todo} incomplete")
    return "\n".join(lines) + "\n"
