import Foundation
import PostcopyCore

/// One guest-memory region as a VMM hands it over, in Firecracker's
/// `GuestRegionUffdMapping` format (its `mem_backend: {backend_type: "Uffd"}`).
public struct VMMRegion: Sendable, Equatable {
    /// Where the region is mapped in the VMM's address space.
    public var base: UInt64
    public var size: UInt64
    /// Position of the region in the guest memory file (cumulative over regions):
    /// the same bytes in the source's memory.
    public var offset: UInt64
    public var pageSize: UInt64
    /// The shared memory file the region is mapped from (this project's
    /// extension, absent in Firecracker's message): the daemon maps its own
    /// alias of it and installs pages with UFFDIO_CONTINUE.
    public var file: MemoryFileRange?
    /// The source to fetch this VMM's pages from, "HOST:PORT" (this project's
    /// extension, the same on every region): a daemon serving VMMs migrating
    /// from several hosts. Absent: the daemon's own `--connect`.
    public var source: String?

    /// Where a region's bytes live in a memory file the VMM sent: `index` counts
    /// the SCM_RIGHTS fds that follow the userfaultfd (0 = the second fd),
    /// `offset` is the byte offset in that file of the region's first byte.
    public struct MemoryFileRange: Sendable, Equatable {
        public var index: Int
        public var offset: UInt64
        public init(index: Int, offset: UInt64) {
            self.index = index
            self.offset = offset
        }
    }

    public init(base: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64, file: MemoryFileRange? = nil, source: String? = nil) {
        self.source = source
        self.base = base
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
        self.file = file
    }
}

/// Why a VMM's handoff was refused. The daemon logs it and closes that one
/// connection; other VMMs are not affected.
public enum HandoffError: Error, Sendable, CustomStringConvertible {
    case malformedJSON(String)
    case noFileDescriptor
    case tooManyFileDescriptors(Int)
    /// The fds after the userfaultfd do not match the files the regions name.
    case fileDescriptors(String)
    /// A memory file, or the VMM's mapping or registration of it, is unusable.
    case sharedMemory(String)
    case invalidRegion(String)
    case unsupportedPageSize(UInt64)
    case layout(String)
    case source(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .malformedJSON(let s): return "malformed handoff message: \(s)"
        case .noFileDescriptor: return "handoff message carried no userfaultfd (expected exactly one SCM_RIGHTS fd)"
        case .tooManyFileDescriptors(let n):
            return "handoff message carried \(n) file descriptors (expected the userfaultfd, then at most \(HandoffMessage.maxMemoryFiles) memory files)"
        case .fileDescriptors(let s): return "file descriptors: \(s)"
        case .sharedMemory(let s): return "shared guest memory: \(s)"
        case .invalidRegion(let s): return "invalid region: \(s)"
        case .unsupportedPageSize(let p):
            return "page size \(p) is neither 4 KiB nor 2 MiB"
        case .layout(let s): return "regions do not match the source memory: \(s)"
        case .source(let s): return "source: \(s)"
        case .system(let e): return e.description
        }
    }
}

public enum HandoffMessage {
    /// The largest handoff message accepted (a few hundred regions).
    public static let maxBytes = 64 * 1024
    /// Memory files a VMM may send after its userfaultfd (one per region at most).
    public static let maxMemoryFiles = 15

    private struct Raw: Decodable {
        var base_host_virt_addr: UInt64
        var size: UInt64
        var offset: UInt64
        var page_size: UInt64?
        var page_size_kib: UInt64?
        var mem_fd_index: Int?
        var mem_fd_offset: UInt64?
        var postcopy_source: String?
    }

    /// Longest "HOST:PORT" accepted as a VMM's source.
    public static let maxSourceLength = 300

