"""The PASS / FAIL / SKIP report of ``train.py --test``, shared by the synthetic self-test (``selftest.py``) and the
check of the user's own run (``usercheck.py``).

A check that did not run (an optional dependency is missing, or an earlier check it needs failed) is reported as
SKIP with the reason, never as PASS; it does not fail the report by itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclasses.dataclass
class Check:
    """One line of the report. ``passed`` is False only for a failure; a skipped check has ``skipped`` set (and
    ``passed`` True, so that ``all(c.passed for c in checks)`` stays the verdict)."""

    name: str
    passed: bool
    detail: str
    skipped: bool = False

    @classmethod
    def skip(cls, name: str, reason: str) -> "Check":
        return cls(name, True, reason, skipped=True)

    @property
    def status(self) -> str:
        return SKIP if self.skipped else PASS if self.passed else FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def all_passed(checks: Sequence[Check]) -> bool:
    """The verdict: no check failed (skipped checks neither pass nor fail it)."""
    return all(check.passed for check in checks)


def format_report(title: str, checks: Sequence[Check], elapsed_s: float) -> str:
    """The printed report: a title, one ``STATUS  name  detail`` line per check, and the verdict with the time."""
    width = max([16, *(len(check.name) for check in checks)])
    rule = "-" * 60
    lines = ["", title, rule]
    indent = "\n" + " " * (len(PASS) + 2 + width + 1)  # a multi-line detail stays in its column
    for check in checks:
        detail = check.detail.replace("\n", indent)
        lines.append(f"{check.status}  {check.name:<{width}} {detail}")
    lines += [rule, f"{PASS if all_passed(checks) else FAIL} in {elapsed_s:.0f} s", ""]
    return "\n".join(lines)
