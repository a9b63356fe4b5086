#!/usr/bin/env python3
"""Checks that the metrics the code exports, the README's table and the monitoring files agree.

    python3 scripts/check-metrics.py

1. Every metric the Rust code registers (`metrics::counter!` / `gauge!` / `histogram!`,
   names as string literals or `const` names; test code excluded) is in README.md's
   `## Metrics` table, with the same type and labels, and the table lists nothing else.
2. Every metric queried by k8s/monitoring/grafana-dashboard.json (panel targets, template
   variables) and k8s/monitoring/alerts.yaml exists: a counter or gauge by its name, a
   histogram by `<name>_bucket`, `_sum` or `_count` (metrics-exporter-prometheus names series
   exactly as registered, adds no `_total`, and renders histograms with buckets because
   runtime/src/admin.rs sets them). Prometheus's own `up` is allowed.
3. The dashboard JSON and the rules YAML parse, and every alert rule has `alert`, `expr`.

Python 3.11 standard library; PyYAML is used for the rules (installed with pip --user if
missing). Exits 1 with a list of every problem found.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "k8s/monitoring/grafana-dashboard.json"
ALERTS = ROOT / "k8s/monitoring/alerts.yaml"
README = ROOT / "README.md"
# Crates whose code runs in the exported processes (bench, fuzz, e2e are not).
CRATES = ["runtime", "gateway", "chat-svc", "presence-svc", "signaling-svc", "huddle-svc",
          "push-svc", "quckchat"]
# Series Prometheus makes itself, not the code.
BUILTIN_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

problems: list[str] = []


# ---------------------------------------------------------------- the Rust code


def strip_test_modules(text: str) -> str:
    """The text with every `#[cfg(test)] mod … { … }` block blanked (braces matched, string
    and char literals and comments skipped)."""
    out = text
    for m in reversed(list(re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text))):
        end = matching_brace(text, m.end() - 1)
        out = out[: m.start()] + " " * (end - m.start()) + out[end:]
    return out


def matching_brace(text: str, open_at: int) -> int:
    depth, i, n = 0, open_at, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        raw = re.match(r'r(#*)"', text[i : i + 10]) if c == "r" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) else None
        if raw:
            close = '"' + raw.group(1)
            j = text.find(close, i + len(raw.group(0)))
            i = n if j < 0 else j + len(close)
            continue
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c == "'":
            lit = re.match(r"'(?:\\.|[^\\'])'", text[i : i + 5])
            if lit:
                i += len(lit.group(0))
                continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


MACRO = re.compile(r"\b(counter|gauge|histogram)!\s*\(\s*(?:\"([^\"]+)\"|([A-Za-z_][\w:]*))")
LABEL_KEY = re.compile(r"\"([A-Za-z_]\w*)\"\s*=>")
CONST = re.compile(r"\bconst\s+([A-Z_][A-Z0-9_]*)\s*:\s*&(?:'static\s+)?str\s*=\s*\"([^\"]+)\"")


def macro_args(text: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[open_paren + 1 : i]
    return text[open_paren + 1 :]


def exported_metrics() -> dict[str, dict]:
    """name -> {type, labels (set), where (list)}"""
    files = [p for crate in CRATES for p in (ROOT / crate / "src").rglob("*.rs")
             if not p.name.endswith("_tests.rs") and p.name != "testkit.rs"]
    texts = {p: strip_test_modules(p.read_text()) for p in files}
    consts = {name: value for t in texts.values() for name, value in CONST.findall(t)}
    found: dict[str, dict] = {}
    for path, text in texts.items():
        for m in MACRO.finditer(text):
            kind, literal, ident = m.groups()
            name = literal
            if name is None:
                name = consts.get(ident.split("::")[-1])
                if name is None:
                    line = text.count("\n", 0, m.start()) + 1
                    problems.append(f"{path.relative_to(ROOT)}:{line}: metric name `{ident}` is not a string "
                                    "literal or a `const NAME: &str` this script can resolve")
                    continue
            args = macro_args(text, text.index("(", m.start()))
            labels = set(LABEL_KEY.findall(args))
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            entry = found.setdefault(name, {"type": kind, "labels": set(), "where": []})
            if entry["type"] != kind:
                problems.append(f"{where}: `{name}` registered as a {kind} here, as a {entry['type']} at "
                                f"{entry['where'][0]}")
            entry["labels"] |= labels
            entry["where"].append(where)
    return found


# ---------------------------------------------------------------- README.md


def readme_table() -> dict[str, dict]:
    text = README.read_text()
    m = re.search(r"^## Metrics\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        problems.append("README.md has no `## Metrics` section")
        return {}
    rows: dict[str, dict] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`")
        rows[name] = {"type": cells[1].lower(), "labels": set(re.findall(r"`([A-Za-z_]\w*)`", cells[2]))}
    if not rows:
        problems.append("README.md's `## Metrics` section has no table rows (| `name` | type | labels | meaning |)")
    return rows


# ---------------------------------------------------------------- PromQL

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "le", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions (followed by `(`),
    keywords, label names inside `{…}` or grouping lists, numbers, durations or variables."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"#[^\n]*", " ", e)  # comments
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)", e):
        word = m.group(1)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def grafana_queries(dash) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, nested rows included."""
    out = []

    def panels(ps, path):
        for p in ps or []:
            title = p.get("title", "?")
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {title!r} target {t.get('refId', '?')}", t["expr"]))
            panels(p.get("panels"), path)

    panels(dash.get("panels"), "")
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        # label_values(<selector>, <label>) / query_result(<expr>) / metrics(<regex>)
        lv = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", q, re.S)
        if lv:
            q = lv.group(1)
        qr = re.match(r"\s*query_result\((.*)\)\s*$", q, re.S)
        if qr:
            q = qr.group(1)
        if q.strip() and not re.match(r"\s*(metrics|label_names)\(", q):
            out.append((f"variable ${v.get('name')}", q))
    return out


