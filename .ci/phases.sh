# Sourced by the .ci scripts that keep a cached venv outside the repository: phase timing and a quiet
# pip. The sourcing script sets `check_name` (the prefix of every line it prints) and `venv`.

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
phase_start=""
begin_phase() { phase_start="$(now)"; echo "== $check_name: $1"; }
end_phase() { echo "== $check_name: $1 took $(elapsed "$phase_start") s"; }

# pip's output (including one warning per unreachable local index entry) only matters on failure.
quiet_pip() {
  local log
  log="$(mktemp)"
  if ! "$venv/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "== $check_name: FAILED to install $* into $venv"
    return 1
  fi
  rm -f "$log"
}
