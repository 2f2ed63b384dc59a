S=/tmp/s17; R=/tmp/k/bench; export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log() { echo "[r3 $(date +%T)] $*" >> $S/r3.log; }
for i in 3 4; do
  OUT=$S/base$i RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
  OUT=$S/dz$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
done
OUT=$S/dz2b3 V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:2b24:32 > $S/dz2b3.log 2>&1; log "dz2b 3 rc=$?"
log done
