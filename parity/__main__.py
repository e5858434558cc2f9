"""`python -m parity [pytest args]`: run the parity suite and print the markdown parity table."""

import os
import sys

import pytest

from parity.report import RECORDS, component_summary, markdown_table


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    exit_code = pytest.main([here, "-q", "-p", "no:warnings", "-m", "", *argv])  # every case, slow ones too
    table = markdown_table()
    print("\n## minidiff parity report\n")
    print(table if RECORDS else "(no parity case ran)")
    print("\n## by component\n")
    print(component_summary())
    failed = sum(not r.passed for r in RECORDS.values())
    print(f"\n{len(RECORDS)} cases, {len(RECORDS) - failed} pass, {failed} fail (pytest exit code {int(exit_code)})")
    with open("parity-report.md", "w", encoding="utf-8") as handle:
        handle.write(table + "\n\n" + component_summary() + "\n")
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
