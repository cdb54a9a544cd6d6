"""Read a saved audit back: ``python -m constrained_optim.audit report run.jsonl [--plot out.png]``.

``report`` prints the whole-run summary of the records in the file (written by
``opt.audit.to_jsonl``) as a table; ``--records N`` also prints the last N records; ``--plot``
writes drift and residual per parameter over steps as a PNG (needs matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import Audit


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def _one_line(text) -> str:
    return str(text).replace("\r", " ").replace("\n", " ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m constrained_optim.audit", description="Inspect a saved constraint audit."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="summary table (and plot) of an audit.jsonl")
    report.add_argument("path", help="a file written by opt.audit.to_jsonl(path)")
    report.add_argument("--plot", metavar="PNG", help="write drift and residual over steps to PNG")
    report.add_argument(
        "--records", type=_count, default=0, metavar="N", help="also print the last N records"
    )
    args = parser.parse_args(argv)

    from .. import report as render

    try:
        audit = Audit.from_jsonl(args.path)
    except OSError as err:  # missing, a directory, unreadable
        print(f"error: {_one_line(args.path)}: {_one_line(err.strerror or err)}", file=sys.stderr)
        return 2
    except ValueError as err:  # read_jsonl names path:line and what is wrong
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    steps = sorted({r.step for r in audit.history})
    span = f"steps {steps[0]}..{steps[-1]}, " if steps else ""
    title = f"{os.path.basename(args.path)}: {span}{len(audit)} records"
    console = render.Console()
    console.print(render.summary_table(audit.summaries.values(), title=title))
    if args.records:
        console.print(render.records_table(audit.history[-args.records :], title="last records"))
    if args.plot:
        try:
            audit.plot(args.plot)
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        console.print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
