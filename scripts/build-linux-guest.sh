#!/usr/bin/env bash
# Build a small Linux guest for Vanguard from Debian's binary packages:
#   - the kernel (bzImage) of linux-image-cloud-amd64's current candidate,
#   - a busybox-static initramfs with a tiny /init and the virtio modules.
#
# Usage: scripts/build-linux-guest.sh [OUTDIR]
#   OUTDIR defaults to <repo>/build/linux-guest (git-ignored).
#
# Outputs in OUTDIR:
#   vmlinuz            bzImage, copied from the package's /boot/vmlinuz-<ver>
#   vmlinux            uncompressed ELF kernel, extracted from the bzImage
#                      payload (optional: skipped if no decompressor is found)
#   initramfs.cpio.gz  newc cpio, gzip, all entries owned by root
#   versions           kernel release and the package versions used
#   config             the kernel's .config (from /boot/config-<ver>)
#   stamp              cache key (package versions + script hash)
#   debs/              the downloaded .deb files (re-used on rebuilds)
#
# Environment:
#   VANGUARD_KERNEL_META  kernel metapackage (default linux-image-cloud-amd64)
#   VANGUARD_REBUILD=1    ignore the cache and rebuild
#
# Needs: apt-get/apt-cache/dpkg-deb (Debian or a derivative), python3, gzip.
# Optional: lz4/xz/zstd/... to extract vmlinux. Never reads stdin.
# See docs/linux-guest.md for the /init contract.
set -euo pipefail

die() { echo "build-linux-guest: error: $*" >&2; exit 1; }
log() { echo "build-linux-guest: $*" >&2; }

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
SCRIPT_DIR="$(dirname "$SCRIPT_PATH")"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"

case "${1:-}" in
  -h|--help)
    sed -n '2,/^set -euo/p' "$SCRIPT_PATH" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0 ;;
esac
[ "$#" -le 1 ] || die "too many arguments (usage: $0 [OUTDIR])"

OUTDIR="${1:-$REPO_ROOT/build/linux-guest}"
mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd -P)"

META_PKG="${VANGUARD_KERNEL_META:-linux-image-cloud-amd64}"
BUSYBOX_PKG="busybox-static"

# Modules wanted in the initramfs (names as in lsmod; '-' and '_' are
# equivalent). Missing ones are skipped with a note; their dependencies
# are added automatically.
WANT_MODULES="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev
virtio_pci virtio_mmio virtio_blk failover net_failover virtio_net
virtio_console virtio_rng vsock vmw_vsock_virtio_transport_common
vmw_vsock_virtio_transport"

export LC_ALL=C DEBIAN_FRONTEND=noninteractive

for tool in apt-cache apt-get dpkg-deb python3 gzip sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (this script needs a Debian-based host with python3)"
done

# Serialise concurrent builds of the same OUTDIR.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$OUTDIR/.lock"
  flock 9
fi

# ---------------------------------------------------------------- versions --

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $*"
  fi
}

# Candidate versions of packages $2.. ; prints the one of package $1
# (empty if none) from the policy text in $POLICY.
POLICY=""
load_policy() { POLICY="$(apt-cache policy "$@" 2>/dev/null || true)"; }
candidate() {
  awk -v p="$1:" '$0 ~ /^[^ ]/ { cur = $1 } cur == p && $1 == "Candidate:" { if ($2 != "(none)") print $2; exit }' <<<"$POLICY"
}

# One apt-cache call (each costs ~0.5 s without a pkgcache.bin).
load_policy "$META_PKG" "$BUSYBOX_PKG"
meta_ver="$(candidate "$META_PKG")"
if [ -z "$meta_ver" ]; then
  log "no candidate for $META_PKG; running apt-get update"
  as_root apt-get update -q >&2 </dev/null || die "apt-get update failed"
  load_policy "$META_PKG" "$BUSYBOX_PKG"
  meta_ver="$(candidate "$META_PKG")"
  [ -n "$meta_ver" ] || die "package $META_PKG has no installation candidate (check /etc/apt/sources.list*)"
fi

# The metapackage depends on the versioned image, e.g.
# "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
kpkg_dep="$(apt-cache show "$META_PKG=$meta_ver" 2>/dev/null |
  awk -F': ' '$1 == "Depends" { print $2; exit }' | tr ',' '\n' |
  sed -n 's/^ *\(linux-image-[^ ]*\)\( *(= *\([^)]*\))\)\{0,1\}.*$/\1 \3/p' | head -n1)"
