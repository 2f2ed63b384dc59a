#!/bin/bash
# poll.sh SECONDS: wait, show the chain's log and the newest lines of the running steps, pack /tmp/s10c.
sleep "${1:-60}"
cat /tmp/s10c/s10c.log 2>/dev/null
for f in /tmp/s10c/kern.log /tmp/s10c/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -4 "$f" | cut -c1-220; }; done 2>/dev/null | tail -60
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
df -h /tmp | tail -1
tar czf "$OUT/s10c.tgz" -C /tmp --exclude='*.dz' --exclude='*.safetensors' s10c 2>/dev/null; ls -la "$OUT"
