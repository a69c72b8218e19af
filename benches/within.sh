# Sourced by the device scripts (device_check.sh, device_tensor.sh): each step's timeout within
# the script's DEADLINE (seconds since the script started, bash's SECONDS), RESERVE seconds (15
# unless set) kept for what the script does last.
# budget N: N seconds, or what is left before the deadline (less RESERVE seconds) if
# that is shorter.
budget() {
  local left=$((DEADLINE - SECONDS - ${RESERVE:-15}))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# within N CMD...: run CMD with a timeout of budget N; skip it when that is cut under 10 s.
within() {
  local n
  n=$(budget "$1")
  if [ "$n" -lt 10 ] && [ "$n" -lt "$1" ]; then
    echo "skipped, ${DEADLINE} s deadline reached: ${*:2:3} ..." >&2
    return 124
  fi
  shift
  timeout "$n" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && printf '\ncut after %s s (the step'"'"'s limit or the %s s deadline)\n' "$n" "$DEADLINE" >&2
  return "$rc"
}