[ -n "$kpkg_dep" ] || die "cannot find the linux-image-* dependency of $META_PKG=$meta_ver"
KPKG="${kpkg_dep%% *}"
KVER="${kpkg_dep#* }"
if [ -z "$KVER" ] || [ "$KVER" = "$KPKG" ]; then
  load_policy "$KPKG" "$BUSYBOX_PKG"
  KVER="$(candidate "$KPKG")"
fi
[ -n "$KVER" ] || die "no candidate version for $KPKG"

BBVER="$(candidate "$BUSYBOX_PKG")"
[ -n "$BBVER" ] || die "no candidate for $BUSYBOX_PKG"

SCRIPT_SHA="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"
STAMP_CONTENT="meta=$META_PKG $meta_ver
kernel=$KPKG $KVER
busybox=$BUSYBOX_PKG $BBVER
script=$SCRIPT_SHA"

if [ "${VANGUARD_REBUILD:-0}" != 1 ] &&
   [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initramfs.cpio.gz" ] &&
   [ -f "$OUTDIR/stamp" ] && [ "$(cat "$OUTDIR/stamp")" = "$STAMP_CONTENT" ]; then
  echo "Linux guest is up to date ($KPKG $KVER, busybox $BBVER):"
  echo "  kernel:    $OUTDIR/vmlinuz"
  [ -s "$OUTDIR/vmlinux" ] && echo "  vmlinux:   $OUTDIR/vmlinux"
  echo "  initramfs: $OUTDIR/initramfs.cpio.gz"
  exit 0
fi

log "building: $KPKG $KVER, $BUSYBOX_PKG $BBVER -> $OUTDIR"
rm -f "$OUTDIR/stamp"

# --------------------------------------------------------------- download --

DEBS="$OUTDIR/debs"
mkdir -p "$DEBS"

fetch_deb() { # pkg version -> prints path of the .deb
  local pkg="$1" ver="$2" f
  for f in "$DEBS/${pkg}"_*.deb; do
    [ -f "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$pkg" ] &&
       [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ]; then
      echo "$f"; return 0
    fi
  done
  rm -f "$DEBS/${pkg}"_*.deb
  local sandbox=()
  [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
  log "downloading $pkg=$ver"
  (cd "$DEBS" && apt-get download -q "${sandbox[@]}" "$pkg=$ver" </dev/null >&2) ||
    die "apt-get download $pkg=$ver failed"
  for f in "$DEBS/${pkg}"_*.deb; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  die "downloaded $pkg but no .deb found in $DEBS"
}

KDEB="$(fetch_deb "$KPKG" "$KVER")"
BBDEB="$(fetch_deb "$BUSYBOX_PKG" "$BBVER")"

# ---------------------------------------------------------------- extract --

WORK="$OUTDIR/.work"
rm -rf "$WORK"
mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/root"
trap 'rm -rf "$WORK"' EXIT

dpkg-deb -x "$KDEB" "$WORK/kernel" || die "cannot extract $KDEB"
dpkg-deb -x "$BBDEB" "$WORK/busybox" || die "cannot extract $BBDEB"

set -- "$WORK"/kernel/boot/vmlinuz-*
[ "$#" = 1 ] && [ -f "$1" ] || die "expected exactly one /boot/vmlinuz-* in $KDEB"
VMLINUZ_SRC="$1"
KREL="${VMLINUZ_SRC##*/vmlinuz-}"
KMODDIR="$WORK/kernel/lib/modules/$KREL"
[ -d "$KMODDIR" ] || KMODDIR="$WORK/kernel/usr/lib/modules/$KREL"
[ -d "$KMODDIR" ] || die "no lib/modules/$KREL in $KDEB"

BUSYBOX_BIN="$WORK/busybox/bin/busybox"
[ -x "$BUSYBOX_BIN" ] || BUSYBOX_BIN="$WORK/busybox/usr/bin/busybox"
[ -x "$BUSYBOX_BIN" ] || die "no busybox binary in $BBDEB"

# ------------------------------------------------------------- python bits --

# Helpers: module selection/ordering, vmlinux extraction, cpio writer.
IFS= read -r -d '' PYHELPER <<'PYEOF' || true
import os, stat, struct, subprocess, sys, gzip, shutil, lzma

def norm(name):
    return name.replace('-', '_')

def modinfo_depends(path):
    data = open(path, 'rb').read()
    # .modinfo holds NUL-separated key=value strings; depends= is unique.
    i = data.find(b'\0depends=')
    if i < 0:
        return []
    j = data.index(b'\0', i + 1)
    val = data[i + 9:j].decode()
    return [norm(d) for d in val.split(',') if d]

def decompress_to(src, dst):
    if src.endswith('.ko'):
        shutil.copyfile(src, dst)
    elif src.endswith('.ko.xz'):
        with lzma.open(src) as f, open(dst, 'wb') as o:
            shutil.copyfileobj(f, o)
    elif src.endswith('.ko.gz'):
        with gzip.open(src) as f, open(dst, 'wb') as o:
            shutil.copyfileobj(f, o)
    elif src.endswith('.ko.zst'):
        with open(dst, 'wb') as o:
            subprocess.run(['zstd', '-dc', src], stdout=o, check=True)
    else:
        raise SystemExit('unknown module format: ' + src)

def cmd_modules(moddir, destdir, want):
    # Index all modules shipped by the package.
    index = {}
    for root, _, files in os.walk(moddir):
        for f in files:
            for ext in ('.ko', '.ko.xz', '.ko.gz', '.ko.zst'):
                if f.endswith(ext):
                    index[norm(f[:-len(ext)])] = os.path.join(root, f)
    builtin = set()
    bpath = os.path.join(moddir, 'modules.builtin')
    if os.path.exists(bpath):
        for line in open(bpath):
            builtin.add(norm(os.path.basename(line.strip()).split('.ko')[0]))
    order, seen, missing, formats = [], set(), [], set()
    deps = {}
    def visit(name, chain):
        if name in seen:
            return
        if name in chain:
            raise SystemExit('module dependency loop: ' + ' -> '.join(chain + [name]))
        if name not in index:
            if name not in builtin:
                missing.append(name)
            return
        d = modinfo_depends(index[name]) if index[name].endswith('.ko') else None
        if d is None:
            tmp = os.path.join(destdir, '.probe.ko')
            decompress_to(index[name], tmp)
            d = modinfo_depends(tmp)
            os.unlink(tmp)
        deps[name] = d
        for dep in d:
            visit(dep, chain + [name])
        seen.add(name)
        order.append(name)
    for w in want:
        visit(norm(w), [])
    rel = {}
    for name in order:
        src = index[name]
        r = os.path.relpath(src, moddir)
        formats.add(r[r.index('.ko'):])
        r = r[:r.index('.ko')] + '.ko'
        rel[name] = r
        dst = os.path.join(destdir, r)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        decompress_to(src, dst)
    with open(os.path.join(destdir, 'vanguard.modules'), 'w') as f:
        for name in order:
            f.write(rel[name] + '\n')
    # modules.dep for busybox/kmod modprobe: direct + indirect deps.
    def closure(name, acc):
        for d in deps.get(name, []):
            if d in rel and d not in acc:
                acc.append(d)
                closure(d, acc)
        return acc
    with open(os.path.join(destdir, 'modules.dep'), 'w') as f:
        for name in order:
            f.write('%s: %s\n' % (rel[name], ' '.join(rel[d] for d in closure(name, []))))
    for src in ('modules.order', 'modules.builtin', 'modules.builtin.modinfo'):
        p = os.path.join(moddir, src)
        if os.path.exists(p):
            shutil.copyfile(p, os.path.join(destdir, src))
    print('formats=' + ','.join(sorted(formats)))
    print('loaded=' + ' '.join(order))
    print('missing=' + ' '.join(missing))

# bzImage payload -> vmlinux. Magic numbers of the kernel's compressors.
MAGICS = [
    (b'\x1f\x8b', 'gzip', ['gzip', '-dc']),
    (b'\xfd7zXZ\x00', 'xz', ['xz', '-dc']),
    (b'\x28\xb5\x2f\xfd', 'zstd', ['zstd', '-dc']),
    (b'\x02\x21\x4c\x18', 'lz4', ['lz4', '-dc']),
    (b'BZh', 'bzip2', ['bzip2', '-dc']),
    (b'\x5d\x00\x00', 'lzma', ['xz', '-dc', '--format=lzma']),
    (b'\x89LZO', 'lzo', ['lzop', '-dc']),
]

def cmd_payload_format(bzimage):
    d = open(bzimage, 'rb').read()
    if d[0x202:0x206] != b'HdrS':
        print('unknown'); return
    setup_sects = d[0x1f1] or 4
    off, length = struct.unpack_from('<II', d, 0x248)
    payload = d[(setup_sects + 1) * 512 + off:][:length]
    for magic, name, _ in MAGICS:
        if payload.startswith(magic):
            print(name); return
    print('unknown')

def cmd_vmlinux(bzimage, out):
    d = open(bzimage, 'rb').read()
    if d[0x202:0x206] != b'HdrS':
        raise SystemExit('not a bzImage (no HdrS): ' + bzimage)
    setup_sects = d[0x1f1] or 4
    off, length = struct.unpack_from('<II', d, 0x248)
    payload = d[(setup_sects + 1) * 512 + off:][:length]
    for magic, name, argv in MAGICS:
        if not payload.startswith(magic):
            continue
        if shutil.which(argv[0]) is None:
            print('no %s tool to decompress the %s payload' % (argv[0], name), file=sys.stderr)
            sys.exit(2)
        # All formats but gzip carry a 4-byte size trailer (size_append).
        for body in (payload[:-4], payload):
            r = subprocess.run(argv, input=body, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
            if r.stdout[:4] == b'\x7fELF':
                with open(out, 'wb') as f:
                    f.write(r.stdout)
                print(name)
                return
        print('decompressing the %s payload did not give an ELF' % name, file=sys.stderr)
        sys.exit(2)
    print('unknown bzImage payload compression', file=sys.stderr)
    sys.exit(2)

def cmd_cpio(root, out):
    # newc cpio of `root`, every entry uid/gid 0, mtime 0, plus /dev/console
    # and /dev/null device nodes (so the kernel can open the initial console
    # before /init mounts devtmpfs), written through gzip -9 -n.
    entries = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs + files):
            entries.append(os.path.join(dirpath, n))
    entries.sort(key=lambda p: os.path.relpath(p, root))
    ino = [0]
    chunks = []
    def add(name, mode, data=b'', rdev=(0, 0), nlink=1):
        ino[0] += 1
        nameb = name.encode() + b'\0'
        hdr = '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' % (
            ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(nameb), 0)
        buf = hdr.encode() + nameb
        buf += b'\0' * (-len(buf) % 4)
        buf += data
        buf += b'\0' * (-len(buf) % 4)
        chunks.append(buf)
    names = set()
    for p in entries:
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        names.add(rel)
        if stat.S_ISLNK(st.st_mode):
            add(rel, stat.S_IFLNK | 0o777, os.readlink(p).encode())
        elif stat.S_ISDIR(st.st_mode):
            add(rel, stat.S_IFDIR | (st.st_mode & 0o7777), nlink=2)
        elif stat.S_ISREG(st.st_mode):
            add(rel, stat.S_IFREG | (st.st_mode & 0o7777), open(p, 'rb').read())
        else:
            raise SystemExit('unsupported file type: ' + p)
    for name, maj, mnr, perm in (('dev/console', 5, 1, 0o600), ('dev/null', 1, 3, 0o666)):
        if name not in names:
            add(name, stat.S_IFCHR | perm, rdev=(maj, mnr))
    add('TRAILER!!!', 0)
    with open(out, 'wb') as raw:
        with gzip.GzipFile(filename='', mode='wb', fileobj=raw, compresslevel=9, mtime=0) as g:
            for c in chunks:
                g.write(c)

def cmd_symlinks(root, target, paths):
    # root/<path> -> relative link to root/<target>, e.g. usr/bin/awk -> ../../bin/busybox
    for p in paths:
        if p == target:
            continue
        d = os.path.dirname(p)
        os.makedirs(os.path.join(root, d), exist_ok=True)
        link = os.path.join(root, p)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.relpath(target, d or '.'), link)

cmd = sys.argv[1]
if cmd == 'symlinks':
    cmd_symlinks(sys.argv[2], sys.argv[3], sys.argv[4].split())
elif cmd == 'modules':
    cmd_modules(sys.argv[2], sys.argv[3], sys.argv[4].split())
elif cmd == 'vmlinux':
    cmd_vmlinux(sys.argv[2], sys.argv[3])
elif cmd == 'payload-format':
    cmd_payload_format(sys.argv[2])
elif cmd == 'cpio':
    cmd_cpio(sys.argv[2], sys.argv[3])
else:
    raise SystemExit('unknown helper command ' + cmd)
PYEOF

py() { python3 -c "$PYHELPER" "$@"; }

# -------------------------------------------------------------- initramfs --

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root}
chmod 1777 "$ROOT/tmp"
install -m 0755 "$BUSYBOX_BIN" "$ROOT/bin/busybox"

