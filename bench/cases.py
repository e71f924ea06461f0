"""``BATCHxLENGTH`` lists on the command line (``1x512,32x8192``), shared by the benchmarks that take them."""

from __future__ import annotations

import argparse


def parse_cases(parser: argparse.ArgumentParser, flag: str, text: str) -> list[tuple[int, int]]:
    """The ``(batch, length)`` pairs of ``text`` (empty: none); a malformed item ends the run with ``parser``'s
    usage error naming ``flag``, not a traceback."""
    cases = []
    for item in filter(None, text.split(",")):
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"{flag} takes BATCHxLENGTH items such as 1x32768, got {item!r}")
        cases.append((int(parts[0]), int(parts[1])))
    return cases
