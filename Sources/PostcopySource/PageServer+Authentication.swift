import PostcopyTransport
import PostcopyWire

extension PageServer {
    /// Challenge-response on the shared key (see `Authentication`), then, when
    /// this source encrypts, every later frame in AES-256-GCM records under keys
    /// derived from both nonces. False, after an error frame to the peer, when
    /// it fails or the peer asks for the other encryption mode: the caller
    /// closes the connection.
    func authenticate(_ conn: any FrameConnection, hello: Hello, key: [UInt8]) throws(TransportError) -> Bool {
        func refuse(_ why: String) throws(TransportError) -> Bool {
            stats.rejectedConnections.add(1, ordering: .relaxed)
            logger.warning("refusing \(conn.peer): \(why)")
            try conn.send(.error(ErrorMessage(code: .authenticationFailed, message: why)))
            return false
        }
        let asks = hello.capabilities.contains(.encryption)
        if asks != encrypted {
            return try refuse(encrypted
                ? "this source encrypts its stream (the default with a key); the destination asked for clear text: give both sides the same --encryption"
                : "this source runs with --encryption off; the destination asked for an encrypted stream: give both sides the same --encryption")
        }
        guard let nonce = hello.extensions.first(where: { $0.type == ExtensionType.clientNonce })?.value,
              nonce.count == Authentication.nonceBytes else {
            return try refuse("this source requires authentication with its shared key")
        }
        let serverNonce = Authentication.nonce()
        try conn.send(.authChallenge(AuthChallenge(serverNonce: serverNonce,
                                                   proof: Authentication.sourceProof(key: key, clientNonce: nonce, serverNonce: serverNonce))))
        let reply = try conn.receive(timeoutMs: WireProtocol.handshakeTimeoutMs)
        guard case .authResponse(let r) = reply,
              Authentication.equal(r.proof, Authentication.destinationProof(key: key, clientNonce: nonce, serverNonce: serverNonce)) else {
            return try refuse("authentication failed: wrong key")
        }
        if encrypted {
            try conn.startEncryption(StreamKeys(sharedKey: key, clientNonce: nonce, serverNonce: serverNonce, isSource: true))
        }
        return true
    }
}
