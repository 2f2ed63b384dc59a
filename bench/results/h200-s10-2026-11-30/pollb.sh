#!/bin/bash
# poll.sh SECONDS: wait, show the chain's log and the newest lines of the running steps, pack /tmp/s10b.
sleep "${1:-60}"
cat /tmp/s10b/s10b.log 2>/dev/null
for f in /tmp/s10b/kern.log /tmp/s10b/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -4 "$f" | cut -c1-220; }; done 2>/dev/null | tail -60
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
df -h /tmp | tail -1
tar czf "$OUT/s10b.tgz" -C /tmp --exclude='*.dz' --exclude='*.safetensors' s10b 2>/dev/null; ls -la "$OUT"
