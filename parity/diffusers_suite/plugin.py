"""pytest plugin of the diffusers-suite runner: every test's outcome, and whether its failure is the hub's
(a download refused offline), appended as JSON lines to $MINIDIFF_SUITE_LOG."""

from __future__ import annotations

import json
import os
import re

NEEDS_HUB = re.compile(r"OfflineModeIsEnabled|LocalEntryNotFoundError|HF_HUB_OFFLINE|offline mode|huggingface\.co|"
                       r"Cannot reach|couldn't connect to|We couldn't connect|RepositoryNotFoundError|"
                       r"is not a local folder and is not a valid model identifier|hf-internal-testing|"
                       r"minidiff does not download")  # minidiff's own words for a hub id it cannot resolve offline


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        text = str(report.longrepr) if report.longrepr else ""
        if report.passed:
            outcome = "passed"
        elif report.skipped:
            outcome = "skipped"
        elif NEEDS_HUB.search(text):
            outcome = "needs-hub"
        else:
            outcome = "failed" if report.when == "call" else "error"
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        last = (crash or (text.strip().splitlines() or [""])[-1])[:300]
        with open(os.environ["MINIDIFF_SUITE_LOG"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": report.nodeid, "outcome": outcome, "reason": last}) + "\n")