# Applet symlinks, at the paths busybox itself reports (bin/sh, sbin/insmod,
# usr/bin/setsid, ...). busybox-static runs on the (x86-64) build host; if it
# cannot, fall back to the applets /init relies on.
if applets="$("$ROOT/bin/busybox" --list-full 2>/dev/null)" && [ -n "$applets" ]; then
  :
else
  applets="bin/sh bin/mount bin/umount bin/uname bin/grep bin/cat bin/echo
bin/sleep bin/sync bin/ls bin/mkdir bin/dmesg sbin/insmod sbin/modprobe
sbin/poweroff sbin/reboot usr/bin/awk usr/bin/setsid bin/cttyhack"
fi
py symlinks "$ROOT" bin/busybox "$applets" || die "creating busybox applet links failed"

MODDEST="$ROOT/lib/modules/$KREL"
mkdir -p "$MODDEST"
modreport="$(py modules "$KMODDIR" "$MODDEST" "$WANT_MODULES")" || die "module selection failed"
MOD_FORMATS="$(sed -n 's/^formats=//p' <<<"$modreport")"
MOD_LOADED="$(sed -n 's/^loaded=//p' <<<"$modreport")"
MOD_MISSING="$(sed -n 's/^missing=//p' <<<"$modreport")"
[ -z "$MOD_MISSING" ] || log "note: modules not in $KPKG (skipped): $MOD_MISSING"

