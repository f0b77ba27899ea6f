"""Command line: ``fastattn list | readme | bench | convert`` (also ``python -m fastattn``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .registry import methods


def _list(args: argparse.Namespace) -> int:
    specs = methods(args.family)
    print(f"{'id':<20} {'family':<8} {'year':<5} {'complexity':<28} {'capabilities':<44} options")
    for s in specs:
        opts = ", ".join(f"{k}={v!r}" for k, v in s.options.items())
        kind = f",{s.kind}" if s.kind != "sequence" else ("" if s.functional else ",layer-only")
        caps = ",".join(s.capabilities()) + kind
        print(f"{s.name:<20} {s.family:<8} {s.year:<5} {s.complexity:<28} {caps:<44} {opts}")
        if args.verbose:
            print(f"{'':<20} {s.title} (arXiv:{s.arxiv})\n{'':<20} {s.summary}")
    print(f"\n{len(specs)} mechanisms")
    return 0


def _readme(args: argparse.Namespace) -> int:
    from .docs import update_readme

    path = Path(args.path)
    if args.check:
        ok = update_readme(path, check=True)
        print("README mechanism table is current" if ok else "README mechanism table is stale: run `fastattn readme`")
        return 0 if ok else 1
    update_readme(path)
    print(f"wrote the mechanism table of {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description="Efficient attention, one interface.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print the registry")
    p.add_argument("--family", default=None, help="only this family (exact, kernel, sparse, ...)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print papers and ideas")
    p.set_defaults(func=_list)
    p = sub.add_parser("readme", help="regenerate the README mechanism table from the registry")
    p.add_argument("--path", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    p.set_defaults(func=_readme)
    try:
        from .bench.cli import add_parser as add_bench
    except ImportError:
        pass
    else:
        add_bench(sub)
    from .hf.convert import add_parser as add_convert  # imports nothing heavy until run

    add_convert(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
