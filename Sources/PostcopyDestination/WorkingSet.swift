import CPostcopy
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// The pages a guest faulted on in the first seconds after a restore, in
/// order, each with the xxh64 of its bytes as they arrived (REAP, ASPLOS'21:
/// record the working set of a snapshot's first restore, fetch it in one go at
/// the next ones). Stored as a versioned, checksummed file; a replay checks it
/// twice before trusting it: the layout (page size and every region's size)
/// when loaded against a session, and the bytes of the first pages it brings
/// against their recorded digests (a file recorded from another snapshot of
/// the same size is refused there).
public struct WorkingSet: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        /// Global page number (source pages, regions in order).
        public var page: UInt64
        /// xxh64 (seed 0) of the page's bytes as received.
        public var digest: UInt64
        public init(page: UInt64, digest: UInt64) {
            self.page = page
            self.digest = digest
        }
    }

    public var pageSize: UInt32
    /// Pages of each region of the memory it was recorded on.
    public var regionPages: [UInt64]
    /// How long after the resume faults were recorded, in milliseconds.
    public var recordedMs: UInt32
    public var entries: [Entry]

    public init(pageSize: UInt32, regionPages: [UInt64], recordedMs: UInt32, entries: [Entry]) {
        self.pageSize = pageSize
        self.regionPages = regionPages
        self.recordedMs = recordedMs
        self.entries = entries
    }

    public var totalPages: UInt64 { regionPages.reduce(0, +) }

    static let magic = Array("PCWS".utf8)
    public static let version: UInt16 = 1
    /// Bounds on what a file may claim, so that a hostile one cannot make the
    /// loader allocate without limit.
    static let maxRegions = 4096
    static let maxEntries = 1 << 26

    public struct FormatError: Error, CustomStringConvertible {
        public var description: String
    }

    /// magic, version u16, reserved u16, page size u32, recorded ms u32,
    /// region count u32, entry count u32, region pages u64 each, entries
    /// (page u64, digest u64), then xxh64 of everything before it; little-endian.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 32 + regionPages.count * 8 + entries.count * 16)
        w.raw(Self.magic)
        w.u16(Self.version)
        w.u16(0)
        w.u32(pageSize)
        w.u32(recordedMs)
        w.u32(UInt32(regionPages.count))
        w.u32(UInt32(entries.count))
        for r in regionPages { w.u64(r) }
        for e in entries {
            w.u64(e.page)
            w.u64(e.digest)
        }
        w.u64(w.bytes.withUnsafeBytes { cpc_xxh64($0.baseAddress, $0.count, 0) })
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> WorkingSet {
        guard bytes.count >= 4, Array(bytes[0..<4]) == magic else { throw FormatError(description: "not a working-set file (no PCWS magic)") }
        let decoded: Result<WorkingSet, FormatError> = bytes.withUnsafeBytes { raw in
            Result { () throws(FormatError) in
                do throws(WireError) {
                    var r = ByteReader(raw)
                    _ = try r.slice(4, "magic")
                    return try decode(&r, count: bytes.count, checksum: cpc_xxh64(raw.baseAddress, max(bytes.count - 8, 0), 0))
                } catch {
                    switch error {
                    case .truncated(let field, _, _): throw FormatError(description: "working-set file truncated at \(field) (\(bytes.count) bytes)")
                    case .invalid(_, let reason): throw FormatError(description: reason)
                    default: throw FormatError(description: "\(error)")
                    }
                }
            }
        }
        return try decoded.get()
    }

    /// The fields after the magic; `checksum`: xxh64 of all but the last 8 bytes.
    private static func decode(_ r: inout ByteReader, count: Int, checksum sum: UInt64) throws(WireError) -> WorkingSet {
        func fail(_ why: String) -> WireError { .invalid(field: "working set", reason: why) }
        let version = try r.u16("version")
        guard version == Self.version else { throw fail("working-set file version \(version), this build reads \(Self.version)") }
        _ = try r.u16("reserved")
        let pageSize = try r.u32("page size")
        guard pageSize >= 512, pageSize.nonzeroBitCount == 1 else { throw fail("page size \(pageSize) is not a power of two ≥ 512") }
        let recordedMs = try r.u32("recorded ms")
        let regionCount = Int(try r.u32("region count"))
        let entryCount = Int(try r.u32("entry count"))
        guard (1...maxRegions).contains(regionCount) else { throw fail("\(regionCount) regions (1...\(maxRegions))") }
        guard entryCount <= maxEntries else { throw fail("\(entryCount) pages (at most \(maxEntries))") }
        let expected = 4 + 2 + 2 + 4 + 4 + 4 + 4 + regionCount * 8 + entryCount * 16 + 8
        guard count == expected else {
            throw fail(count < expected ? "working-set file truncated: \(count) bytes, its header says \(expected)"
                                        : "working-set file has \(count - expected) bytes after its end")
        }
        var regions: [UInt64] = []
        for _ in 0..<regionCount { regions.append(try r.u64("region size")) }
        let total = regions.reduce(UInt64(0)) { $0 &+ $1 }
        var entries: [Entry] = []
        entries.reserveCapacity(entryCount)
        var seen = Set<UInt64>()
        for i in 0..<entryCount {
            let page = try r.u64("entry page")
            let digest = try r.u64("entry digest")
            guard page < total else { throw fail("entry \(i): page \(page) outside the \(total) pages recorded") }
            guard seen.insert(page).inserted else { throw fail("entry \(i): page \(page) twice") }
            entries.append(Entry(page: page, digest: digest))
        }
        guard try r.u64("checksum") == sum else { throw fail("working-set file checksum mismatch (corrupted)") }
        return WorkingSet(pageSize: pageSize, regionPages: regions, recordedMs: recordedMs, entries: entries)
    }

    /// Why this file does not fit memory laid out as `table` (nil: it fits).
    public func mismatch(_ table: RegionTable) -> String? {
        let theirs = table.regions.map { UInt64($0.size) / UInt64(table.pageSize) }
        guard Int(pageSize) == table.pageSize, theirs == regionPages else {
            return "recorded on \(regionPages.count) region(s) of \(regionPages.map(String.init).joined(separator: "+")) pages of \(pageSize) bytes; "
                + "this guest has \(theirs.count) region(s) of \(theirs.map(String.init).joined(separator: "+")) pages of \(table.pageSize) bytes"
        }
        return nil
    }
}

