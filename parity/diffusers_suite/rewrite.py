"""Rewrite diffusers' test sources so that every name minidiff exports comes from minidiff: ``from diffusers import
A, B`` (and ``from transformers import CLIPTextModel, ...``) splits into the names minidiff has, imported from
minidiff, and the rest, still imported from where they were."""

from __future__ import annotations

import ast
import os
import shutil

import minidiff

SWAPPED_MODULES = ("diffusers", "transformers")


def swapped_import(node: ast.ImportFrom, exported: set[str]) -> list[str] | None:
    """The statements replacing ``node`` (None: nothing of it is swapped)."""
    if node.level or node.module not in SWAPPED_MODULES:
        return None
    ours = [alias for alias in node.names if alias.name in exported]
    if not ours:
        return None
    rest = [alias for alias in node.names if alias.name not in exported]

    def names(aliases):
        return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases)

    statements = [f"from minidiff import {names(ours)}"]
    if rest:
        statements.insert(0, f"from {node.module} import {names(rest)}")
    return statements


def rewrite_source(source: str, exported: set[str]) -> tuple[str, int]:
    """``source`` with its swapped imports rewritten, and how many names were swapped."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits, swapped = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            statements = swapped_import(node, exported)
            if statements:
                indent = lines[node.lineno - 1][:node.col_offset]
                edits.append((node.lineno, node.end_lineno, "".join(f"{indent}{s}\n" for s in statements)))
                swapped += sum(alias.name in exported for alias in node.names)
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    return "".join(lines), swapped


def rewrite_tree(tests: str, destination: str) -> dict[str, int]:
    """Copy the ``tests`` folder to ``destination`` with every .py file rewritten; swapped names per file."""
    exported = set(minidiff.__all__)
    shutil.copytree(tests, destination, dirs_exist_ok=True)
    counts = {}
    for root, _, files in os.walk(destination):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    source = handle.read()
                new, swapped = rewrite_source(source, exported)
                if swapped:
                    with open(path, "w", encoding="utf-8") as handle:
                        handle.write(new)
                    counts[os.path.relpath(path, destination)] = swapped
    return counts
