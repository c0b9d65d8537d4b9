"""The readable report, the JSON report, and CASES.md (all from the same case list)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from conformance._case import GROUPS, Case, Result, Verdict, When

CASES_MD = Path(__file__).with_name("CASES.md")
_WIDTH = {"id": 10, "group": 9}


def format_result(result: Result) -> str:
    case = result.case
    line = (
        f"{result.verdict.value.upper():<5} {case.id:<{_WIDTH['id']}} "
        f"{case.group:<{_WIDTH['group']}} {case.title}"
    )
    lines = [line]
    if result.detail:
        label = {"fail": "why", "skip": "skipped", "info": "measured"}.get(
            result.verdict.value, "note"
        )
        lines.append(f"      {label}: {result.detail}")
    lines.extend(f"      | {entry}" for entry in result.evidence)
    return "\n".join(lines)


def summary_counts(results: list[Result]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for group in GROUPS:
        in_group = [r for r in results if r.case.group == group]
        if not in_group:
            continue
        tally = Counter(r.verdict.value for r in in_group)
        counts[group] = {"cases": len(in_group)} | {v.value: tally.get(v.value, 0) for v in Verdict}
    return counts


def write_summary(results: list[Result], out: TextIO) -> None:
    counts = summary_counts(results)
    out.write(f"\n{'group':<10} {'cases':>5} {'pass':>5} {'fail':>5} {'skip':>5} {'info':>5}\n")
    totals: Counter[str] = Counter()
    for group, tally in counts.items():
        totals.update(tally)
        out.write(
            f"{group:<10} {tally['cases']:>5} {tally['pass']:>5} {tally['fail']:>5} "
            f"{tally['skip']:>5} {tally['info']:>5}\n"
        )
    out.write(
        f"{'total':<10} {totals['cases']:>5} {totals['pass']:>5} {totals['fail']:>5} "
        f"{totals['skip']:>5} {totals['info']:>5}\n"
    )
    failed = [r.case.id for r in results if r.verdict is Verdict.FAIL]
    out.write(f"\nconformance: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}\n")


def json_report(results: list[Result], header: dict[str, Any]) -> dict[str, Any]:
    return {
        **header,
        "passed": not any(r.verdict is Verdict.FAIL for r in results),
        "summary": summary_counts(results),
        "cases": [
            {
                "id": r.case.id,
                "group": r.case.group,
                "title": r.case.title,
                "verdict": r.verdict.value,
                "detail": r.detail,
                "evidence": r.evidence,
                "measurements": r.measurements,
                "seconds": r.seconds,
            }
            for r in results
        ],
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


def render_cases_markdown(cases: list[Case]) -> str:
    """CASES.md: every case's id and sentence, by group. Generated; do not edit by hand."""
    lines = [
        "# Conformance cases",
        "",
        "Generated from the code by `python -m conformance --write-cases`; do not edit.",
        "A test fails when this file is out of date.",
        "",
        "Marks: **hostile** — afterwards a fresh client must still be served correctly;",
        "**background** — runs from the start in its own thread (it waits for a server",
        "timeout); **last** — runs after every other case (it stops the server).",
        "",
    ]
    counts = Counter(c.group for c in cases)
    lines += ["| group | cases |", "|---|---|"]
    lines += [f"| {group} | {counts[group]} |" for group in GROUPS if counts[group]]
    lines.append(f"| total | {len(cases)} |")
    for group, prefix in GROUPS.items():
        in_group = [c for c in cases if c.group == group]
        if not in_group:
            continue
        lines += ["", f"## {group} ({prefix})", "", "| id | checks | marks |", "|---|---|---|"]
        for c in in_group:
            marks = ", ".join(
                mark
                for mark, on in (
                    ("hostile", c.hostile),
                    ("background", c.when is When.BACKGROUND),
                    ("last", c.when is When.LAST),
                )
                if on
            )
            lines.append(f"| {c.id} | {c.title} | {marks} |")
    return "\n".join(lines) + "\n"
