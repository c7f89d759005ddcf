"""CPU-checkable parts of the GPU benchmarks: the idle-gap analysis of benchmarks.profile_step."""
from __future__ import annotations

from benchmarks.profile_step import gpu_times, idle_gaps


def _x(cat, name, ts, dur, corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **({"args": {"correlation": corr}} if corr else {})}


def test_idle_gaps_finds_the_stall_and_the_host_op_that_caused_it():
    trace = {"traceEvents": [
        _x("kernel", "matmul", 0, 100, 1),
        _x("gpu_memcpy", "Memcpy HtoD", 50, 100, 2),     # overlaps: busy until 150
        _x("kernel", "norm", 400, 50, 3),                # idle 150..400 = 250 us
        _x("kernel", "tiny", 455, 5, 4),                 # 5 us: under the 10 us threshold
        _x("cuda_runtime", "cudaLaunchKernel", 1, 2, 1),
        _x("cuda_runtime", "cudaMemcpyAsync", 2, 2, 2),
        _x("cuda_driver", "cuLaunchKernel", 390, 3, 3),  # Triton launches go through the driver API
        _x("cuda_runtime", "cudaLaunchKernel", 395, 2, 4),
        _x("cuda_runtime", "cudaStreamSynchronize", 160, 20),
        _x("cpu_op", "build_masks", 140, 260),
        _x("cpu_op", "aten::arange", 385, 10),
    ]}
    g = idle_gaps(trace)
    assert g["gaps_over_min"] == 1 and g["idle_ms"] == 0.25 and g["span_ms"] == 0.46
    gap = g["largest_gaps"][0]
    assert gap["prev_kernel"] == "Memcpy HtoD" and gap["next_kernel"] == "norm"
    assert gap["launched_us_before_start"] == 10      # launched just before it ran: host-bound
    assert gap["host_inner"] == ["build_masks", "aten::arange"]
    assert g["idle_by_host_op_ms"] == {"aten::arange < build_masks": 0.25}
    assert g["sync_calls"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.02}}
    assert sorted(gpu_times(trace)) == [("Memcpy HtoD", 100), ("matmul", 100), ("norm", 50), ("tiny", 5)]