cat >"$ROOT/init" <<'INITEOF'
#!/bin/sh
# Vanguard Linux guest /init (busybox sh). See docs/linux-guest.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "VANGUARD-LINUX-INIT: $*"; }
CMDLINE="$(cat /proc/cmdline)"

say "reached init"
say "kernel=$(uname -r)"
say "cpus=$(grep -c ^processor /proc/cpuinfo)"
say "memtotal_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"

# Load the virtio modules in dependency order (skip with vanguard.nomodules).
case " $CMDLINE " in
  *" vanguard.nomodules "*) ;;
  *)
    kdir="/lib/modules/$(uname -r)"
    total=0 ok=0
    if [ -f "$kdir/vanguard.modules" ]; then
      while read -r m; do
        [ -n "$m" ] || continue
        total=$((total + 1))
        if insmod "$kdir/$m" 2>/dev/null; then ok=$((ok + 1)); fi
      done <"$kdir/vanguard.modules"
    fi
    say "modules=$ok/$total"
    ;;
esac

# The value of kernel parameter $1 (NAME=VALUE), empty if absent.
param() {
  for w in $CMDLINE; do
    case "$w" in "$1="*) echo "${w#*=}"; return ;; esac
  done
}

# The write test's 8 KiB: 256 numbered lines of 32 bytes.
pattern() {
  i=0
  while [ "$i" -lt 256 ]; do printf 'vanguard-vhost-user-blk-%07d\n' "$i"; i=$((i + 1)); done
}

