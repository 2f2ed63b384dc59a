#!/bin/bash
# Session 21, call 5 (carry [".gpu/srv"], built at ce863a1): with host patches 0017 and 0018 on (the
# defaults), dz-2b24 x 32 beside the base at 16 req/s (half dz-4b24's delta bytes: does it reach 80% of
# the faster base?), and dz-4b24 x 32 at 7 req/s (between 6, p99 TTFT 0.33 s, and 8, 3.2 s, in PART=rates).
set -u
TAG=s21c; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log "start at ${COMMIT:-unknown}"
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
run() { # NAME SYSTEM RATES
  OUT=$S/$1 V4=1 RATES=$3 REQS=128 bash $R/gpu/serving.sh $2 > $S/$1.log 2>&1; local rc=$?
  log "$1 rc=$rc rate | tokens/s | TTFT p99 s | TPOT p50: $(grep -E '^\| (dz|base)' $S/$1/serving.md 2>/dev/null | cut -d'|' -f5,9,12,13 | tr '\n' ' ')"
}
run dz2b dz:2b24:32 16,16
run base base 16
run dz4b-r7 dz:4b24:32 7
log done
