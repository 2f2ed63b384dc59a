# Session 16, the 13B rerun (the first, 13b-first/s16b.sh, ran out of disk while the 7B files were still
# there: 3 of 8 deltas were missing, and every dz run failed at start-up; its base runs are valid).
# Run on the GPU machine as /tmp/s16c.sh after `rm -rf /tmp/dzsrv/4b24 /tmp/dzsrv/base /tmp/dz13/4b24`.
TAG=s16c; W=/tmp/dz13; . bench/gpu/chain_env.sh
export SHAPE=llama-13b GPU_DELTAS=76GiB
log start
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen 13b rc=$?"
( GPU=0 PORT_BASE=8200 OUT=$S/dz8 V4=1 RATES=4,16 REQS=96 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8.log 2>&1; log "dz8 rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/dz32 V4=1 CPU_CACHE=160GiB RATES=4 REQS=64 timeout 240 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz32.log 2>&1; log "dz32 rc=$?"
  touch $S/gpu0.done ) &
DZ_PROFILE=events GPU=1 PORT_BASE=8300 OUT=$S/dz8e V4=1 RATES=4 REQS=64 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8e.log 2>&1; log "dz8 events rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/dz8h V4=1 RATES=4 REQS=64 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8h.log 2>&1; log "dz8 host rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