    /// Parses and checks the JSON array a VMM sends. `page_size_kib` is deprecated
    /// and in practice holds bytes; `page_size` wins when both are present and they
    /// must then agree.
    public static func parse(_ bytes: [UInt8], hostPageSize: Int) throws(HandoffError) -> [VMMRegion] {
        let raw: [Raw]
        do {
            raw = try JSONDecoder().decode([Raw].self, from: Data(bytes))
        } catch let DecodingError.keyNotFound(key, _) {
            throw .malformedJSON("a region lacks \"\(key.stringValue)\"")
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw .malformedJSON("wrong type at \(ctx.codingPath.map(\.stringValue).joined(separator: ".")): \(ctx.debugDescription)")
        } catch let DecodingError.dataCorrupted(ctx) {
            throw .malformedJSON(ctx.underlyingError.map { "\($0)" } ?? ctx.debugDescription)
        } catch {
            throw .malformedJSON("\(error)")
        }
        guard !raw.isEmpty else { throw .invalidRegion("the region list is empty") }
        var out: [VMMRegion] = []
        for (i, r) in raw.enumerated() {
            if let a = r.page_size, let b = r.page_size_kib, a != b {
                throw .invalidRegion("region \(i): page_size \(a) and page_size_kib \(b) disagree")
            }
            guard let ps = r.page_size ?? r.page_size_kib else {
                throw .malformedJSON("region \(i) has neither \"page_size\" nor \"page_size_kib\"")
            }
            guard ps == UInt64(hostPageSize) || ps == 2 << 20 else { throw .unsupportedPageSize(ps) }
            if let first = out.first, first.pageSize != ps {
                throw .invalidRegion("region \(i) has page size \(ps) but region 0 has \(first.pageSize): one page size per VM")
            }
            guard r.size > 0 else { throw .invalidRegion("region \(i) has size 0") }
            guard r.size % ps == 0, r.base_host_virt_addr % ps == 0, r.offset % ps == 0 else {
                throw .invalidRegion("region \(i) (base 0x\(String(r.base_host_virt_addr, radix: 16)), size \(r.size), offset \(r.offset)) is not aligned to its page size \(ps)")
            }
            guard !r.base_host_virt_addr.addingReportingOverflow(r.size).overflow, !r.offset.addingReportingOverflow(r.size).overflow else {
                throw .invalidRegion("region \(i) wraps around the address space")
            }
            var file: VMMRegion.MemoryFileRange?
            switch (r.mem_fd_index, r.mem_fd_offset) {
            case (nil, nil): break
            case (let fi?, let o?):
                guard (0..<maxMemoryFiles).contains(fi) else {
                    throw .invalidRegion("region \(i): mem_fd_index \(fi) is not in 0..<\(maxMemoryFiles)")
                }
                guard o % ps == 0 else { throw .invalidRegion("region \(i): mem_fd_offset \(o) is not aligned to its page size \(ps)") }
                guard !o.addingReportingOverflow(r.size).overflow else { throw .invalidRegion("region \(i): its file range wraps around") }
                file = .init(index: fi, offset: o)
            default:
                throw .malformedJSON("region \(i) has only one of \"mem_fd_index\" and \"mem_fd_offset\"")
            }
            if i > 0, (file == nil) != (out[0].file == nil) {
                throw .invalidRegion("region \(i) \(file == nil ? "names no" : "names a") memory file but region 0 \(file == nil ? "does" : "does not"): all regions or none")
            }
            if let src = r.postcopy_source {
                guard !src.isEmpty, src.utf8.count <= maxSourceLength, let colon = src.lastIndex(of: ":"),
                      let port = Int(src[src.index(after: colon)...]), (1...65535).contains(port), colon != src.startIndex else {
                    throw .invalidRegion("region \(i): postcopy_source \"\(src.prefix(80))\" is not HOST:PORT")
                }
            }
            if i > 0, r.postcopy_source != out[0].source {
                throw .invalidRegion("region \(i) names another postcopy_source than region 0: one source per VM")
            }
            out.append(VMMRegion(base: r.base_host_virt_addr, size: r.size, offset: r.offset, pageSize: ps, file: file, source: r.postcopy_source))
        }
        return out
    }

    /// Memory files named by `regions` (0 when none: Firecracker's message).
    public static func memoryFileCount(_ regions: [VMMRegion]) -> Int {
        regions.compactMap { $0.file?.index }.max().map { $0 + 1 } ?? 0
    }

    /// Checks the fds that came after the userfaultfd (`extra` of them) against
    /// the files `regions` name: every fd named, every name an fd.
    public static func checkFileDescriptors(_ regions: [VMMRegion], extra: Int) throws(HandoffError) {
        let named = Set(regions.compactMap { $0.file?.index })
        if named.isEmpty {
            guard extra == 0 else { throw .fileDescriptors("\(extra) fd(s) came after the userfaultfd but no region names a memory file (mem_fd_index)") }
            return
        }
        if let missing = named.sorted().first(where: { $0 >= extra }) {
            throw .fileDescriptors("a region names memory file \(missing) but only \(extra) came after the userfaultfd")
        }
        if let unused = (0..<extra).first(where: { !named.contains($0) }) {
            throw .fileDescriptors("memory file \(unused) is named by no region")
        }
    }

    /// A JSON string literal.
    static func jsonString(_ s: String) -> String {
        let data = (try? JSONEncoder().encode(s)) ?? Data("\"\"".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    /// Encodes regions exactly as Firecracker sends them, plus `mem_fd_index` and
    /// `mem_fd_offset` for regions in a memory file and `postcopy_source` (for
    /// tests and the reference guest).
    public static func encode(_ regions: [VMMRegion]) -> [UInt8] {
        let objects = regions.map { r in
            let file = r.file.map { ",\"mem_fd_index\":\($0.index),\"mem_fd_offset\":\($0.offset)" } ?? ""
            let source = r.source.map { ",\"postcopy_source\":\(jsonString($0))" } ?? ""
            return "{\"base_host_virt_addr\":\(r.base),\"size\":\(r.size),\"offset\":\(r.offset),\"page_size\":\(r.pageSize),\"page_size_kib\":\(r.pageSize)\(file)\(source)}"
        }
        return Array(("[" + objects.joined(separator: ",") + "]").utf8)
    }
}
