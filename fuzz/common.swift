#if canImport(Glibc)
import Glibc
#endif

/// Writes one seed input to `dir/name`.
func writeSeed(_ dir: String, _ name: String, _ bytes: [UInt8]) {
    let fd = open("\(dir)/\(name)", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    precondition(fd >= 0, "cannot write seeds to \(dir)")
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
}
