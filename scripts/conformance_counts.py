"""Counts of a cwltest JUnit report: passed / failed / unsupported per tag
and in total (a test counts under each of its tags), then the failing
tests of the `required` tag by id.

Usage: conformance_counts.py [--gate SUITE_README] JUNIT.xml
       conformance_counts.py --gate-misses SUITE_README JUNIT.xml

With --gate, exits 1 when a required test did not pass that the reference
runner passes: the suite's README lists, as "- failed: `id`" and
"- unsupported: `id`", the tests the reference runner does not pass on
that copy (their helper programs are left out of it)."""
import collections
import re
import sys
import xml.etree.ElementTree as ET


def reference_misses(readme):
    ids = set()
    with open(readme, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\s*-\s*(failed|unsupported):\s*`([^`]+)`", line)
            if m:
                ids.add(m.group(2))
    return ids


def main(path, gate=None):
    root = ET.parse(path).getroot()
    per_tag = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    failed_required = []
    for case in root.iter("testcase"):
        tags = [t.strip() for t in (case.get("class") or "").split(",") if t.strip()]
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "unsupported"
        else:
            outcome = "passed"
        total[outcome] += 1
        for t in tags:
            per_tag[t][outcome] += 1
        if outcome != "passed" and "required" in tags:
            failed_required.append((case.get("file") or case.get("name"), outcome))
    print(f"{'tag':<28} {'passed':>7} {'failed':>7} {'unsupp.':>8} {'total':>6}")
    for tag in sorted(per_tag, key=lambda t: -sum(per_tag[t].values())):
        c = per_tag[tag]
        n = sum(c.values())
        print(f"{tag:<28} {c['passed']:>7} {c['failed']:>7} {c['unsupported']:>8} {n:>6}")
    n = sum(total.values())
    print(f"{'(all)':<28} {total['passed']:>7} {total['failed']:>7} {total['unsupported']:>8} {n:>6}")
    if failed_required:
        print("required tests not passed: " + ", ".join(f"{i} ({o})" for i, o in failed_required))
    if gate is None:
        return 0
    misses = reference_misses(gate)
    if not misses:
        print(f"gate: {gate} lists no test the reference runner misses; cannot judge")
        return 1
    ours = [(i, o) for i, o in failed_required if i not in misses]
    if ours:
        print("gate: FAILED: required tests the reference runner passes but Caroni does not: "
              + ", ".join(f"{i} ({o})" for i, o in ours))
        return 1
    if root.find(".//testcase") is None:
        print("gate: FAILED: the report holds no test")
        return 1
    print(f"gate: passed (required tests not passed are all ones the reference runner misses too: {len(failed_required)})")
    return 0


def gate_misses(readme, path):
    """The required tests that did not pass and that the reference runner
    passes, one per line: the test's number in the suite (cwltest -n) and
    its id."""
    misses = reference_misses(readme)
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        tags = [t.strip() for t in (case.get("class") or "").split(",")]
        passed = all(case.find(k) is None for k in ("failure", "error", "skipped"))
        name = case.get("file") or case.get("name")
        if "required" in tags and not passed and name not in misses:
            number = (case.get("url") or "").rpartition("#")[2]
            print(f"{number} {name}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--gate-misses":
        sys.exit(gate_misses(args[1], args[2]))
    gate = None
    if len(args) >= 2 and args[0] == "--gate":
        gate = args[1]
        args = args[2:]
    sys.exit(main(args[-1] if args else "conformance-results.xml", gate))
