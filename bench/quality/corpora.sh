#!/usr/bin/env bash
# Rebuilds the quality benchmark's four text corpora from Debian packages (bookworm), with apt-get download
# + dpkg -x: nothing else is fetched, nothing is installed.
#
#     bench/quality/corpora.sh OUT_DIR            # writes OUT_DIR/{py_stdlib,pydocs,kjv,gcide}.txt
#     bench/quality/corpora.sh OUT_DIR --tar F    # ... and packs them into F (tar.xz, about 6 MB)
#
# | file          | domain                              | package (licence)                       |
# |---------------|-------------------------------------|-----------------------------------------|
# | py_stdlib.txt | Python source, 5.5 MB               | libpython3.11-stdlib (PSF)              |
# | pydocs.txt    | Python docs, reStructuredText, 11 MB| python3.11-doc (PSF)                    |
# | kjv.txt       | King James Bible prose, 4.3 MB      | bible-kjv-text, decoded by bible-kjv (PD)|
# | gcide.txt     | dictionary definitions, ~5 MB       | dict-gcide (GPL; Webster's 1913 + WordNet)|
#
# Each file is a concatenation in a fixed order (sorted paths; Bible order; dictionary order), so the last
# 10% (the held-out part the benchmark evaluates on) is always the same text. kjv.txt is byte-identical to
# ../shared/assets/corpora.tar.xz's; the two Python files hold the same sources in a slightly different
# concatenation. gcide.txt keeps every 8th entry of the dictionary (all letters, ~5 MB of 40 MB).
set -euo pipefail
out=${1:?usage: corpora.sh OUT_DIR [--tar FILE]}
tar_out=""
if [[ "${2:-}" == "--tar" ]]; then tar_out=${3:?--tar needs a file}; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download libpython3.11-stdlib python3.11-doc bible-kjv bible-kjv-text dict-gcide >/dev/null 2>&1 \
    || { echo "apt-get download failed (needs Debian bookworm sources and network)" >&2; exit 1; }
for d in *.deb; do mkdir -p "x/${d%%_*}"; dpkg -x "$d" "x/${d%%_*}"; done

# Python source: every .py of the package, sorted by path (LC_ALL=C), one after the other.
(cd x/libpython3.11-stdlib && find usr/lib/python3.11 -name '*.py' -type f | LC_ALL=C sort \
    | while read -r f; do cat "$f"; done) > "$out/py_stdlib.txt"

# Python docs: the reStructuredText sources of the HTML docs, sorted by path.
(cd x/python3.11-doc && find usr/share/doc/python3.11/html/_sources -name '*.txt' -type f | LC_ALL=C sort \
    | while read -r f; do cat "$f"; done) > "$out/pydocs.txt"

# KJV: the whole Bible through the package's own decoder, one verse per line.
x/bible-kjv/usr/bin/bible -l100000 -p x/bible-kjv-text/usr/lib "Genesis1:1-Revelation22:21" > "$out/kjv.txt"

# Dictionary: gcide.dict.dz is gzip-compatible plain text; entries start at an unindented line after a
# blank one; the dictionary writes special letters in ASCII ([ae], [aum]), so the few stray non-ASCII
# bytes (not UTF-8) are dropped. Skip the database header (before "A \A\") and keep every 8th entry.
gzip -dc x/dict-gcide/usr/share/dictd/gcide.dict.dz | awk '
    BEGIN { started = 0; n = 0; keep = 0; prev_blank = 1 }
    {
        if (!started) { if ($0 ~ /^A \\A\\/) started = 1; else next }
        if (prev_blank && $0 ~ /^[^ \t]/) { keep = (n % 8 == 0); n++ }
        if (keep) print
        prev_blank = ($0 ~ /^[ \t]*$/)
    }' | LC_ALL=C tr -cd '\11\12\40-\176' > "$out/gcide.txt"

for f in py_stdlib pydocs kjv gcide; do
    s=$(wc -c < "$out/$f.txt")
    [[ $s -gt 1000000 ]] || { echo "$f.txt is only $s bytes: the package layout changed?" >&2; exit 1; }
    echo "$out/$f.txt: $s bytes"
done
if [[ -n "$tar_out" ]]; then
    tar -C "$out" -cJf "$tar_out" py_stdlib.txt pydocs.txt kjv.txt gcide.txt
    echo "$tar_out: $(wc -c < "$tar_out") bytes"
fi
