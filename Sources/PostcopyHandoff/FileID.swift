/// A file's identity: device and inode (two fds, or an fd and a mapping, of
/// the same file have the same one).
public struct FileID: Sendable, Equatable {
    public var deviceMajor: UInt32, deviceMinor: UInt32, inode: UInt64
}
