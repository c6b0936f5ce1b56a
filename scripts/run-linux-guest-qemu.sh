#!/usr/bin/env bash
# Boot the guest built by scripts/build-linux-guest.sh in QEMU (TCG by
# default), for manual checks of the kernel + initramfs outside Vanguard.
#
# Usage: scripts/run-linux-guest-qemu.sh [OUTDIR] [EXTRA KERNEL ARGS...]
#   OUTDIR defaults to <repo>/build/linux-guest.
#   Extra args are appended to 'console=ttyS0 panic=-1', e.g.
#     scripts/run-linux-guest-qemu.sh "" vanguard.shell   # interactive shell
#
# Environment:
#   TIMEOUT=120      seconds before QEMU is killed (0: no limit)
#   QEMU_ACCEL=tcg   accelerator (tcg, kvm)
#   QEMU_SMP=2  QEMU_MEM=256   vCPUs / MiB
#   QEMU=qemu-system-x86_64    binary
#
# Without vanguard.shell the guest powers off by itself; the script then
# exits 0 only if the console showed 'VANGUARD-LINUX-INIT: reached init'
# and QEMU exited (not timed out). The console log is also written to
# OUTDIR/qemu-console.log.
set -euo pipefail

die() { echo "run-linux-guest-qemu: error: $*" >&2; exit 1; }

SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd -P)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
esac

OUTDIR="${1:-}"
[ -n "$OUTDIR" ] || OUTDIR="$REPO_ROOT/build/linux-guest"
[ "$#" -gt 0 ] && shift
EXTRA="$*"

QEMU="${QEMU:-qemu-system-x86_64}"
command -v "$QEMU" >/dev/null 2>&1 ||
  die "$QEMU not found (Debian: apt-get install qemu-system-x86)"
for f in vmlinuz initramfs.cpio.gz; do
  [ -s "$OUTDIR/$f" ] || die "$OUTDIR/$f missing; run scripts/build-linux-guest.sh first"
done

APPEND="console=ttyS0 panic=-1${EXTRA:+ $EXTRA}"
ARGS=(-accel "${QEMU_ACCEL:-tcg}" -m "${QEMU_MEM:-256}" -smp "${QEMU_SMP:-2}"
      -nographic -no-reboot
      -kernel "$OUTDIR/vmlinuz" -initrd "$OUTDIR/initramfs.cpio.gz"
      -append "$APPEND")
TIMEOUT="${TIMEOUT:-120}"

echo "run-linux-guest-qemu: $QEMU ${ARGS[*]}" >&2

case " $EXTRA " in
  *vanguard.shell*)
    # Interactive: hand the terminal to QEMU (Ctrl-A X quits).
    if [ "$TIMEOUT" != 0 ]; then exec timeout --foreground "$TIMEOUT" "$QEMU" "${ARGS[@]}"; fi
    exec "$QEMU" "${ARGS[@]}" ;;
esac

LOG="$OUTDIR/qemu-console.log"
start=$(date +%s.%N)
rc=0
if [ "$TIMEOUT" != 0 ]; then
  timeout "$TIMEOUT" "$QEMU" "${ARGS[@]}" </dev/null 2>&1 | tee "$LOG" || rc=$?
else
  "$QEMU" "${ARGS[@]}" </dev/null 2>&1 | tee "$LOG" || rc=$?
fi
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

if [ "$rc" = 124 ]; then
  echo "run-linux-guest-qemu: FAIL: timed out after ${TIMEOUT}s" >&2; exit 1
elif [ "$rc" != 0 ]; then
  echo "run-linux-guest-qemu: FAIL: QEMU exited with status $rc after ${secs}s" >&2; exit 1
elif ! grep -q 'VANGUARD-LINUX-INIT: reached init' "$LOG"; then
  echo "run-linux-guest-qemu: FAIL: /init was not reached (see $LOG)" >&2; exit 1
fi
echo "run-linux-guest-qemu: OK: reached init, QEMU exited after ${secs}s" >&2
