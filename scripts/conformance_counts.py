"""Counts of a cwltest JUnit report: passed / failed / unsupported per tag
and in total (a test counts under each of its tags), then the failing
tests of the `required` tag by id. Usage: conformance_counts.py JUNIT.xml"""
import collections
import sys
import xml.etree.ElementTree as ET


def main(path):
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


if __name__ == "__main__":
    main(sys.argv[-1] if len(sys.argv) > 1 else "conformance-results.xml")
