#!/usr/bin/env python3
"""Rebuilds calib-default.txt from the three corpora (see README.md beside this file).

Usage: make-calib-default.py KJV_TXT PYDOCS_TXT PY_STDLIB_TXT > calib-default.txt

Takes three ~25 KB slices of each corpus, at 5%, 35% and 65% of the file (all inside the first 90%, which
keeps the last 10% of each corpus free for held-out evaluation), each starting at a paragraph boundary and
ending at a line end, and interleaves them: Bible, docs, code, Bible, docs, code, ...
"""
import sys

SLICE = 25_000
FRACTIONS = (0.05, 0.35, 0.65)


def paragraph_start(text, pos):
    """The first position at or after `pos` that begins a non-indented line after a blank line."""
    while True:
        i = text.find("\n\n", pos)
        if i < 0:
            raise SystemExit("no paragraph boundary found")
        j = i + 2
        while j < len(text) and text[j] == "\n":
            j += 1
        if j < len(text) and not text[j].isspace():
            return j
        pos = j


def slices(path):
    text = open(path, encoding="utf-8").read()
    out = []
    for f in FRACTIONS:
        start = paragraph_start(text, int(len(text) * f))
        end = text.rfind("\n", start, start + SLICE) + 1
        assert end > start and end < len(text) * 0.9
        out.append(text[start:end])
    return out


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    parts = [slices(p) for p in sys.argv[1:]]
    chunks = [p[i] for i in range(len(FRACTIONS)) for p in parts]
    sys.stdout.write("\n\n".join(c.rstrip("\n") for c in chunks) + "\n")


if __name__ == "__main__":
    main()
