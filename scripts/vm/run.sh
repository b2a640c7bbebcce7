#!/usr/bin/env bash
# Runs a command inside a QEMU VM (TCG) whose Debian kernel has soft-RoCE
# (rdma_rxe): one rxe device, rxe0, on veth0 with IP 10.77.0.1. The VM's root
# is the host's own root over 9p, so host binaries run unchanged. See README.md.
#
# usage: bash scripts/vm/run.sh [--mem MB] [--smp N] [--timeout SECONDS] [--cwd DIR] -- COMMAND [ARGS...]
#        bash scripts/vm/run.sh [OPTIONS] -- 'SHELL STRING'     (one argument: run with sh -c)
#
# Exit status: the command's; 124 if the timeout killed QEMU; 125 if the VM
# gave back no exit status (kernel panic, a module or mount that failed, ...),
# the cwd is missing in the VM, or this script failed; 130/143/129 when
# interrupted by SIGINT/SIGTERM/SIGHUP (QEMU is stopped).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
self="$here/$(basename "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/vm/deps.sh
source "$here/deps.sh"

# Loaded in this order by the VM's init (modules built into the kernel are skipped).
# Modules a kernel may not have separately (merged into another in newer kernels).
OPTIONAL_MODULES="fscache"
MODULES="crc32_generic virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p configfs ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe veth iw_cm ib_cm rdma_cm rdma_ucm"

die() { echo "postcopy-vm: $*" >&2; exit 125; }
# Removed on exit: the run directory, and a half-built initramfs.
run= stage= partial=
trap 'rm -rf ${run:+"$run"} ${stage:+"$stage"} ${partial:+"$partial"}' EXIT
usage() {
    sed -n '6,7s/^# \{0,1\}//p' "$self" >&2
    exit 2
}

