import Crypto
import PostcopyCore
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// Mutual authentication with a shared key, before any page, rkey or device
/// state is exchanged: the destination sends a nonce in its hello; the source
/// answers with its own nonce and HMAC-SHA256(key, "postcopy source" ‖ client
/// nonce ‖ server nonce); the destination checks it and answers HMAC-SHA256(key,
/// "postcopy destination" ‖ server nonce ‖ client nonce). Either side that
/// cannot prove the key gets an error and a closed connection, nothing else.
public enum Authentication {
    public static let nonceBytes = 32

    /// Reads a key file: at least 16 bytes (raw, or the text of a hex or
    /// base64 string: the whole file is the key material either way).
    public static func loadKey(_ path: String) throws(SystemError) -> [UInt8] {
        let fd = try libcCall("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var st = stat()
        _ = try libcCall("fstat(\(path))") { fstat(fd, &st) }
        if st.st_mode & 0o077 != 0 {
            throw SystemError("key file \(path) is readable by others (mode \(String(st.st_mode & 0o777, radix: 8))); chmod 600 it", errno: EPERM)
        }
        var key = [UInt8](repeating: 0, count: 4096)
        let n = try libcCall("read(\(path))") { key.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) } }
        key.removeLast(4096 - n)
        while let last = key.last, last == 10 || last == 13 { key.removeLast() }
        guard key.count >= 16 else { throw SystemError("key file \(path) holds \(key.count) bytes; at least 16 are needed", errno: EINVAL) }
        return key
    }

    public static func nonce() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        return (0..<nonceBytes).map { _ in UInt8.random(in: 0...255, using: &rng) }
    }

    public static func sourceProof(key: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        mac(key, Array("postcopy source".utf8) + clientNonce + serverNonce)
    }

    public static func destinationProof(key: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8]) -> [UInt8] {
        mac(key, Array("postcopy destination".utf8) + serverNonce + clientNonce)
    }

    /// Constant-time comparison of two proofs.
    public static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in a.indices { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    private static func mac(_ key: [UInt8], _ message: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: key)))
    }
}
