"""``vtprune`` command line: ``vtprune demo``, ``vtprune methods``, ``vtprune models``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="speed-up and efficiency of every method on the embedded default model")
    demo.add_argument("--reps", type=int, default=5, help="timed repetitions per configuration (median reported)")
    demo.add_argument("--out", default="out", help="directory for demo.csv and demo_speedup.png")
    demo.add_argument("--no-plot", action="store_true")
    sub.add_parser("methods", help="list the registered methods")
    sub.add_parser("models", help="list the supported model families")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from vtprune.bench.demo import run

        run(reps=args.reps, out_dir=args.out, plot=not args.no_plot)
    elif args.command == "methods":
        from vtprune.registry import METHODS

        for name in METHODS.names():
            cls = METHODS.get(name)
            aliases = METHODS.aliases_of(name)
            print(f"{name:<16} stage={cls.stage:<7} {'aliases=' + ','.join(aliases) if aliases else ''}")
    elif args.command == "models":
        import vtprune

        print(json.dumps(vtprune.list_models(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
