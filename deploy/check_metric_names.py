#!/usr/bin/env python3
"""Check that the PromQL in deploy/ only uses metrics chatd exports.

Reads the metric names (and label names) from src/metrics.rs, then every
PromQL expression in:

  deploy/prometheus/alerts.yml       (rule `expr:`)
  deploy/prometheus/alerts.test.yml  (`series:` and `expr:` of the tests; a
                                      misspelt series would make a "must not
                                      fire" test pass for the wrong reason)
  deploy/grafana/chatd.json          (panel targets, annotations, variables)

and exits 1, naming the file, the unknown name and the expression, if any
metric or label is not one chatd exports. Histograms are exported as
`<name>_bucket`, `<name>_sum` and `<name>_count` only (never bare `<name>`).

Usage:
  python3 deploy/check_metric_names.py             # from anywhere in the repo
  python3 deploy/check_metric_names.py --promtool  # also syntax-check the
                                                   # dashboard's PromQL
  python3 deploy/check_metric_names.py FILE...     # other .yml/.json files

Only the standard library is needed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS_RS = os.path.join(ROOT, "src", "metrics.rs")
DEFAULT_FILES = [
    os.path.join(ROOT, "deploy", "prometheus", "alerts.yml"),
    os.path.join(ROOT, "deploy", "prometheus", "alerts.test.yml"),
    os.path.join(ROOT, "deploy", "grafana", "chatd.json"),
]

# Series Prometheus itself provides, which the rules and dashboard may use.
BUILTIN_METRICS = {"up", "ALERTS"}
# Labels every scraped series has, `le` on histogram buckets, and the labels
# of ALERTS.
BUILTIN_LABELS = {"job", "instance", "le", "alertname", "alertstate", "severity"}

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "inf", "nan", "atan2", "start", "end",
    # aggregation operators (may be followed by `by (...)` instead of `(`)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}


def parse_metrics_rs(path):
    """Returns ({series name: metric name} chatd exports, label names)."""
    src = open(path, encoding="utf-8").read()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', src))
    all_block = re.search(r"pub const ALL: &\[&str\] = &\[(.*?)\];", src, re.S)
    if not consts or not all_block:
        sys.exit(f"{path}: cannot find the metric name constants or ALL")
    names = {consts[c] for c in re.findall(r"\b([A-Z_]+)\b", all_block.group(1))}
    histograms = {consts[c] for c in re.findall(r"histogram!\(\s*([A-Z_]+)", src)}
    series = {}
    for n in names:
        for suffix in (("_bucket", "_sum", "_count") if n in histograms else ("",)):
            series[n + suffix] = n
    labels = set(re.findall(r'"(\w+)"\s*=>', src))
    # Labels named in the doc comments: "by `transport`", "the `mode` label".
    labels |= set(re.findall(r"by `(\w+)`", src))
    labels |= set(re.findall(r"`(\w+)` label", src))
    return series, labels


# --- extracting expressions ------------------------------------------------

def yaml_values(path, keys):
    """Values of `key:` entries (inline scalars or | / > blocks) in a YAML
    file, as (line number, text). Enough for Prometheus rule and test files,
    without needing PyYAML."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    key_re = re.compile(r"^(\s*)(?:- )?(%s):\s*(.*)$" % "|".join(keys))
    i = 0
    while i < len(lines):
        m = key_re.match(lines[i])
        if not m:
            i += 1
            continue
        indent, value = len(m.group(1)), m.group(3).strip()
        start = i + 1
        if value[:1] in "|>":
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            out.append((start, "\n".join(block)))
            continue
        if value[:1] == "'" and value.endswith("'"):
            value = value[1:-1].replace("''", "'")
        elif value[:1] == '"' and value.endswith('"'):
            value = json.loads(value)
        out.append((start, value))
        i += 1
    return out


def from_yaml(path):
    exprs = [(f"{path}:{n}", e) for n, e in yaml_values(path, ["expr", "series"])]
    text = open(path, encoding="utf-8").read()
    rules = len(re.findall(r"^\s*- (?:alert|record):", text, re.M))
    in_rules = len([1 for n, _ in yaml_values(path, ["expr"])])
    if rules and in_rules < rules:
        sys.exit(f"{path}: found {rules} rules but only {in_rules} expr: entries; "
                 "this checker could not parse the file")
    return exprs


