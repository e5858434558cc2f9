"""How one benchmark row is measured. Both sides run in this process, on the same weights and inputs.

- Threads: ``torch.set_num_threads(threads)`` once for the whole run, so both libraries get the same cores.
- Error first: one call per side (it is also the first warm-up call), ``max_rel = max|a - b| / max|b|``
  (``parity.report.measure``). Above the row's tolerance the row says "error too high" and reports no time and no
  ratio: a fast wrong kernel is not a speedup. A side that raises (e.g. the kernel registry rejecting a backend's
  output shape or dtype) gives a "failed: ..." row carrying the message.
- Time: more warm-up calls, then ``repeats`` rounds of one timed call per side, back to back in ABBA order; each
  side's median time. ratio = the median over rounds of minidiff / diffusers within the round (< 1: minidiff faster):
  two calls seconds apart see the same machine speed, so a drift between rounds (this shared VM's speed wanders by
  10-30% over minutes) cancels. ``ratio_low``/``ratio_high``, the smallest and largest round's ratio, show the noise.
- Peak memory: the extra resident memory of one call. glibc's free memory goes back to the OS (``malloc_trim``), the
  kernel's resident-memory high-water mark is reset to the current size (write "5" to ``/proc/self/clear_refs``,
  see proc(5)), the call runs, and ``VmHWM`` minus ``VmRSS`` before the call is read from ``/proc/self/status``.
  Weights and inputs are resident before the call, so this is activations plus workspaces (Linux only, else None).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` during one extra diffusers call per case (matmul, conv and
  attention FLOPs; elementwise ops are not counted). CPU SDPA kernels get the formula torch uses for its GPU ones.
- Machine peak: the best GFLOP/s of an n x n matmul in each dtype, measured at the start of the same run (at n = 256
  for a dtype whose n = 2048 product would take over 2 s); a row's "% peak" is minidiff's GFLOP/s over that number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from minidiff import ops
from parity.report import measure

if TYPE_CHECKING:
    from benchmarks.cases import Case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILED = "+compile"  # suffix of the backend label of torch.compile'd rows
PROBE_SIZE = 256  # the matmul size of --quick's machine peak, and the fallback size for a dtype with slow kernels


@register_flop_formula([torch.ops.aten._scaled_dot_product_flash_attention_for_cpu])
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class Settings:
    quick: bool = False
    threads: int = 2
    warmup: int = 1  # calls per side before timing, besides the error-check call
    repeats: int = 5  # timed calls per side
    compile: bool = False


@dataclass
class Pair:
    """The two sides of one benchmark: zero-argument calls returning comparable outputs (tensors or arrays).

    ``compiled`` (optional) returns the same pair with both sides' models passed through ``torch.compile``."""

    minidiff: Callable[[], Any]
    diffusers: Callable[[], Any]
    compiled: Callable[[], "Pair"] | None = None


@dataclass
class Row:
    level: str
    what: str
    shape: str
    dtype: str
    backend: str
    tolerance: float
    status: str = "ok"
    max_rel: float | None = None
    minidiff_ms: float | None = None
    diffusers_ms: float | None = None
    ratio: float | None = None  # median over rounds of minidiff / diffusers time
    ratio_low: float | None = None  # the rounds' smallest and largest ratio
    ratio_high: float | None = None
    minidiff_peak_mb: float | None = None
    diffusers_peak_mb: float | None = None
    gflop: float | None = None
    minidiff_gflops: float | None = None
    diffusers_gflops: float | None = None
    peak_percent: float | None = None  # minidiff GFLOP/s as % of the measured matmul peak in this dtype


@dataclass
class Machine:
    """What the run measured about the machine, and the settings it ran with."""

    threads: int
    torch_version: str
    cpu: str  # model name and vector ISA (cpu_name())
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # dtype name -> measured peak


