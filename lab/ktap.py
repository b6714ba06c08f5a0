"""Parse the KTAP that guest programs print.

Only what the lab's programs emit is understood: a version line, a plan,
"ok/not ok N name [# directive]" lines and "# key: value" diagnostics.
Anything else (kernel messages that slipped into the console) is kept as
noise, not an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RESULT_RE = re.compile(
    r"^(?P<ok>ok|not ok) (?P<num>\d+) (?P<name>[^#]*?)\s*(?:#\s*(?P<dir>.*))?$"
)
PLAN_RE = re.compile(r"^1\.\.(?P<n>\d+)$")
DIAG_RE = re.compile(r"^# (?P<key>[A-Za-z0-9_]+): ?(?P<value>.*)$")


@dataclass(frozen=True)
class KtapResult:
    number: int
    name: str
    ok: bool
    directive: str = ""

    @property
    def skipped(self) -> bool:
        return self.directive.upper().startswith("SKIP")

    @property
    def reason(self) -> str:
        return (
            self.directive.split(None, 1)[1]
            if self.skipped and " " in self.directive
            else self.directive
        )


@dataclass
class KtapReport:
    version: str | None = None
    planned: int | None = None
    results: list[KtapResult] = field(default_factory=list)
    diagnostics: dict[str, str] = field(default_factory=dict)
    noise: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[KtapResult]:
        return [r for r in self.results if not r.ok]

    @property
    def complete(self) -> bool:
        """All planned results are present."""
        return self.planned is not None and len(self.results) == self.planned

    def problems(self) -> list[str]:
        """What is wrong with this report, one line a problem."""
        out = [f"not ok {r.number} {r.name}: {r.directive}" for r in self.failed]
        if self.version is None:
            out.append("no KTAP version line: the program did not start its report")
        elif self.planned is None:
            out.append("no plan line (1..N): the report is incomplete")
        elif not self.complete:
            out.append(f"planned {self.planned} results, got {len(self.results)}")
        return out


def parse_ktap(text: str) -> KtapReport:
    report = KtapReport()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("KTAP version") or line.startswith("TAP version"):
            report.version = line.split()[-1]
        elif m := PLAN_RE.match(line):
            report.planned = int(m["n"])
        elif m := RESULT_RE.match(line):
            report.results.append(
                KtapResult(
                    int(m["num"]),
                    m["name"].strip(),
                    m["ok"] == "ok",
                    (m["dir"] or "").strip(),
                )
            )
        elif m := DIAG_RE.match(line):
            report.diagnostics[m["key"]] = m["value"].strip()
        else:
            report.noise.append(raw)
    return report
