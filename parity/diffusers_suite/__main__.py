"""Run diffusers' own tests against minidiff: ``from diffusers import X`` swapped to minidiff's X for every name
minidiff exports (``rewrite.py``), offline, beside a control run of the same files on diffusers itself.

    python -m parity.diffusers_suite --diffusers-src ~/src/diffusers            # a checkout (its tests/ folder)
    python -m parity.diffusers_suite --diffusers-src DIR --files tests/schedulers/test_scheduler_ddim.py

Per file it prints (and writes to ``--out``: results.json, results.md) the tests that passed, failed, errored,
needed the hub (a download refused offline: set aside) or were skipped, on minidiff and on diffusers, and how many
fail on minidiff but pass on diffusers. Only files where at least one import was swapped run: those exercise
minidiff. No network: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

from parity.diffusers_suite.rewrite import rewrite_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the target: schedulers, the SD UNets and VAE, the DDPM/DDIM and SD 1/2 pipelines
TARGETS = ("tests/schedulers/", "tests/models/unets/test_models_unet_2d.py",
           "tests/models/unets/test_models_unet_2d_condition.py",
           "tests/models/autoencoders/test_models_autoencoder_kl.py", "tests/pipelines/ddpm/", "tests/pipelines/ddim/",
           "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
           "tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
           "tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
           "tests/pipelines/stable_diffusion_2/test_stable_diffusion.py")
OUTCOMES = ("passed", "failed", "error", "needs-hub", "skipped")


def run_file(root: str, path: str, log: str, timeout: float) -> dict[str, dict]:
    """pytest on ``path`` inside the copy at ``root``; each test's outcome from the plugin's log."""
    if os.path.exists(log):
        os.remove(log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINIDIFF_SUITE_LOG": log, "PYTHONPATH": REPO,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "parity.diffusers_suite.plugin",
               "-W", "ignore", path]
    try:
        subprocess.run(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # the tests that finished are in the log; the file is marked timed out
    results = {}
    if os.path.exists(log):
        with open(log, encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                results[entry["test"]] = entry
    return results


def selected(counts: dict[str, int], files: list[str]) -> list[str]:
    return sorted(path for path in counts if any(path == f or (f.endswith("/") and path.startswith(f)) for f in files))


def table(rows: list[dict]) -> str:
    head = ("| file | tests | minidiff: " + " / ".join(OUTCOMES) + " | diffusers: " + " / ".join(OUTCOMES) +
            " | fail only on minidiff |\n|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        ours = " / ".join(str(row["minidiff"].get(o, 0)) for o in OUTCOMES)
        theirs = " / ".join(str(row["diffusers"].get(o, 0)) for o in OUTCOMES)
        lines.append(f"| {row['file']} | {row['tests']} | {ours} | {theirs} | {row['regressions']} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-src", required=True, help="a diffusers checkout (the folder holding tests/)")
    parser.add_argument("--files", nargs="*", default=list(TARGETS), help="test files or folders (ending in /)")
    parser.add_argument("--out", default=os.path.join(REPO, "parity", "diffusers_suite", "results"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per file and library")
    args = parser.parse_args()
    tests = os.path.join(args.diffusers_src, "tests")
    if not os.path.isdir(tests):
        parser.error(f"{tests} is not a folder: pass a diffusers checkout (git clone "
                     "https://github.com/huggingface/diffusers, or its source archive) as --diffusers-src")
    work = tempfile.mkdtemp(prefix="diffusers-suite-")
    counts = {f"tests/{path}": n for path, n in rewrite_tree(tests, os.path.join(work, "minidiff", "tests")).items()}
    shutil.copytree(tests, os.path.join(work, "diffusers", "tests"))  # the control: the same files, unchanged
    rows, failures = [], {}
    for path in selected(counts, args.files):
        outcomes = {side: run_file(os.path.join(work, side), path, os.path.join(work, f"{side}.jsonl"), args.timeout)
                    for side in ("minidiff", "diffusers")}
        ours, theirs = outcomes["minidiff"], outcomes["diffusers"]
        regressions = {t: e["reason"] for t, e in ours.items()
                       if e["outcome"] in ("failed", "error") and theirs.get(t, {}).get("outcome") == "passed"}
        failures.update(regressions)
        row = {"file": path, "swapped_names": counts[path], "tests": len(set(ours) | set(theirs)),
               "minidiff": dict(collections.Counter(e["outcome"] for e in ours.values())),
               "diffusers": dict(collections.Counter(e["outcome"] for e in theirs.values())),
               "regressions": len(regressions)}
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "fail_only_on_minidiff": failures}, handle, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
