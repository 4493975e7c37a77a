"""Print the bad-input and fault catalogues as a markdown table: case, input, exit code, first message line.

    QLORAX_ASSETS=../shared/assets .venv/bin/python tests/fault_table.py [faults|bad_input ...] [-o table.md]

Each case runs the real CLI exactly as its test does (tests/test_faults.py, tests/test_bad_input.py);
the table is what a user would see. A row whose exit code differs from the catalogue's is marked.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_bad_input   # noqa: E402  (the catalogues live in the test modules)
import test_faults   # noqa: E402
from conftest import run_cli   # noqa: E402

CATALOGUES = {"faults": test_faults.FAULTS, "bad_input": test_bad_input.CASES}


def run(catalogue: str, name: str, tmp: Path):
    if catalogue == "faults":
        return test_faults.run_case(name, tmp)
    argv = test_bad_input.CASES[name][0](tmp)
    if argv[0] in ("train", "run") and not any(a.startswith("run_dir=") for a in argv):
        argv.append(f"run_dir={tmp / 'out'}")
    return run_cli(*argv, cwd=tmp)


def first_message_line(output: str) -> str:
    """The first error line; a heading like 'invalid configuration (1 problem):' with the line under it."""
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("qlorax: error:") or "] error:" in line), None)
    if first is None:
        return lines[-1] if lines else ""
    if lines[first].endswith(":") and first + 1 < len(lines):
        return f"{lines[first]} {lines[first + 1].strip()}"
    return lines[first]


def shown_input(argv_text: str, tmp: Path) -> str:
    return re.sub(r"\s+", " ", argv_text.replace(str(tmp), "$TMP")).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalogues", nargs="*", help=f"any of {', '.join(CATALOGUES)} (default: all)")
    parser.add_argument("-o", "--output", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    unknown = set(args.catalogues) - set(CATALOGUES)
    if unknown:
        parser.error(f"unknown catalogue(s) {', '.join(sorted(unknown))}: choose from {', '.join(CATALOGUES)}")
    lines = ["| catalogue | case | input | exit | first line of the message |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for catalogue in args.catalogues or list(CATALOGUES):
        for name, (_, code, _) in CATALOGUES[catalogue].items():
            with tempfile.TemporaryDirectory(prefix="qlorax-fault-") as tmp_dir:
                tmp = Path(tmp_dir)
                result = run(catalogue, name, tmp)
                argv = " ".join(result.args[3:])   # after `python -m qlorax`
                row = (f"| {catalogue} | {name} | `{shown_input(argv, tmp)}` | {result.returncode}"
                       f"{'' if result.returncode == code else f' (expected {code})'} | "
                       f"{shown_input(first_message_line(result.stdout + result.stderr), tmp).replace('|', '/')} |")
            lines.append(row)
            print(row, flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