md5() { md5sum | cut -d' ' -f1; }

# vanguard.test=blk: the virtio disks as Linux's virtio_blk driver sees them (docs/linux-guest.md).
blk_scenario() {
  dmesg -n 1 # kernel messages would cut into the lines below
  say "blk begin"
  disks=""
  for d in /sys/block/vd*; do [ -e "$d" ] && disks="$disks ${d##*/}"; done
  for n in $disks; do
    say "blk disk=$n sectors=$(cat /sys/block/$n/size) ro=$(cat /sys/block/$n/ro)" \
      "serial=$(cat /sys/block/$n/serial 2>/dev/null) queues=$(ls /sys/block/$n/mq | wc -l)" \
      "features=$(cat /sys/block/$n/device/features) md5=$(md5 </dev/$n)"
  done
  set -- $disks
  first="${1:-}" second="${2:-}"
  if [ -n "$first" ]; then
    pattern >/tmp/pattern
    if [ "$(cat /sys/block/$first/ro)" = 1 ]; then
      r=refused
      dd if=/tmp/pattern of=/dev/$first bs=512 seek=2048 conv=fsync 2>/dev/null && r=accepted
      say "blk write disk=$first result=$r"
    else
      # 8 KiB at 1 MiB, past the page cache both ways.
      r=failed back=differ
      dd if=/tmp/pattern of=/dev/$first bs=4096 seek=256 oflag=direct conv=fsync 2>/dev/null && r=ok
      [ "$(dd if=/dev/$first bs=4096 skip=256 count=2 iflag=direct 2>/dev/null | md5)" = \
        "$(md5 </tmp/pattern)" ] && back=match
      say "blk write disk=$first offset=1048576 bytes=8192 result=$r readback=$back"
      # 64 KiB at 2 MiB: reads back as zeros.
      r=failed
      blkdiscard -o 2097152 -l 65536 /dev/$first 2>/dev/null && r=ok
      say "blk discard disk=$first offset=2097152 bytes=65536 result=$r"
      sync
      echo 3 >/proc/sys/vm/drop_caches
      say "blk after disk=$first md5=$(md5 </dev/$first)"
    fi
  fi
  if [ -n "$second" ] && [ "$(cat /sys/block/$second/ro)" = 0 ]; then
    mkfs=failed mnt=failed files=failed umnt=failed hello="" big=""
    mke2fs -F -L vanguard /dev/$second >/dev/null 2>&1 && mkfs=ok
    mkdir -p /mnt
    if [ "$mkfs" = ok ] && mount -t ext2 /dev/$second /mnt 2>/dev/null; then
      mnt=ok
      if echo "hello from Linux over vhost-user-blk" >/mnt/hello.txt && mkdir /mnt/dir &&
         for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do cat /tmp/pattern; done >/mnt/dir/pattern.bin
      then files=ok; fi
      hello="$(md5 </mnt/hello.txt)" big="$(md5 </mnt/dir/pattern.bin)"
      umount /mnt && umnt=ok
    fi
    say "blk fs disk=$second mkfs=$mkfs mount=$mnt files=$files umount=$umnt" \
      "hello_md5=$hello pattern_md5=$big"
  fi
  say "blk end"
}

