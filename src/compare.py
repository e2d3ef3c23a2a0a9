"""Compare the jobs of a multirun.  python src/compare.py <multirun dir> [by=key[,key...]]

Writes report.md and curves.png into the multirun dir and prints the table; the work is cnnlab.compare.
"""

import sys

USAGE = "usage: python src/compare.py <multirun dir> [by=key[,key...]]"


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or any(not arg.startswith("by=") for arg in argv[1:]):
        print(USAGE, file=sys.stderr)
        return 2
    by = [key for arg in argv[1:] for key in arg.removeprefix("by=").split(",") if key] or None

    from cnnlab import UserError
    from cnnlab.compare import compare

    try:
        print(compare(argv[0], by), end="")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {argv[0].rstrip('/')}/report.md and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
