#!/usr/bin/env bash
# Merge mode on the GPU (issue #7): `deltazip merge --device cuda` (dz-candle-ops' merge op) must write the
# same bytes as `--device cpu`. A SmolLM2-shaped bf16 base with one synthetic delta per codec, merged both
# ways and compared file by file (sha256), then the time of both on a 7B-shaped model, if one is there.
#
#   DZ=path/to/deltazip bash bench/gpu/merge_check.sh [BASE_7B DELTA_7B]
#
# Needs $DZ built with --features cuda (or nccl). Prints one table; work files in $W (deleted at the end).
set -u
W=${DZ_WORK:-/tmp/dzmerge}
DZ=${DZ:?DZ: the deltazip binary}
rm -rf "$W" && mkdir -p "$W"
"$DZ" synth model --shape smollm2-135m --dtype bf16 --seed 3 --out "$W/base" 2>&1 | tail -1
echo "| model | codec | cpu | cuda | files | identical |"
echo "|---|---|---:|---:|---:|---|"
fails=0
for c in ${CODECS:-4b24 2b24 4b 2b 8b}; do
    "$DZ" synth deltas --base "$W/base" --codec $c --count 1 --seed 11 --out-dir "$W/d-$c" 2>&1 | tail -1 > /dev/null
    d=$(ls "$W/d-$c"/*.dz | head -1)
    declare -A secs=()
    for dev in ${DEVICES:-cpu cuda}; do
        t0=$(date +%s%N)
        "$DZ" merge --base "$W/base" --delta "$d" --out "$W/m-$c-$dev" --device $dev > "$W/merge-$c-$dev.log" 2>&1 \
            || { echo "merge $c $dev failed:"; tail -5 "$W/merge-$c-$dev.log"; }
        secs[$dev]=$((($(date +%s%N) - t0) / 1000000))
    done
    n=0 same=yes
    for f in "$W/m-$c-cpu"/*; do
        n=$((n + 1))
        g="$W/m-$c-cuda/$(basename "$f")"
        [[ -f $g ]] && [[ $(sha256sum < "$f") == $(sha256sum < "$g") ]] || { same=NO; echo "  differs: $(basename "$f")"; }
    done
    [[ $same == yes ]] || fails=$((fails + 1))
    printf '| smollm2 | %s | %d ms | %d ms | %d | %s |\n' $c "${secs[cpu]:-0}" "${secs[cuda]:-0}" $n $same
done
if [[ $# -ge 2 ]]; then
    for dev in cuda cpu; do
        t0=$(date +%s%N)
        timeout 240 "$DZ" merge --base "$1" --delta "$2" --out "$W/m7b-$dev" --device $dev > "$W/merge7b-$dev.log" 2>&1 \
            || { echo "7B merge $dev failed or timed out:"; tail -3 "$W/merge7b-$dev.log"; }
        printf '| 7b | %s on %s: %d ms |\n' "$(basename "$2")" $dev $((($(date +%s%N) - t0) / 1000000))
    done
    if [[ -d $W/m7b-cpu && -d $W/m7b-cuda ]]; then
        d7=$(for f in "$W/m7b-cpu"/*.safetensors; do cmp -s "$f" "$W/m7b-cuda/$(basename "$f")" || echo "$(basename "$f")"; done)
        echo "7B cpu vs cuda: ${d7:-identical}"
    fi
fi
echo "merge check: $fails codec(s) differ"
rm -rf "$W"
