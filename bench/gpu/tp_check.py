#!/usr/bin/env python3
"""Greedy completions with top-5 log-probs from a running deltazip server (issue #10's output check).

    tp_check.py collect URL OUT.json MODEL[,MODEL..]   # prompts below, 24 greedy tokens each
    tp_check.py compare A.json B.json                  # B against A, and each fine-tune against the base

A tensor-parallel run computes the same sums in another order (the row-parallel layers' partial products
are added by an all-reduce in bf16), so greedy text may part at a near-tie; the log-probs of the first
token say how close the two runs are, next to how far a fine-tune's delta moves them from the base.

A request that fails (an HTTP error status, a refused connection, a timeout) is printed with the status
and the first 500 characters of the server's answer, recorded in OUT.json as a row with an "error", and
the collection goes on; collect then exits with status 1.
"""
import json
import sys
import urllib.error
import urllib.request

PROMPTS = [
    "def fibonacci(n):",
    "In the beginning God created",
    "The word serendipity means",
]


def post(url, body):
    """(the decoded JSON answer, None), or (None, a one-line description of the failure)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        try:
            text = e.read().decode("utf-8", "replace")
        except Exception as read_error:  # the body itself could not be read
            text = f"(body unreadable: {read_error})"
        return None, f"HTTP {e.code} {e.reason}: {' '.join(text[:500].split())}"
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        return None, f"request failed: {e}"
    try:
        return json.loads(raw), None
    except ValueError:
        return None, f"not JSON: {raw[:500].decode('utf-8', 'replace')}"


def collect(url, out, models):
    rows = []
    errors = 0
    first_ok = None
    for m in models:
        for p in PROMPTS:
            r, err = post(url + "/v1/completions", {"model": m, "prompt": p, "max_tokens": 24,
                                                    "temperature": 0, "logprobs": 5})
            if r is None or not r.get("choices"):
                err = err or f"no choices in the answer: {json.dumps(r)[:500]}"
                errors += 1
                print(f"error: {m} / {p!r}: {err}")
                rows.append({"model": m, "prompt": p, "error": err, "text": None, "tokens": [],
                             "top0": {}})
                continue
            first_ok = first_ok or r
            ch = r["choices"][0]
            content = ((ch.get("logprobs") or {}).get("content")) or []
            toks = [c.get("token") for c in content]
            top0 = {}
            if content:
                for t in content[0].get("top_logprobs") or []:
                    top0[str(t.get("token"))] = t.get("logprob")
            rows.append({"model": m, "prompt": p, "text": ch.get("text"), "tokens": toks,
                         "top0": top0})
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{len(rows) - errors} completions, {errors} failed -> {out}")
    if first_ok is not None and not any(r["top0"] for r in rows):
        print("warning: no log-probs in the responses; first answer:", json.dumps(first_ok)[:800])
    return 1 if errors else 0


def prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def top_diff(a, b):
    shared = set(a) & set(b)
    if not shared:
        return float("nan")
    return max(abs(a[t] - b[t]) for t in shared)


def compare(fa, fb):
    A = {(r["model"], r["prompt"]): r for r in json.load(open(fa))}
    B = {(r["model"], r["prompt"]): r for r in json.load(open(fb))}
    print(f"| model | prompt | same text | common prefix (tokens) | max abs diff top-5 logprob, token 1 "
          f"({fb} vs {fa}) | same vs base in {fa} |")
    print("|---|---|---|---|---|---|")
    same = 0
    worst = 0.0
    failed = 0
    for k, a in A.items():
        b = B.get(k)
        if b is None:
            continue
        if a.get("error") or b.get("error"):
            failed += 1
            which = " / ".join(f"{f}: {r['error'][:120]}" for f, r in ((fa, a), (fb, b))
                               if r.get("error")).replace("|", "\\|")
            print(f"| {k[0]} | {k[1][:24]} | failed: {which} | | | |")
            continue
        base = A.get(("base", k[1]))
        vs_base = top_diff(a["top0"], base["top0"]) if base and k[0] != "base" else float("nan")
        d = top_diff(a["top0"], b["top0"])
        worst = max(worst, d) if d == d else worst
        same += a["text"] == b["text"]
        print(f"| {k[0]} | {k[1][:24]} | {a['text'] == b['text']} | {prefix(a['tokens'], b['tokens'])}"
              f"/{len(a['tokens'])} | {d:.4f} | {vs_base:.4f} |")
    print(f"\n{same}/{len(A)} completions with the same text ({failed} failed in either run); worst "
          f"first-token log-prob difference {worst:.4f}")


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        sys.exit(collect(sys.argv[2], sys.argv[3], sys.argv[4].split(",")))
    else:
        compare(sys.argv[2], sys.argv[3])