# vanguard.test=net: the first network interface as Linux's virtio_net driver sees it, talking
# to the host over the TAP behind it (docs/linux-guest.md). vanguard.net=GUEST_IP,HOST_IP,PORT:
# the guest takes GUEST_IP/24, pings HOST_IP, sends 4 MiB of random bytes to HOST_IP:PORT over
# TCP (the host answers with the md5 it computed, then closes), then listens on PORT+1 for the
# host's bytes until the host closes.
net_scenario() {
  dmesg -n 1
  say "net begin"
  IFS=, read -r gip hip port <<EOF_NET
$(param vanguard.net)
EOF_NET
  ifc=""
  for d in /sys/class/net/*; do
    [ "${d##*/}" = lo ] || { ifc="${d##*/}"; break; }
  done
  if [ -z "$ifc" ] || [ -z "$gip" ] || [ -z "$hip" ] || [ -z "$port" ]; then
    say "net failed: no interface (${ifc:-none}) or no vanguard.net=GUEST_IP,HOST_IP,PORT"
    say "net end"
    return
  fi
  ip link set lo up
  ip addr add "$gip/24" dev "$ifc"
  ip link set "$ifc" up
  say "net if=$ifc mac=$(cat /sys/class/net/$ifc/address)" \
    "features=$(cat /sys/class/net/$ifc/device/features)"
  r=failed
  ping -c 3 -W 5 "$hip" >/dev/null 2>&1 && r=ok
  say "net ping host=$hip result=$r"
  dd if=/dev/urandom of=/tmp/out bs=65536 count=64 2>/dev/null
  say "net send bytes=$(wc -c </tmp/out) md5=$(md5 </tmp/out)"
  reply="$(nc "$hip" "$port" </tmp/out)"
  say "net send host_md5=${reply:-none}"
  say "net listen port=$((port + 1))"
  nc -l -p "$((port + 1))" >/tmp/in
  say "net recv bytes=$(wc -c </tmp/in) md5=$(md5 </tmp/in)"
  say "net end"
}

