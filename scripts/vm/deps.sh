# Host packages for the soft-RoCE VM harness (scripts/vm/run.sh).
# Source this file and call postcopy_vm_deps: it runs apt-get only when a
# binary or file that the harness needs is missing.

POSTCOPY_VM_PACKAGES="qemu-system-x86 linux-image-amd64 busybox-static rdma-core ibverbs-providers ibverbs-utils perftest libibverbs-dev librdmacm-dev iproute2"

# Prints the newest Debian kernel version that has both /boot/vmlinuz-VER and
# the rdma_rxe module under /lib/modules/VER; prints nothing if there is none.
postcopy_vm_kernel() {
    local v best=""
    for v in $(ls /lib/modules 2>/dev/null | sort -V); do
        [ -r "/boot/vmlinuz-$v" ] || continue
        ls "/lib/modules/$v/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko"* >/dev/null 2>&1 || continue
        best=$v
    done
    printf '%s' "$best"
}

# Prints what is missing, one item a line.
postcopy_vm_missing() {
    local f
    for f in qemu-system-x86_64 rdma ip ibv_devices ib_read_lat ib_read_bw; do
        command -v "$f" >/dev/null 2>&1 || echo "command $f"
    done
    # busybox-static, not the dynamically linked busybox: it is copied into the initramfs.
    if ! [ -x /bin/busybox ] || [ "$(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null)" != installed ]; then
        echo "package busybox-static"
    fi
    if [ "$(dpkg-query -W -f='${db:Status-Status}' rdma-core 2>/dev/null)" != installed ]; then
        echo "package rdma-core"
    fi
    ls /usr/lib/*/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 || echo "file librxe-rdmav*.so (ibverbs-providers)"
    [ -e /usr/include/infiniband/verbs.h ] || echo "file /usr/include/infiniband/verbs.h"
    [ -e /usr/include/rdma/rdma_cma.h ] || echo "file /usr/include/rdma/rdma_cma.h"
    [ -n "$(postcopy_vm_kernel)" ] || echo "kernel /boot/vmlinuz-VER with rdma_rxe in /lib/modules/VER"
    # Hybrid migration's dirty tracking (async userfaultfd write-protect,
    # PAGEMAP_SCAN) needs Linux 6.7: Debian 12's default kernel is 6.1.
    postcopy_vm_kernel_recent || echo "kernel 6.7 or later with rdma_rxe (async write-protect for hybrid migration)"
}

# True when the VM's kernel (postcopy_vm_kernel) is Linux 6.7 or later.
postcopy_vm_kernel_recent() {
    local v
    v=$(postcopy_vm_kernel)
    [ -n "$v" ] && [ "$(printf '%s\n6.7\n' "${v%%[-+]*}" | sort -V | head -n 1)" = 6.7 ]
}

# The newest Debian kernel package of 6.7 or later the archive has (12's
# security updates carry 6.12), or nothing.
postcopy_vm_recent_kernel_package() {
    apt-cache search --names-only '^linux-image-6\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64-unsigned$' 2>/dev/null \
        | awk '{print $1}' | sort -V | tail -n 1
}

postcopy_vm_deps() {
    local missing
    missing=$(postcopy_vm_missing)
    [ -z "$missing" ] && return 0
    echo "postcopy-vm: missing, installing $POSTCOPY_VM_PACKAGES:" >&2
    printf '%s\n' "$missing" | sed 's/^/  /' >&2
    apt-get update >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y $POSTCOPY_VM_PACKAGES >&2
    if ! postcopy_vm_kernel_recent; then
        local k
        k=$(postcopy_vm_recent_kernel_package)
        [ -n "$k" ] && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$k" >&2
    fi
    missing=$(postcopy_vm_missing)
    if [ -n "$missing" ]; then
        echo "postcopy-vm: still missing after apt-get install:" >&2
        printf '%s\n' "$missing" >&2
        return 1
    fi
}
