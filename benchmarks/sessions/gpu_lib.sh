# Sourced by the per-session device scripts (benchmarks/gpu_*.sh): whole-model throughput runs
# under one device call's deadline. The caller sets `out` (its results folder) and SECONDS=0.
#
# tp_run TAG LIMIT ARGS...: `throughput.py --iters 3 ARGS --out $out/tp_TAG.json`, for at most
# LIMIT seconds and never past TP_DEADLINE seconds of the call (default 560; skipped when under
# 30 s are left); its table rows, tagged [TAG], are appended to $out/throughput.md.
tp_run() {
  local tag=$1 limit=$2; shift 2
  local left=$((${TP_DEADLINE:-560} - SECONDS))
  [ "$left" -lt 30 ] && { echo "[$tag] skipped: ${left}s left"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" python3 benchmarks/throughput.py --iters 3 "$@" --out "$out/tp_$tag.json" 2>&1 |
    grep '^| vim' | sed "s/^/[$tag] /" | tee -a "$out/throughput.md"
  echo "[$tag] done at ${SECONDS}s"
}
