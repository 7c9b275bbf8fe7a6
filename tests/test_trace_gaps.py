"""scripts/trace_gaps.py (the GPU-idle report of profile_lora) on a hand-made chrome trace."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "trace_gaps", os.path.join(os.path.dirname(__file__), "..", "scripts", "trace_gaps.py"))
trace_gaps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_gaps)


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_gaps_name_the_launching_op():
    events = [
        _x("cpu_op", "aten::addmm", 0, 50), _x("cpu_op", "lowrank::dora_norm", 60, 400),
        _x("cpu_op", "aten::mul", 100, 20),  # inside dora_norm: the innermost op wins
        _x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 110, 5, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 300, 5, correlation=3),
        _x("kernel", "gemm", 20, 100, tid=7, correlation=1),     # busy 20..120
        _x("kernel", "small", 30, 10, tid=8, correlation=2),     # overlaps: no gap after it
        _x("kernel", "scale", 320, 10, tid=7, correlation=3),    # idle 120..320 = 200 us
    ]
    found = trace_gaps.gaps({"traceEvents": events}, top=5, min_us=5)
    assert len(found) == 1
    assert found[0]["gap_us"] == 200 and found[0]["next"] == "scale"
    assert found[0]["launched_by"] == "lowrank::dora_norm"
    text = trace_gaps.report({"traceEvents": events})
    assert "idle 200 us" in text and "work 110 us" in text


def test_report_without_gpu_work():
    assert trace_gaps.report({"traceEvents": [_x("cpu_op", "aten::mm", 0, 5)]}) == "no GPU work in the trace"