extension WorkingSet {
    /// Reads and checks the file at `path`.
    public static func load(from path: String) throws(FormatError) -> WorkingSet {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FormatError(description: "cannot open working-set file \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size >= 0, st.st_size <= 16 + 4 + 4 + 4 + 4 + maxRegions * 8 + maxEntries * 16 + 8 else {
            throw FormatError(description: "working-set file \(path): not a regular file of a sane size")
        }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var got = 0
        while got < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw FormatError(description: "reading working-set file \(path): \(n == 0 ? "short read" : String(cString: strerror(errno)))") }
            got += n
        }
        do { return try decode(bytes) } catch { throw FormatError(description: "\(path): \(error.description)") }
    }

    /// Writes the file at `path` whole or not at all (a temporary file renamed over it).
    public func write(to path: String) throws(FormatError) {
        let tmp = path + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FormatError(description: "cannot create \(tmp): \(String(cString: strerror(errno)))") }
        let bytes = encoded()
        var put = 0
        while put < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + put, $0.count - put) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                close(fd)
                unlink(tmp)
                throw FormatError(description: "writing \(tmp): \(String(cString: strerror(errno)))")
            }
            put += n
        }
        let synced = fsync(fd) == 0
        close(fd)
        guard synced, rename(tmp, path) == 0 else {
            unlink(tmp)
            throw FormatError(description: "cannot put the working set in place at \(path): \(String(cString: strerror(errno)))")
        }
    }
}
