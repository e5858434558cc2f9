"""``python -m benchmarks``: minidiff vs diffusers, side by side. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import importlib
import sys

import diffusers
import torch

from benchmarks.cases import LEVELS, all_cases
from benchmarks.harness import DTYPES, Settings, run
from benchmarks.report import machine_line, markdown, write_json, write_png
from minidiff import ops

SWAPPABLE_OPS = ("attention", "geglu")


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test, numbers not meaningful")
    parser.add_argument("--level", type=names, default=LEVELS, help=f"comma-separated, from {','.join(LEVELS)} (default: all)")
    parser.add_argument("--dtype", type=names, default=tuple(DTYPES), help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--backends", type=names, default=None,
                        help="attention backends at every level (default: math,sdpa,chunked on ops; sdpa,chunked on "
                             "models; sdpa on pipelines)")
    parser.add_argument("--kernel", action="append", default=[], metavar="MODULE",
                        help="import MODULE, which registers backends with minidiff.ops.register_backend; its new "
                             "backends get rows too (e.g. benchmarks.examples.cpp_attention)")
    parser.add_argument("--compile", action="store_true", help="add rows with both sides through torch.compile")
    parser.add_argument("--only", default=None, help="keep the rows whose 'what' contains this text")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 5, --quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side besides the error check")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--png", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    for option, values, accepted in (("--level", args.level, LEVELS), ("--dtype", args.dtype, tuple(DTYPES))):
        unknown = [v for v in values if v not in accepted]
        if unknown or not values:
            parser.error(f"{option} {','.join(values)}: unknown {unknown}; accepted: {','.join(accepted)}")
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        parser.error("--threads and --repeats must be at least 1, --warmup at least 0")
    return args


def load_kernels(modules: list[str]) -> dict[str, tuple[str, ...]]:
    """Import each module; return the backends it registered, per op."""
    before = {op: set(ops.available_backends(op)) for op in SWAPPABLE_OPS}
    for module in modules:
        importlib.import_module(module)
    return {op: tuple(sorted(set(ops.available_backends(op)) - before[op])) for op in SWAPPABLE_OPS}


def main(argv: list[str]) -> int:
    args = parse(argv)
    diffusers.utils.logging.set_verbosity_error()  # e.g. its note on every `.to(bfloat16)` of a model
    added = load_kernels(args.kernel)
    for backend in args.backends or ():
        if backend not in ops.available_backends("attention"):
            raise SystemExit(f"--backends: unknown attention backend {backend!r}; registered backends: "
                             f"{ops.available_backends('attention')} (register more with --kernel MODULE)")
    settings = Settings(quick=args.quick, threads=args.threads, warmup=args.warmup,
                        repeats=args.repeats or (3 if args.quick else 5), compile=args.compile)
    cases = [c for c in all_cases(args.quick, args.level, args.backends, added) if args.only is None or args.only in c.what]
    rows, machine = run(cases, args.dtype, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(rows, machine, settings))
    if args.json:
        write_json(args.json, rows, machine, settings)
    if args.png:
        write_png(args.png, rows, machine_line(machine, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
