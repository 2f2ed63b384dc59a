#!/usr/bin/env python3
"""CPU emulation of the shared-memory v4 sbmm's x path (`SxTile` in crates/dz-kernels/kernels/v4/v4.cu).

The variant reads each lane's x words from a block's staged chunk instead of global memory. This checks,
for every lane, n-tile, K block and word, that the word read from the staged buffer is the word the
global-memory kernel (`Tile::load`) reads, or 0 where that kernel reads nothing (columns past K, whose
codes are the zero point). Also: every staged piece is written exactly once per chunk, the pieces past K
are zero-filled from an in-bounds address, and no lane reads outside its buffer. Bank conflicts of the
reads are counted for 1 and 8 distinct x rows.

    python3 bench/kernels/emu_v4_sbmm_sx.py      # exits 1 on the first mismatch
"""
import itertools
import random
import sys

KB = 128          # columns per K block
THREADS = 256


def params(nt):
    xc = 8 if nt == 1 else 4            # sx_chunk_blocks
    xr = 8 * nt                         # staged rows
    stride = xc * KB // 2 + 4           # words per staged row
    return xc, xr, stride, xr * stride


def global_word(x, row, word):
    return x[row][word]


def stage(x, rows, k, ch, nt):
    """The buffer after `stage(buf, x, rows, K, ch)`: word index -> value (None: not written)."""
    xc, xr, stride, buf_words = params(nt)
    buf = [None] * buf_words
    pieces = xc * KB // 8
    written = set()
    for p in range(xr * pieces):        # every thread's strided loop, all pieces once
        r, q = divmod(p, pieces)
        col = ch * xc * KB + q * 8
        src_row = min(r, rows - 1)
        src_col = min(col, k - 8)
        assert 0 <= src_col and src_col + 8 <= k, "source address out of bounds"
        dst = r * stride + q * 4
        assert dst + 4 <= buf_words
        for w in range(4):
            assert dst + w not in written, "piece written twice"
            written.add(dst + w)
            buf[dst + w] = x[src_row][src_col // 2 + w] if col < k else 0
    return buf


def lane_reads(nt, sparse, lane):
    """(t, register index j, word offset within the block's 64 words) for lane's x words."""
    g, c = divmod(lane, 4)
    out = []
    for t in range(nt):
        if not sparse:
            for i in range(4):
                for e in range(4):
                    out.append((t, 4 * i + e, 16 * c + 4 * i + e))
        else:
            for s in range(4):
                for i in range(4):
                    out.append((t, 4 * s + i, 16 * s + 4 * i + c))
    return out


def check(rows, k, nt, sparse):
    xc, xr, stride, buf_words = params(nt)
    nkb = (k + KB - 1) // KB
    nchunks = (nkb + xc - 1) // xc
    words = k // 2
    # distinct x words: (row, word) -> a unique id, so any mix-up shows
    x = [[1 + r * 100000 + w for w in range(words)] for r in range(rows)]
    bufs = [stage(x, rows, k, ch, nt) for ch in range(nchunks)]
    for kb in range(nkb):
        ch, j = divmod(kb, xc)
        buf = bufs[ch]
        k0 = kb * KB
        for lane in range(32):
            g, c = divmod(lane, 4)
            for t, reg, off in lane_reads(nt, sparse, lane):
                idx = (8 * t + g) * stride + j * (KB // 2) + off
                assert 0 <= idx < buf_words, "read outside the buffer"
                got = buf[idx]
                assert got is not None, "read of an unwritten word"
                row = min(8 * t + g, rows - 1)
                word = kb * (KB // 2) + off
                col = 2 * word
                # the global kernel: quant loads 32 columns 32c.. if k0 + 32c < K; sparse loads step s's
                # words if k0 + 32s < K; either way exactly the words whose columns are < K (K % 32 == 0)
                want = global_word(x, row, word) if col < k else 0
                if got != want:
                    print(f"MISMATCH rows={rows} k={k} nt={nt} sparse={sparse} kb={kb} lane={lane} "
                          f"t={t} reg={reg}: staged {got}, global {want}")
                    return False
    return True


def conflicts(nt, sparse, distinct_rows):
    """Worst bank-conflict degree of one x_from read instruction (32-bit words, 32 banks)."""
    xc, xr, stride, _ = params(nt)
    worst = 1
    for t in range(nt):
        for j_reg in range(16):
            banks = {}
            for lane in range(32):
                g, c = divmod(lane, 4)
                row = min(8 * t + g, distinct_rows - 1)
                reads = [r for r in lane_reads(nt, sparse, lane) if r[0] == t and r[1] == j_reg]
                for _, _, off in reads:
                    idx = row * stride + off
                    banks.setdefault(idx % 32, set()).add(idx)
            worst = max(worst, max(len(v) for v in banks.values()))
    return worst


def main():
    random.seed(1)
    cases = [(r, k) for r in (1, 3, 8, 9, 16) for k in (32, 96, 128, 1024, 4000, 4096, 11008)]
    ok = True
    for (rows, k), nt, sparse in itertools.product(cases, (1, 2), (False, True)):
        if rows > 8 * nt:
            continue
        ok &= check(rows, k, nt, sparse)
    if not ok:
        sys.exit(1)
    print(f"x path: {len(cases)} shapes x tiles x codecs: every staged read equals the global kernel's")
    for nt, sparse in itertools.product((1, 2), (False, True)):
        kind = "sparse24" if sparse else "quant"
        # quant reads 16 bytes a lane: 4 words from the same row; the degree is per word bank
        print(f"  n{nt} {kind}: worst bank-conflict degree, 1 x row: {conflicts(nt, sparse, 1)}; "
              f"8 x rows: {conflicts(nt, sparse, 8)}")


if __name__ == "__main__":
    main()