def from_json(path):
    """Every `expr` in a Grafana dashboard, plus query variables."""
    exprs = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append((f"{path}: {title}", v))
                elif k == "definition" and isinstance(v, str) and node.get("type") == "query":
                    exprs.append((f"{path}: variable {title}", v))
                else:
                    walk(v, title)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    walk(json.load(open(path, encoding="utf-8")), "dashboard")
    return exprs


# --- tokenising PromQL -----------------------------------------------------

def grafana_to_promql(expr):
    """Replaces Grafana macros/variables so the text is plain PromQL."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.S)
    if m:  # a variable query: label_values(selector, label)
        expr = f"group by ({m.group(2)}) ({m.group(1)})"
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?\w+\}?|\[\[\w+\]\]", ".*", expr)
    return expr


def names_in(expr):
    """(metric names, label names) used in a PromQL expression."""
    labels = set()
    text = re.sub(r"#[^\n]*", " ", expr)
    # Label matchers: collect the label names, drop the block (values may
    # hold anything).
    def matcher(m):
        labels.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`)",
                                 m.group(0)))
        return " "
    text = re.sub(r"\{(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`|[^{}\"'`])*\}", matcher, text)
    text = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`", " ", text)  # strings
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    # Label lists of by / without / on / ignoring / group_left / group_right.
    def grouping(m):
        labels.update(re.findall(r"\w+", m.group(2)))
        return " "
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", grouping, text)
    metrics = set()
    for m in re.finditer(r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)|([A-Za-z_:][\w:]*)(\s*\()?", text):
        ident, call = m.group(2), m.group(3)
        if ident and not call and ident.lower() not in KEYWORDS:
            metrics.add(ident)
    return metrics, labels


# --- optional: syntax check with promtool ----------------------------------

def promtool_check(exprs):
    promtool = shutil.which("promtool")
    if not promtool:
        print("promtool not found; skipping the syntax check", file=sys.stderr)
        return True
    rules = [{"record": f"check:expr_{i}", "expr": grafana_to_promql(e)}
             for i, (_, e) in enumerate(exprs)]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        # JSON is valid YAML.
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        name = f.name
    try:
        r = subprocess.run([promtool, "check", "rules", name], capture_output=True, text=True)
    finally:
        os.unlink(name)
    if r.returncode != 0:
        print("promtool rejected a dashboard expression:\n" + r.stdout + r.stderr, file=sys.stderr)
        for i, (where, e) in enumerate(exprs):
            if f'"check:expr_{i}"' in r.stdout + r.stderr:
                print(f"  check:expr_{i} = {where}: {e}", file=sys.stderr)
        return False
    print(f"promtool: {len(rules)} dashboard expressions parse")
    return True


def main(argv):
    use_promtool = "--promtool" in argv
    files = [a for a in argv if not a.startswith("--")] or DEFAULT_FILES
    exported, known_labels = parse_metrics_rs(METRICS_RS)
    known_metrics = set(exported) | BUILTIN_METRICS
    known_labels |= BUILTIN_LABELS

    problems, used, checked = [], set(), 0
    json_exprs = []
    for path in files:
        if path.endswith(".json"):
            exprs = from_json(path)
            json_exprs += exprs
        else:
            exprs = from_yaml(path)
        if not exprs:
            problems.append(f"{path}: no PromQL expressions found")
        for where, expr in exprs:
            checked += 1
            # A test `series:` (name{labels}) parses like a selector.
            metrics, labels = names_in(grafana_to_promql(expr))
            used |= metrics
            one_line = " ".join(expr.split())
            for name in sorted(metrics - known_metrics):
                problems.append(f"{where}: unknown metric {name!r} in: {one_line}")
            for name in sorted(labels - known_labels):
                problems.append(f"{where}: unknown label {name!r} in: {one_line}")

    ok = True
    if use_promtool and json_exprs:
        ok = promtool_check(json_exprs)
    if problems or not ok:
        print("\n".join(problems), file=sys.stderr)
        print(f"FAIL: {len(problems)} unknown name(s) in {checked} expressions "
              f"(known metrics come from {os.path.relpath(METRICS_RS, ROOT)})"
              + ("" if ok else "; promtool rejected a dashboard expression"), file=sys.stderr)
        return 1
    unused = sorted(set(exported.values()) - {exported[u] for u in used if u in exported})
    print(f"OK: {checked} expressions in {len(files)} files use only metrics from "
          f"{os.path.relpath(METRICS_RS, ROOT)}")
    if files == DEFAULT_FILES:
        print("not used anywhere: " + ", ".join(unused) if unused else
              f"all {len(set(exported.values()))} metrics of src/metrics.rs are used")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