mem=4096 smp=2 timeout=1800 cwd=$PWD
while [ $# -gt 0 ]; do
    case $1 in
        --mem|--smp|--timeout|--cwd)
            [ $# -ge 2 ] || usage
            case $1 in
                --mem) mem=$2 ;; --smp) smp=$2 ;; --timeout) timeout=$2 ;; --cwd) cwd=$2 ;;
            esac
            shift 2 ;;
        --mem=*) mem=${1#*=}; shift ;;
        --smp=*) smp=${1#*=}; shift ;;
        --timeout=*) timeout=${1#*=}; shift ;;
        --cwd=*) cwd=${1#*=}; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "postcopy-vm: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[ $# -ge 1 ] || usage
[ $# -eq 1 ] && set -- sh -c "$1"
for n in "$mem" "$smp" "$timeout"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "--mem, --smp and --timeout take positive integers (got '$n')"
done
abs=$(cd "$cwd" 2>/dev/null && pwd -P) || die "no directory $cwd"
cwd=$abs

postcopy_vm_deps || die "missing host packages"
kver=$(postcopy_vm_kernel)
moddir=/lib/modules/$kver
vmdir=$repo/.build-vm
mkdir -p "$vmdir/runs"
# Left by runs that were killed (SIGKILL) a day ago or more.
find "$vmdir/runs" "$vmdir" -mindepth 1 -maxdepth 1 -mmin +1440 \
    \( -path "$vmdir/runs/*" -o -name 'stage.*' -o -name '*.tmp.*' \) -exec rm -rf {} + 2>/dev/null || true

# ---------------------------------------------------------------- initramfs
# /init of the VM, a busybox sh script. It gets the run directory (a host
# path, reached under /host) as $postcopy_run from the kernel command line.
init_script() {
    cat <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
stty -onlcr 2>/dev/null  # plain LF line ends on the serial console
mount -t proc proc /proc
mount -t sysfs sysfs /sys

die() {
    echo "postcopy-vm: $*"
    dmesg | tail -n 15 | sed 's/^/postcopy-vm: dmesg: /'
    echo "postcopy-vm: aborting the VM"
    poweroff -f
    sleep 10
}

for m in $(cat /modules.list); do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done

[ -n "$postcopy_run" ] || die "no postcopy_run= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap hostroot /host \
    || die "mounting the host root over 9p failed"
[ -r "/host$postcopy_run/cmd.sh" ] || die "no $postcopy_run/cmd.sh on the host"

# tmpfs over the host's /tmp and /run, so that nothing leaves files there;
# the directories listed in keep (the repo, the cwd) stay visible.
cp "/host$postcopy_run/keep" /keep.list || die "no $postcopy_run/keep"
i=0
while IFS= read -r p; do
    [ -n "$p" ] || continue
    i=$((i + 1)); mkdir -p "/keep/$i"
    mount -o bind "/host$p" "/keep/$i" || die "bind-mounting $p failed"
done </keep.list
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || die "tmpfs on /tmp failed"
mount -t tmpfs -o mode=755 tmpfs /host/run || die "tmpfs on /run failed"
i=0
while IFS= read -r p; do
    [ -n "$p" ] || continue
    i=$((i + 1)); mkdir -p "/host$p"
    mount -o bind "/keep/$i" "/host$p" || die "bind-mounting $p back failed"
done </keep.list

# The guest's own proc, sys and dev (not the host's over 9p).
mount -t proc proc /host/proc || die "mounting proc failed"
mount -t sysfs sysfs /host/sys || die "mounting sysfs failed"
mount -t configfs configfs /host/sys/kernel/config || die "mounting configfs failed"
mount -t devtmpfs devtmpfs /host/dev || die "mounting devtmpfs failed"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts || die "mounting devpts failed"
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm || die "tmpfs on /dev/shm failed"
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr

# One rxe device on veth0 (10.77.0.1); ip and rdma are the host's iproute2.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot /host /bin/sh -ec '
    ip link set lo up
    ip link add veth0 type veth peer name veth1
    ip addr add 10.77.0.1/24 dev veth0
    ip addr add 10.77.0.2/24 dev veth1
    ip link set veth0 up
    ip link set veth1 up
    rdma link add rxe0 type rxe netdev veth0
' || die "network or rxe setup failed"
export PATH=/bin
# Wait until the port is ACTIVE and has the IPv4 GID of 10.77.0.1.
n=0
until grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null &&
      cat /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null | grep -q 'ffff:0a4d:0001'; do
    n=$((n + 1)); [ $n -le 100 ] || die "rxe0 port not ACTIVE with the GID of 10.77.0.1 after 10 s"
    sleep 0.1
done

ulimit -l unlimited
env -i chroot /host /bin/bash "$postcopy_run/cmd.sh"
echo $? >"/host$postcopy_run/rc"
sync
poweroff -f
sleep 10
EOF
}

# Module file names may spell '_' as '-'.
module_pattern() { printf '%s' "${1//_/[-_]}"; }

build_initramfs() {
    local out=$1 m pat rel
    stage=$(mktemp -d "$vmdir/stage.XXXXXX")
    mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/host" "$stage/keep" "$stage/lib/modules"
    cp /bin/busybox "$stage/bin/busybox"
    for m in $(/bin/busybox --list); do
        [ "$m" = busybox ] || ln -s busybox "$stage/bin/$m"
    done
    : >"$stage/modules.list"
    for m in $MODULES; do
        pat=$(module_pattern "$m")
        if grep -Eq "(^|/)$pat\.ko$" "$moddir/modules.builtin"; then
            continue
        fi
        rel=$(grep -Eo "^([^:]*/)?$pat\.ko(\.(xz|zst|gz))?:" "$moddir/modules.dep" | head -n 1 | tr -d :) || true
        if [ -z "$rel" ]; then
            # fscache became part of netfs in Linux 6.8.
            case " $OPTIONAL_MODULES " in *" $m "*) continue ;; esac
            die "module $m is neither in $moddir/modules.dep nor built in"
        fi
        case $rel in
            *.ko) cp "$moddir/$rel" "$stage/lib/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$moddir/$rel" >"$stage/lib/modules/$m.ko" ;;
            *.ko.zst) zstd -dc "$moddir/$rel" >"$stage/lib/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "$moddir/$rel" >"$stage/lib/modules/$m.ko" ;;
        esac
        echo "$m" >>"$stage/modules.list"
    done
    init_script >"$stage/init"
    chmod 755 "$stage/init"
    partial=$out.tmp.$$
    (cd "$stage" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) >"$partial"
    mv -f "$partial" "$out"
    rm -rf "$stage"
    stage= partial=
}

