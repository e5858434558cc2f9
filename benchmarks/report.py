"""The benchmark's three outputs: a markdown table (stdout), a JSON file, and a PNG bar chart of the ratios."""

from __future__ import annotations

import json
from math import log2
from dataclasses import asdict

from PIL import Image, ImageDraw, ImageFont

from benchmarks.harness import Machine, Row, Settings

COLUMNS = ("level", "what", "shape", "dtype", "backend", "minidiff ms", "diffusers ms", "ratio", "rounds",
           "max_rel", "peak MiB md", "peak MiB df", "GFLOP", "GFLOP/s md", "% peak", "status")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _cells(row: Row) -> tuple[str, ...]:
    return (row.level, row.what, row.shape, row.dtype, row.backend, _number(row.minidiff_ms), _number(row.diffusers_ms),
            _number(row.ratio), _spread(row), "-" if row.max_rel is None else f"{row.max_rel:.1e}",
            _number(row.minidiff_peak_mb), _number(row.diffusers_peak_mb), _number(row.gflop), _number(row.minidiff_gflops),
            _number(row.peak_percent, 2), row.status)


def _spread(row: Row) -> str:
    return "-" if row.ratio_low is None else f"{row.ratio_low:.2f}-{row.ratio_high:.2f}"


def machine_line(machine: Machine, settings: Settings) -> str:
    peaks = ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in machine.matmul_gflops.items())
    return (f"{machine.cpu}, torch {machine.torch_version}, {machine.threads} threads; "
            f"measured matmul peak: {peaks}; warm-up {settings.warmup} + {settings.repeats} interleaved rounds "
            f"(one call per side each){' (quick)' if settings.quick else ''}")


def markdown(rows: list[Row], machine: Machine, settings: Settings) -> str:
    lines = [machine_line(machine, settings), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in _cells(row)) + " |" for row in rows]
    lines += ["", "ratio = median over rounds of minidiff / diffusers time, each round one call per side back to "
              "back (< 1: minidiff faster); rounds = the smallest-largest round's ratio. max_rel = max|a-b| / max|b| "
              "of the outputs. Peak MiB: extra resident memory during one call. % peak: minidiff GFLOP/s over the "
              "measured matmul peak of the dtype."]
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], machine: Machine, settings: Settings) -> None:
    document = {"machine": asdict(machine), "settings": asdict(settings), "rows": [asdict(row) for row in rows]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)


def write_png(path: str, rows: list[Row], title: str) -> None:
    """Horizontal bars of ratio per row on a log scale from 1/4 to 4, a whisker over the rounds' range, a line at 1
    (parity); rows without a ratio are listed with their status instead of a bar."""
    label_width, plot_width, bar_height, top = 560, 520, 18, 40
    image = Image.new("RGB", (label_width + plot_width + 80, top + bar_height * len(rows) + 40), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.text((10, 10), title, fill="black", font=font)

    def x_of(ratio: float) -> float:  # log2 ratio in [-2, 2] -> pixel
        return label_width + plot_width * (min(max(log2(ratio), -2.0), 2.0) + 2) / 4

    for i, row in enumerate(rows):
        y = top + i * bar_height
        label = f"{row.what} {row.shape} {row.dtype} {row.backend}"
        draw.text((10, y + 3), label[:90], fill="black", font=font)
        if row.ratio is None:
            draw.text((label_width + 4, y + 3), row.status[:80], fill="gray", font=font)
            continue
        color = (46, 139, 87) if row.ratio <= 1 else (205, 92, 92)
        left, right = sorted((x_of(1.0), x_of(row.ratio)))
        draw.rectangle([left, y + 2, right, y + bar_height - 3], fill=color)
        middle = y + bar_height // 2  # whisker: the smallest to the largest round's ratio
        draw.line([x_of(row.ratio_low), middle, x_of(row.ratio_high), middle], fill="black")
        draw.text((label_width + plot_width + 6, y + 3), f"{row.ratio:.2f}", fill="black", font=font)
    bottom = top + bar_height * len(rows)
    for tick in (0.25, 0.5, 1, 2, 4):
        draw.line([x_of(tick), top - 4, x_of(tick), bottom], fill="black" if tick == 1 else (200, 200, 200))
        draw.text((x_of(tick) - 8, bottom + 6), f"{tick:g}", fill="black", font=font)
    draw.text((label_width, bottom + 22), "minidiff / diffusers time (log scale; left of 1: minidiff faster)",
              fill="black", font=font)
    image.save(path)