# vanguard.test=netbench: vanguard.net=GUEST_IP,HOST_IP,PORT and vanguard.netbench=MIB: sends
# MIB MiB of zeros to HOST_IP:PORT over TCP (the host times it), for `vanguard bench net`.
netbench_scenario() {
  dmesg -n 1
  IFS=, read -r gip hip port <<EOF_NB
$(param vanguard.net)
EOF_NB
  mib="$(param vanguard.netbench)"
  ifc=""
  for d in /sys/class/net/*; do
    [ "${d##*/}" = lo ] || { ifc="${d##*/}"; break; }
  done
  ip addr add "$gip/24" dev "$ifc"
  ip link set "$ifc" up
  # The host's listener may take a moment to see the link: retry the connection.
  i=0
  until ping -c 1 -W 1 "$hip" >/dev/null 2>&1 || [ "$i" -ge 10 ]; do i=$((i + 1)); done
  r=failed
  dd if=/dev/zero bs=65536 count=$((${mib:-64} * 16)) 2>/dev/null | nc "$hip" "$port" && r=ok
  say "netbench sent=${mib:-64}MiB result=$r"
}

# Scenarios: vanguard.test=NAME; other values (vanguard.test=1) run none.
case "$(param vanguard.test)" in
  blk) blk_scenario ;;
  net) net_scenario ;;
  netbench) netbench_scenario ;;
esac

case "$CMDLINE" in
  *vanguard.shell*)
    say "shell"
    # cttyhack opens the real console tty (ttyS0) so job control works.
    if command -v cttyhack >/dev/null 2>&1; then setsid cttyhack sh; else sh; fi
    ;;
esac

say "poweroff"
sync
poweroff -f
# poweroff should not return; if it does, try sysrq, then let init exit
# (kernel panic; with panic=-1 the VM resets).
echo o >/proc/sysrq-trigger 2>/dev/null
sleep 5
INITEOF
chmod 0755 "$ROOT/init"

VERSIONS="kernel_release=$KREL
kernel_package=$KPKG $KVER
kernel_meta=$META_PKG $meta_ver
busybox=$BUSYBOX_PKG $BBVER
modules=$MOD_LOADED
module_formats=$MOD_FORMATS"
printf '%s\n' "$VERSIONS" >"$ROOT/etc/vanguard-guest-versions"

py cpio "$ROOT" "$OUTDIR/initramfs.cpio.gz.tmp" || die "writing the initramfs failed"

# ----------------------------------------------------------------- kernel --

cp "$VMLINUZ_SRC" "$OUTDIR/vmlinuz.tmp"
PAYLOAD_FMT="$(py payload-format "$OUTDIR/vmlinuz.tmp")"
rm -f "$OUTDIR/vmlinux" "$OUTDIR/vmlinux.tmp"
if py vmlinux "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinux.tmp" >/dev/null; then
  mv -f "$OUTDIR/vmlinux.tmp" "$OUTDIR/vmlinux"
else
  rm -f "$OUTDIR/vmlinux.tmp"
  log "note: vmlinux not extracted ($PAYLOAD_FMT payload); vmlinuz is still usable"
fi
mv -f "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
mv -f "$OUTDIR/initramfs.cpio.gz.tmp" "$OUTDIR/initramfs.cpio.gz"
cp "$WORK/kernel/boot/config-$KREL" "$OUTDIR/config" 2>/dev/null || true

printf '%s\npayload_compression=%s\n' "$VERSIONS" "$PAYLOAD_FMT" >"$OUTDIR/versions"
printf '%s\n' "$STAMP_CONTENT" >"$OUTDIR/stamp"

echo "Linux guest built ($KPKG $KVER, kernel $KREL, $PAYLOAD_FMT payload, busybox $BBVER):"
echo "  kernel:    $OUTDIR/vmlinuz"
[ -s "$OUTDIR/vmlinux" ] && echo "  vmlinux:   $OUTDIR/vmlinux"
echo "  initramfs: $OUTDIR/initramfs.cpio.gz"
