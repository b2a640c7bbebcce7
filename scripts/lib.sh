# Shared by the project's scripts: puts a Swift 6 toolchain on PATH or says why not.
# A fresh machine of this project's kind has the toolchain in /opt/swift.
if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
    export PATH="/opt/swift/usr/bin:$PATH"
fi
if ! command -v swift >/dev/null; then
    echo "error: swift (6.0 or newer) is not on PATH" >&2
    exit 2
fi
