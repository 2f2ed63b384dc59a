# Sourced by the device chains (next_chain.sh; the archived ones under bench/results) in the checkout's root on the GPU machine:
#   TAG=s15; W=/tmp/dzsrv; . bench/gpu/chain_env.sh   (separate statements: the function log reads TAG later)
# Sets S=/tmp/$TAG (the chain's output, created), log MSG (a timestamped line in $S/$TAG.log), R (a copy
# of bench/, so that the scripts stay the same while the chain runs), and unpacks the carried binaries:
# .gpu/srv's deltazip and corpus (both xz) into $W (DZ_WORK, DZ, CORPUS exported) and, when carried, .gpu/k's
# cuda_check and kernel_bench into /tmp/k/bin.
set -u
S=/tmp/$TAG; mkdir -p "$S"
log() { echo "[$TAG $(date +%T)] $*" >> "$S/$TAG.log"; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p "$W" && xz -dc .gpu/srv/deltazip.xz > "$W/deltazip" && chmod +x "$W/deltazip" && xz -dc .gpu/srv/corpus.txt.xz > "$W/corpus.txt"
if [ -d .gpu/k ]; then
    mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
fi
export DZ_WORK=$W DZ=$W/deltazip CORPUS=$W/corpus.txt