# Cached; rebuilt when this script, the kernel, its modules or busybox change.
key=$({
    echo "$kver $MODULES"
    cat "$self"
    stat -c '%n %s %Y' "/boot/vmlinuz-$kver" "$moddir/modules.dep" /bin/busybox
} | sha256sum | cut -c1-16)
initrd=$vmdir/initramfs-$kver-$key.cpio
if [ ! -s "$initrd" ]; then
    echo "postcopy-vm: building $initrd" >&2
    build_initramfs "$initrd"
    find "$vmdir" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "$(basename "$initrd")" -delete
fi

# ---------------------------------------------------------------- this run
run=$(mktemp -d "$vmdir/runs/XXXXXXXX")
# It goes on the kernel command line, unquoted.
[[ $run =~ ^[A-Za-z0-9._/+@,=-]+$ ]] || die "the repo path ($repo) has characters that cannot go on the kernel command line"

# Directories under /tmp or /run that must stay visible in the VM, outermost first.
keep=()
while IFS= read -r p; do
    case $p in /tmp|/tmp/*|/run|/run/*) ;; *) continue ;; esac
    for k in "${keep[@]+"${keep[@]}"}"; do
        case $p in "$k"|"$k"/*) continue 2 ;; esac
    done
    keep+=("$p")
done < <(printf '%s\n' "$repo" "$cwd" | awk '{ print length($0) "\t" $0 }' | sort -n | cut -f2-)
printf '%s\n' "${keep[@]+"${keep[@]}"}" >"$run/keep"

{
    echo '#!/bin/bash'
    printf 'cd -- %q || { echo "postcopy-vm: cannot cd to %q in the VM" >&2; exit 125; }\n' "$cwd" "$cwd"
    echo 'export PATH=/opt/swift/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    echo 'export HOME=/root LANG=C.UTF-8 TERM=dumb'
    echo 'export POSTCOPY_VM=1 POSTCOPY_RDMA_ADDR=10.77.0.1 POSTCOPY_RDMA_DEV=rxe0'
    printf 'exec'
    printf ' %q' "$@"
    echo ' </dev/null'
} >"$run/cmd.sh"

# qboot: faster than SeaBIOS and prints nothing on the console.
bios=()
[ -r /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)

# QEMU runs in the background so that a signal to this script can stop it.
stopped=
stop() {
    local pid
    stopped=$1
    pid=$(cat "$run/qemu.pid" 2>/dev/null) || pid=
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; fi
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP
{
    set +e
    timeout --foreground -k 10 "$timeout" \
        qemu-system-x86_64 -accel tcg -cpu max -m "$mem" -smp "$smp" \
            -nographic -nic none -no-reboot "${bios[@]}" -pidfile "$run/qemu.pid" \
            -kernel "/boot/vmlinuz-$kver" -initrd "$initrd" \
            -append "console=ttyS0 panic=-1 quiet loglevel=3 postcopy_run=$run" \
            -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap \
            </dev/null 2>&1 |
        sed -u '/reboot: Power down.\{0,1\}$/{ s/\(\[ *[0-9.]*\] \)\{0,1\}reboot: Power down.\{0,1\}$//; /^$/d; }'
    echo "${PIPESTATUS[0]}" >"$run/qemu.status"
} &
job=$!
while kill -0 "$job" 2>/dev/null; do
    wait "$job" || true
done
qemu_status=$(cat "$run/qemu.status" 2>/dev/null || echo '?')

if [ -n "$stopped" ]; then
    echo "postcopy-vm: interrupted; QEMU stopped" >&2
    exit "$stopped"
fi
if [ -s "$run/rc" ]; then
    rc=$(cat "$run/rc")
    [[ $rc =~ ^[0-9]+$ ]] || die "bad exit status '$rc' from the VM"
    exit "$rc"
fi
if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    echo "postcopy-vm: timed out after ${timeout}s; QEMU was killed" >&2
    exit 124
fi
die "the VM gave back no exit status (QEMU exited with $qemu_status): see the console output above (kernel panic, a module or mount that failed?)"
