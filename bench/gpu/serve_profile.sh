#!/usr/bin/env bash
# Where does a batched decode step of `deltazip serve` go on the GPU? The base alone (synth 7B), the same
# 32 concurrent requests three ways (greedy short prompts, sampled short prompts, greedy long prompts),
# and a poor man's profile: the server's thread stacks sampled with cuda-gdb during the sampled run.
#   DZ=... CORPUS=... OUT=... bash bench/gpu/serve_profile.sh
set -u
W=${DZ_WORK:-/tmp/dzsrv}
DZ=${DZ:-$W/deltazip}
mkdir -p "$W" "$OUT"
[[ -f "$W/base/config.json" ]] || "$DZ" synth model --shape llama-7b --dtype bf16 --seed 1 --out "$W/base" 2>&1 | tail -1
printf '[base]\npath = "%s/base"\ndtype = "bf16"\nname = "base"\n[runtime]\ndevice = "cuda"\n[scheduler]\nmax_seqs = 32\n' "$W" > "$W/prof.toml"
"$DZ" serve --config "$W/prof.toml" --port 8400 > "$OUT/serve-prof.log" 2>&1 &
pid=$!
until curl -sf http://127.0.0.1:8400/health > /dev/null; do sleep 1; done
curl -s http://127.0.0.1:8400/v1/completions -H 'Content-Type: application/json' -d '{"model":"base","prompt":"warm up","max_tokens":4}' > /dev/null
run() { # run NAME PROMPT_WORDS EXTRA
    "$DZ" bench serve --url http://127.0.0.1:8400 --models base --api completions --rates inf --requests 32 \
        --corpus "$CORPUS" --prompt-words "$2" --max-tokens 64 --seed 1 --system "$1" ${3:+--extra-body "$3"} \
        --out "$OUT/profile" --append --quiet > /dev/null 2>&1
    tail -1 "$OUT/profile.md" > /dev/null
}
run greedy-short 8..16 '{"temperature":0}'
(sleep 6; for i in 1 2 3; do timeout 60 cuda-gdb -p $pid -batch -ex "thread apply all bt 14" > "$OUT/stacks-$i.txt" 2>&1; sleep 2; done) &
run sampled-short 8..16
wait
run greedy-long 120..160 '{"temperature":0}'
kill $pid
grep -E "^\| (greedy|sampled)" "$OUT/profile.md" | cut -d'|' -f2,5,8,9,10,11,12,13
for i in 1 2 3; do echo "== stacks $i"; grep -E "^#[0-9]" "$OUT/stacks-$i.txt" | grep -vE "futex|syscall|epoll|clock_nanosleep|park|std::thread|__GI|pthread|start_thread|clone3" | cut -c1-160 | head -30; done
