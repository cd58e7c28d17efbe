"""``python -m workbench.lessons handout DIR``: the lesson notebooks without outputs, for the learners.
``python -m workbench.lessons list``: the lessons."""
from __future__ import annotations

import argparse
import sys

from .learner import handout, lessons_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.lessons", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("handout", help="copy the lesson notebooks with their outputs cleared")
    h.add_argument("dest", help="folder to write them to")
    sub.add_parser("list", help="list the lessons")
    args = parser.parse_args(argv)
    if args.command == "handout":
        for path in handout(args.dest):
            print(path)
    else:
        print(lessons_table().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