# ---- timing -------------------------------------------------------------------------------------------------------
def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_rounds(first: Callable, second: Callable, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each callable over ``repeats`` rounds of one call each, the order alternating (ABBA)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[side].append(seconds((first, second)[side]))
    return times


def best_matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best of ``repeats`` (n, n) @ (n, n) products, 2 n^3 FLOPs each, after one untimed product."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / min(seconds(lambda: a @ b) for _ in range(repeats)) / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int, repeats: int = 10, budget_seconds: float = 2.0) -> float:
    """This machine's matmul throughput at size ``n``, or at ``PROBE_SIZE`` when one product at ``n`` would take more
    than ``budget_seconds``: a dtype without native kernels (bfloat16 on a CPU without AVX512-BF16/AMX) runs a
    scalar fallback GEMM, minutes per 2048^3 product."""
    probe = min(n, PROBE_SIZE)
    gflops = best_matmul_gflops(dtype, probe, repeats)
    if n > probe and 2 * n**3 / (gflops * 1e9) <= budget_seconds:
        gflops = best_matmul_gflops(dtype, n, repeats)
    return gflops


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo, else the platform's name) and the vector ISA torch's kernels use."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


# ---- memory and FLOPs ---------------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Extra resident memory (MiB) at the peak of one call of ``fn`` (see the module docstring)."""
    if _LIBC is None:
        return None
    gc.collect()
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    fn()
    return (_status_bytes("VmHWM") - before) / 2**20


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``, counted while it runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- one row ------------------------------------------------------------------------------------------------------
def with_backend(op: str, backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside ``ops.use_backend(op, backend)`` (a compiled row keeps the model's own choice)."""

    def call():
        context = contextlib.nullcontext() if backend.endswith(COMPILED) else ops.use_backend(op, backend)
        with context:
            return fn()

    return call


def measure_row(row: Row, pair: Pair, op: str, flops: int | None, settings: Settings, machine: Machine,
                repeats: int | None = None) -> Row:
    """Fill ``row``: error check, then interleaved timing, peak memory and throughput (module docstring)."""
    minidiff = with_backend(op, row.backend, pair.minidiff)
    try:
        row.max_rel = measure(minidiff(), pair.diffusers())[1]
    except Exception as error:  # the message names what went wrong (e.g. op, backend and shapes)
        return failed(row, error)
    if not row.max_rel <= row.tolerance:  # also catches NaN
        row.status = "error too high"
        return row
    for _ in range(settings.warmup):
        minidiff(), pair.diffusers()
    ours_rounds, theirs_rounds = interleaved_rounds(minidiff, pair.diffusers, repeats or settings.repeats)
    ours, theirs = statistics.median(ours_rounds), statistics.median(theirs_rounds)
    ratios = [a / b for a, b in zip(ours_rounds, theirs_rounds)]
    row.minidiff_ms, row.diffusers_ms = ours * 1e3, theirs * 1e3
    row.ratio, row.ratio_low, row.ratio_high = statistics.median(ratios), min(ratios), max(ratios)
    row.minidiff_peak_mb, row.diffusers_peak_mb = peak_memory_mb(minidiff), peak_memory_mb(pair.diffusers)
    if flops:
        row.gflop = flops / 1e9
        row.minidiff_gflops, row.diffusers_gflops = row.gflop / ours, row.gflop / theirs
        peak = machine.matmul_gflops.get(row.dtype)
        row.peak_percent = 100 * row.minidiff_gflops / peak if peak else None
    return row


def failed(row: Row, error: Exception) -> Row:
    row.status = f"failed: {type(error).__name__}: {error}"
    return row


def run_case(case: "Case", dtypes: tuple[str, ...], settings: Settings, machine: Machine) -> list[Row]:
    """All rows of one case: per dtype, one build (models + inputs), then one row per backend (+ a compiled row)."""
    rows, flops = [], None
    for dtype in (d for d in case.dtypes if d in dtypes):
        def new_row(backend: str) -> Row:
            return Row(case.level, case.what, case.shape, dtype, backend, case.tolerance[dtype])

        try:
            pair = case.build(DTYPES[dtype])
            flops = flops or count_flops(pair.diffusers)
        except Exception as error:  # e.g. a model that does not build: one failed row, the run goes on
            rows.append(failed(new_row("-"), error))
            continue
        for backend in case.backends:
            rows.append(measure_row(new_row(backend), pair, case.op, flops, settings, machine, case.repeats))
        if settings.compile and case.compilable and pair.compiled is not None:
            label = ops.current_backend(case.op) + COMPILED
            rows.append(measure_row(new_row(label), pair.compiled(), case.op, flops, settings, machine, case.repeats))
        del pair
        gc.collect()
    return rows


def run(cases: list["Case"], dtypes: tuple[str, ...], settings: Settings, log: Callable[[str], None] = print) -> tuple[list[Row], Machine]:
    """Measure the machine's matmul peak, then every case, under ``settings.threads`` threads and inference mode
    (the previous thread count is restored afterwards)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        machine = Machine(settings.threads, torch.__version__, cpu_name())
        size = PROBE_SIZE if settings.quick else 2048
        machine.matmul_gflops = {dtype: matmul_peak_gflops(DTYPES[dtype], size) for dtype in dtypes}
        rows = []
        with torch.inference_mode():
            for case in cases:
                for row in run_case(case, dtypes, settings, machine):
                    log(f"{row.what} {row.shape} {row.dtype} {row.backend}: ratio {row.ratio} ({row.status})")
                    rows.append(row)
    finally:
        torch.set_num_threads(previous_threads)
    return rows, machine
