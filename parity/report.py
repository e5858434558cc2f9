"""Recording parity measurements: every case compares a minidiff output with the reference library's output.

``compare`` measures ``max_abs = max|a - b|`` and ``max_rel = max|a - b| / max|b|``, records them under
(component, case), and fails the calling test when the error is above tolerance. Repeated measurements of one case
(hypothesis draws, every step of a trajectory) keep the worst.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Record:
    component: str
    case: str
    max_abs: float
    max_rel: float
    tolerance: float
    metric: str  # "rel" or "abs": which of the two the tolerance bounds
    passed: bool
    count: int = 1


RECORDS: dict[tuple[str, str], Record] = {}


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def measure(actual, expected) -> tuple[float, float]:
    a, b = _as_array(actual), _as_array(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: minidiff {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        same_nonfinite = np.array_equal(np.isfinite(a), np.isfinite(b)) and np.array_equal(
            a[~np.isfinite(a)], b[~np.isfinite(b)], equal_nan=True
        )  # NaN/inf where the reference has them too (e.g. diffusers' own 0/0) is agreement
        if not same_nonfinite:
            return float("inf"), float("inf")
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size == 0:
            return 0.0, 0.0
    max_abs = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel


def compare(component: str, case: str, actual, expected, tol: float, metric: str = "rel") -> Record:
    """Record and assert ``max_rel <= tol`` (``metric="rel"``) or ``max_abs <= tol`` (``metric="abs"``)."""
    max_abs, max_rel = measure(actual, expected)
    passed = (max_rel if metric == "rel" else max_abs) <= tol
    key = (component, case)
    previous = RECORDS.get(key)
    if previous is None:
        RECORDS[key] = Record(component, case, max_abs, max_rel, tol, metric, passed)
    else:
        previous.max_abs = max(previous.max_abs, max_abs)
        previous.max_rel = max(previous.max_rel, max_rel)
        previous.passed = previous.passed and passed
        previous.count += 1
    assert passed, f"{component} / {case}: max_abs={max_abs:.3e} max_rel={max_rel:.3e} above {metric} tolerance {tol:g}"
    return RECORDS[key]


ZERO_GRAD = 1e-6  # a parameter whose largest gradient is below this fraction of the model's largest has none


def compare_gradients(component: str, case: str, mine: dict, theirs: dict, tol: float) -> None:
    """Compare gradients by name: relatively, except where the reference's gradient is ~0 (below ``ZERO_GRAD`` of
    the largest). Those are zero in exact arithmetic (a conv bias before a GroupNorm, ``to_k.bias`` under softmax)
    and hold only rounding noise, so they are compared absolutely against ``tol`` times the largest gradient."""
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    largest = max(g.abs().max().item() for g in theirs.values() if g is not None)
    for name, their_grad in theirs.items():
        if their_grad is None:  # frozen parameters (Fourier features)
            assert mine[name] is None, name
        elif their_grad.abs().max().item() > ZERO_GRAD * largest:
            compare(component, f"{case}: grad", mine[name], their_grad, tol)
        else:
            compare(component, f"{case}: grad of ~0-gradient params (abs, vs largest grad)", mine[name], their_grad,
                    tol * largest, metric="abs")


def compare_exact(component: str, case: str, actual, expected) -> Record:
    """Equality of integer or discrete outputs (timesteps, token ids): recorded with tolerance 0."""
    a, b = _as_array(actual), _as_array(expected)
    if a.shape != b.shape:
        raise AssertionError(f"{component} / {case}: shape {a.shape} vs reference {b.shape}")
    return compare(component, case, a, b, tol=0.0, metric="abs")


def markdown_table(records=None) -> str:
    records = sorted((records or RECORDS).values(), key=lambda r: (r.component, r.case))
    lines = ["| component | case | max_abs | max_rel | tolerance | checks | status |", "|---|---|---|---|---|---|---|"]
    for r in records:
        status = "pass" if r.passed else "FAIL"
        lines.append(f"| {r.component} | {r.case} | {r.max_abs:.2e} | {r.max_rel:.2e} | {r.tolerance:g} ({r.metric}) | {r.count} | {status} |")
    return "\n".join(lines)


def component_summary(records=None) -> str:
    """One row per component: number of cases and checks, worst relative and absolute error, overall status."""
    by_component: dict[str, list[Record]] = {}
    for record in (records or RECORDS).values():
        by_component.setdefault(record.component, []).append(record)
    lines = ["| component | cases | checks | worst max_rel | worst max_abs | status |", "|---|---|---|---|---|---|"]
    for component in sorted(by_component):
        rows = by_component[component]
        status = "pass" if all(r.passed for r in rows) else f"FAIL ({sum(not r.passed for r in rows)})"
        lines.append(f"| {component} | {len(rows)} | {sum(r.count for r in rows)} | "
                     f"{max(r.max_rel for r in rows):.1e} | {max(r.max_abs for r in rows):.1e} | {status} |")
    return "\n".join(lines)
