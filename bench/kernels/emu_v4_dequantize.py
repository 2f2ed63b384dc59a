#!/usr/bin/env python3
"""The index arithmetic of the v4 dequantize kernel (crates/dz-kernels/kernels/v4/v4.cu, `dequantize`),
emulated on the CPU: the version that stored each lane's values where they decode (checked bit-exact on
the H200 in sessions 8-9) and the staged version of session 9 (shared memory, 8 rows at a time, written
row by row). With arbitrary decoded values standing in for the codes, both must write every element of
rows < n_stored and columns < K exactly once, with the same value (base added or not). Also checks that
the staging index is free of bank conflicts for the quant decode's writes and the row reads.

    python3 bench/kernels/emu_v4_dequantize.py
"""
import random
KB = 128
def val(packet, lane, p, which):
    return float(hash((packet, lane, p, which)) % 1000) / 7.0
def nib_of(packet, g, f, s, c, h):
    r = random.Random(hash((packet, g, f, s, c, h)))
    a, b = r.sample(range(4), 2)
    return a | (b << 2)

def old(n_stored, K, sparse, STEPS, base):
    nkb = (K + KB - 1) // KB
    packets = ((n_stored + 15) // 16) * nkb
    out = {}
    for packet in range(packets):
        rt, kb = packet // nkb, packet % nkb
        for lane in range(32):
            g, c = lane // 4, lane % 4
            def put(row, col, v):
                key = (row, col)
                assert key not in out, ("old twice", key)
                out[key] = (base.get(key, 0.0) if base is not None else 0.0) + v
            for p in range(STEPS * 4):
                s, f = p // 4, p % 4
                row = 16 * rt + g + 8 * (f & 1)
                if row >= n_stored: continue
                lo, hi = val(packet, lane, p, 0), val(packet, lane, p, 1)
                if not sparse:
                    col = KB * kb + 32 * c + 4 * s + 2 * (f >> 1)
                    if col < K:
                        put(row, col, lo); put(row, col + 1, hi)
                else:
                    run = 32 * kb + 8 * s + c + 4 * (f >> 1)
                    if 4 * run >= K: continue
                    nib = nib_of(packet, g, f, s, c, f & 1)
                    for q in range(4):
                        put(row, 4 * run + q, lo if q == (nib & 3) else hi if q == (nib >> 2) else 0.0)
    return out

STRIDE = KB + 4
def at(row, col): return row * STRIDE + col + (col >> 5)

def new(n_stored, K, sparse, STEPS, base):
    nkb = (K + KB - 1) // KB
    packets = ((n_stored + 15) // 16) * nkb
    out = {}
    for packet in range(packets):
        rt, kb = packet // nkb, packet % nkb
        st = [None] * (8 * STRIDE)
        for h in range(2):
            # decode phase, all lanes
            for lane in range(32):
                g, c = lane // 4, lane % 4
                for p in range(STEPS * 4):
                    s, f = p // 4, p % 4
                    if (f & 1) != h: continue
                    lo, hi = val(packet, lane, p, 0), val(packet, lane, p, 1)
                    if not sparse:
                        col = 32 * c + 4 * s + 2 * (f >> 1)
                        st[at(g, col)] = lo; st[at(g, col + 1)] = hi
                    else:
                        run = 8 * s + c + 4 * (f >> 1)
                        if 4 * (32 * kb + run) >= K: continue
                        nib = nib_of(packet, g, f, s, c, h)
                        for q in range(4):
                            st[at(g, 4 * run + q)] = lo if q == (nib & 3) else hi if q == (nib >> 2) else 0.0
            # write phase
            for lane in range(32):
                for i in range(8):
                    row = 16 * rt + 8 * h + i
                    if row >= n_stored: break
                    for e in range(4):
                        cl = 4 * lane + e; col = KB * kb + cl
                        if col >= K: continue
                        v = st[at(i, cl)]
                        assert v is not None, ("unset", row, col)
                        key = (row, col)
                        assert key not in out, ("new twice", key)
                        out[key] = (base.get(key, 0.0) if base is not None else 0.0) + v
    return out

# bank-conflict checks on the staging index
for s_ in range(8):
    for f in range(4):
        banks = [at(l // 4, 32 * (l % 4) + 4 * s_ + 2 * (f >> 1)) % 32 for l in range(32)]
        assert len(set(banks)) == 32, ("quant write conflict", s_, f)
for e in range(4):
    banks = [at(3, 4 * l + e) % 32 for l in range(32)]
    assert len(set(banks)) == 32, "row read conflict"

for (n, K) in [(16, 128), (40, 300), (33, 256), (17, 64), (48, 384)]:
    for sparse, STEPS in [(False, 8), (True, 4)]:
        if not sparse and K % 32: continue
        if sparse and K % 4: continue
        base = {(r, c): r * 0.5 - c for r in range(n) for c in range(K)}
        for b in (None, base):
            o, w = old(n, K, sparse, STEPS, b), new(n, K, sparse, STEPS, b)
            assert set(o) == {(r, c) for r in range(n) for c in range(K)}, "old coverage"
            assert o == w, (n, K, sparse)
print("ok: staged v4 dequantize writes the same elements and values as the scattered one; staging conflict-free")
