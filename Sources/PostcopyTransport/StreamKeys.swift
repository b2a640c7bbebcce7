import CAEAD
import Crypto

/// The keys of one encrypted TCP connection (see `RecordSealer`): after the
/// mutual authentication, each direction gets its own AES-256-GCM key,
/// HKDF-SHA256 of the shared key with both handshake nonces as salt, so every
/// connection (a reconnect included) has fresh keys, and a frame recorded on one
/// connection means nothing on another. Nonces are per-direction record counters
/// (`RecordSealer`), never sent.
public struct StreamKeys: Sendable {
    /// The key of what this side sends, and of what it receives.
    public let send: [UInt8]
    public let receive: [UInt8]

    static let sourceToDestination = Array("postcopy v1 aes-256-gcm source to destination".utf8)
    static let destinationToSource = Array("postcopy v1 aes-256-gcm destination to source".utf8)

    /// The keys of the side that is the source (`isSource`) or the destination.
    public init(sharedKey: [UInt8], clientNonce: [UInt8], serverNonce: [UInt8], isSource: Bool) {
        func derive(_ info: [UInt8]) -> [UInt8] {
            let k = HKDF<SHA256>.deriveKey(inputKeyMaterial: SymmetricKey(data: sharedKey), salt: clientNonce + serverNonce,
                                           info: info, outputByteCount: Int(CAEAD_KEY_BYTES))
            return k.withUnsafeBytes { Array($0) }
        }
        let s2d = derive(Self.sourceToDestination), d2s = derive(Self.destinationToSource)
        send = isSource ? s2d : d2s
        receive = isSource ? d2s : s2d
    }

    /// Which library runs the cipher (for reports).
    public static var library: String { String(cString: caead_library()) }

    /// The cipher's known-answer test (`caead_self_test`): 0 when it passes,
    /// else the step that failed. Run once before the first encrypted connection.
    public static let cipherSelfTest: Int32 = caead_self_test()
}

/// Whether a connection with a shared key encrypts its frames. Both sides must
/// agree; a side refuses a peer that asks for the other mode (so a stripped
/// capability bit cannot downgrade a connection to clear text).
public enum StreamEncryption: String, Sendable, CaseIterable {
    /// AES-256-GCM on every frame after the authentication (default with a key).
    case on
    /// Authenticated, not encrypted: for a link the operator trusts.
    case off

    /// Whether frames are encrypted with this setting and `key` (there are
    /// no keys to derive without a shared key).
    public func applies(withKey key: [UInt8]?) -> Bool { key != nil && self == .on }
}

/// One AES-256-GCM context (one direction of one connection).
final class AEADContext {
    private let ctx: OpaquePointer
    /// Record counter: the nonce of the next record.
    private(set) var counter: UInt64 = 0

    init(key: [UInt8], encrypt: Bool) throws(TransportError) {
        guard StreamKeys.cipherSelfTest == 0 else {
            throw .unavailable("AES-256-GCM failed its known-answer test (step \(StreamKeys.cipherSelfTest)): \(StreamKeys.library) does not work as expected here; refusing to encrypt with it")
        }
        guard key.count == Int(CAEAD_KEY_BYTES), let c = caead_new(key, encrypt ? 1 : 0) else {
            throw .unavailable("\(StreamKeys.library) could not set up AES-256-GCM")
        }
        ctx = c
    }

    deinit { caead_free(ctx) }

    /// Starts the next record, its 4-byte length as additional data.
    func begin(length: UnsafeRawPointer) throws(TransportError) {
        var nonce = [UInt8](repeating: 0, count: Int(CAEAD_NONCE_BYTES))
        for i in 0..<8 { nonce[4 + i] = UInt8(truncatingIfNeeded: counter >> (8 * UInt64(i))) }
        counter += 1
        guard caead_begin(ctx, nonce, length.assumingMemoryBound(to: UInt8.self), RecordFormat.lengthBytes) == 0 else {
            throw .integrity("AES-256-GCM could not start record \(counter - 1)")
        }
    }

    func update(_ out: UnsafeMutableRawPointer, _ input: UnsafeRawPointer, _ n: Int) throws(TransportError) {
        guard caead_update(ctx, out.assumingMemoryBound(to: UInt8.self), input.assumingMemoryBound(to: UInt8.self), n) == 0 else {
            throw .integrity("AES-256-GCM failed on record \(counter - 1)")
        }
    }

    func seal(tag: UnsafeMutableRawPointer) throws(TransportError) {
        guard caead_seal(ctx, tag.assumingMemoryBound(to: UInt8.self)) == 0 else { throw .integrity("AES-256-GCM could not seal record \(counter - 1)") }
    }

    /// False when the tag does not verify.
    func open(tag: UnsafeRawPointer) -> Bool {
        caead_open(ctx, tag.assumingMemoryBound(to: UInt8.self)) == 0
    }
}

/// An encrypted stream is a sequence of records: a 4-byte little-endian
/// plaintext length (in clear, authenticated as additional data), that many
/// bytes of ciphertext, a 16-byte tag. A frame is one record, or two when it
/// carries pages: its headers, then its payload, so the receiver places a
/// payload only by headers whose tag verified.
enum RecordFormat {
    static let lengthBytes = 4
    static let tagBytes = Int(CAEAD_TAG_BYTES)
    static let overhead = lengthBytes + tagBytes
}
