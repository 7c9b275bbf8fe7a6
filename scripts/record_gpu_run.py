"""Writes benchmarks/results/gpu_run.json: what the GPU loop (scripts/gpu_check.sh) ran and saw.

It merges with an existing record so that a run of a subset of steps keeps the other steps'
results, and marks each part with the csrc tree it ran on."""
import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import harness  # noqa: E402


def pytest_summary(out_dir):
    """Totals over the per-file JUnit files; a test file whose process crashed has no file."""
    paths = sorted(glob.glob(os.path.join(out_dir, "junit_*.xml")))
    if not paths:
        return None
    summary = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0, "failed_tests": [],
               "cuda_tests": 0, "cuda_tests_skipped": 0, "files": [os.path.basename(p) for p in paths]}
    for path in paths:
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for k in ("tests", "failures", "errors", "skipped"):
            summary[k] += int(suite.get(k, 0))
        summary["time"] += float(suite.get("time", 0))
        for tc in suite.iter("testcase"):
            if tc.find("failure") is not None or tc.find("error") is not None:
                summary["failed_tests"].append(f"{tc.get('classname')}::{tc.get('name')}")
            if "cuda" in tc.get("name", ""):
                summary["cuda_tests"] += 1
                summary["cuda_tests_skipped"] += tc.find("skipped") is not None
    summary["passed"] = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
    return summary


def sanitizer_summary(path):
    if not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed", text)
    passed = re.findall(r"(\d+) passed", text)
    # no summary line: the run was cut (its step's timeout) before the tool could write one
    return {"error_summary": [int(x) for x in m], "hazards": [int(x) for x in hazards],
            "tests_passed": int(passed[-1]) if passed else 0, "finished": bool(m or hazards), "tail": text[-600:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    record = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            record = json.load(f)
    env = harness.environment()
    record.update({k: env[k] for k in ("gpu", "torch", "cuda", "commit", "csrc_tree", "time_utc")})
    tests = pytest_summary(args.out_dir)
    if tests is not None:
        record["tests"] = {**tests, "csrc_tree": env["csrc_tree"]}
    for tool in ("memcheck", "racecheck", "racecheck_skinny", "racecheck_wgmma_lane0", "racecheck_wgmma_thread"):
        s = sanitizer_summary(os.path.join(args.out_dir, f"sanitizer_{tool}.log"))
        if s is not None:
            record.setdefault("sanitizer", {})[tool] = {**s, "csrc_tree": env["csrc_tree"]}
    keep = {"quant": ("op", "impl", "shape", "median_ms", "gbs", "target_gbs", "meets_target"),
            "matmul": ("shape", "m", "pass", "impl", "us", "vs_bf16", "gbs", "tflops", "target", "meets_target",
                       "rel_error", "bf16_linear_rel_error")}
    for name in sorted(glob.glob("benchmarks/results/bench_*.json")):
        kind = os.path.basename(name)[len("bench_"):-len(".json")]
        with open(name) as f:
            b = json.load(f)
        if b["env"].get("csrc_tree") != env["csrc_tree"]:
            continue  # an older run's file: its own record stays as it was
        fields = keep.get(kind)
        rows = b.get("rows", [])
        record[f"bench_{kind}"] = {
            **{k: v for k, v in b.items() if k not in ("rows", "env")}, "csrc_tree": env["csrc_tree"],
            "rows": [{k: r[k] for k in fields if k in r} for r in rows] if fields else rows}
    harness.write_json(args.json, record)
    print(json.dumps({k: v for k, v in record.items() if not k.startswith("bench_")}, indent=1)[:3000])


if __name__ == "__main__":
    main()
