# Shared by the project's scripts: puts a Swift 6 toolchain on PATH or says why not.
# A fresh machine of this project's kind has the toolchain in /opt/swift.
if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
    export PATH="/opt/swift/usr/bin:$PATH"
fi
if ! command -v swift >/dev/null; then
    echo "error: swift (6.0 or newer) is not on PATH" >&2
    exit 2
fi

# The build links libibverbs and librdmacm (the RDMA transport): installs their
# development packages when missing (Debian/Ubuntu; needs root).
postcopy_build_deps() {
    if [ -e /usr/include/infiniband/verbs.h ] && [ -e /usr/include/rdma/rdma_cma.h ] \
        && ls /usr/lib/*/libibverbs.so /usr/lib/*/librdmacm.so >/dev/null 2>&1; then
        return 0
    fi
    echo "installing libibverbs-dev librdmacm-dev (needed to build the RDMA transport)..." >&2
    if ! command -v apt-get >/dev/null; then
        echo "error: install the libibverbs and librdmacm development packages (rdma-core) first" >&2
        return 2
    fi
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs-dev librdmacm-dev >&2
}

# Runs "$@" with the host's transparent huge pages for shared memory set to $1
# (/sys/kernel/mm/transparent_hugepage/shmem_enabled; needs root), and puts the
# host's setting back afterwards, whether the command passed or not. Returns 3
# without running it when the setting cannot be changed here.
with_shmem_thp() {
    local thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled value=$1 was rc=0
    shift
    [ -w "$thp" ] || return 3
    was=$(sed 's/.*\[\(.*\)\].*/\1/' "$thp")
    echo "$value" > "$thp"
    "$@" || rc=$?
    echo "$was" > "$thp"
    return $rc
}