def load_yaml(path: Path):
    try:
        import yaml  # noqa: PLC0415
    except ImportError:
        print("check-metrics: PyYAML missing, installing it (pip --user)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--user", "pyyaml"], check=True)
        import site  # noqa: PLC0415
        sys.path.append(site.getusersitepackages())
        import yaml  # noqa: PLC0415
    with path.open() as f:
        return yaml.safe_load(f)


def alert_queries(doc) -> list[tuple[str, str]]:
    if not isinstance(doc, dict):
        problems.append(f"{ALERTS.relative_to(ROOT)}: not a mapping")
        return []
    groups = doc.get("spec", {}).get("groups") if doc.get("kind") == "PrometheusRule" else doc.get("groups")
    if not groups:
        problems.append(f"{ALERTS.relative_to(ROOT)}: no rule groups (spec.groups or groups)")
        return []
    out = []
    for g in groups:
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            if not name or not r.get("expr"):
                problems.append(f"{ALERTS.relative_to(ROOT)}: group {g.get('name')!r}: a rule without "
                                "alert/record or expr")
                continue
            out.append((f"rule {name}", str(r["expr"])))
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    code = exported_metrics()
    if not code:
        problems.append("no metrics found in the code: is the script looking in the right place?")
    table = readme_table()

    for name, m in sorted(code.items()):
        row = table.get(name)
        if row is None:
            problems.append(f"README.md#metrics: `{name}` ({m['type']}, {m['where'][0]}) is exported "
                            "but missing from the table")
            continue
        if row["type"] != m["type"]:
            problems.append(f"README.md#metrics: `{name}` is a {m['type']} in the code, "
                            f"{row['type']!r} in the table")
        if row["labels"] != m["labels"]:
            problems.append(f"README.md#metrics: `{name}` labels in the code {sorted(m['labels'])}, "
                            f"in the table {sorted(row['labels'])}")
    for name in sorted(set(table) - set(code)):
        problems.append(f"README.md#metrics: `{name}` is in the table but the code exports no such metric")

    def exists(series: str) -> bool:
        if series in BUILTIN_SERIES:
            return True
        m = code.get(series)
        if m is not None:
            return m["type"] != "histogram"  # a histogram has no bare series
        for suffix in HISTOGRAM_SUFFIXES:
            base = series.removesuffix(suffix)
            if base != series and code.get(base, {}).get("type") == "histogram":
                return True
        return False

    queries = []
    try:
        dash = json.loads(DASHBOARD.read_text())
        if "${DS_PROMETHEUS}" not in DASHBOARD.read_text():
            problems.append(f"{DASHBOARD.relative_to(ROOT)}: panels should use the ${{DS_PROMETHEUS}} datasource input")
        queries += [(f"{DASHBOARD.relative_to(ROOT)}: {w}", q) for w, q in grafana_queries(dash)]
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"{DASHBOARD.relative_to(ROOT)}: not valid JSON: {err}")
    try:
        queries += [(f"{ALERTS.relative_to(ROOT)}: {w}", q) for w, q in alert_queries(load_yaml(ALERTS))]
    except Exception as err:  # noqa: BLE001 - any parse error is the finding
        problems.append(f"{ALERTS.relative_to(ROOT)}: not valid YAML: {err}")

    queried = set()
    for where, q in queries:
        if q.count("(") != q.count(")") or q.count("{") != q.count("}"):
            problems.append(f"{where}: unbalanced brackets in {q!r}")
        names = promql_metric_names(q)
        if not names:
            problems.append(f"{where}: queries no metric: {q!r}")
        for series in sorted(names):
            queried.add(series)
            if not exists(series):
                hint = ""
                if series in code and code[series]["type"] == "histogram":
                    hint = " (a histogram: query _bucket, _sum or _count)"
                problems.append(f"{where}: queries `{series}`, which the code does not export{hint}")

    if problems:
        print(f"check-metrics: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check-metrics: ok: {len(code)} metrics in the code and README.md; {len(queries)} queries "
          f"({len(queried)} series) in the dashboard and alert rules all exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
