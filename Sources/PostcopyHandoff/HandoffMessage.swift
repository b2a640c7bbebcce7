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

    public init(base: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64) {
        self.base = base
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
    }
}

/// Why a VMM's handoff was refused. The daemon logs it and closes that one
/// connection; other VMMs are not affected.
public enum HandoffError: Error, Sendable, CustomStringConvertible {
    case malformedJSON(String)
    case noFileDescriptor
    case tooManyFileDescriptors(Int)
    case invalidRegion(String)
    case unsupportedPageSize(UInt64)
    case layout(String)
    case source(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .malformedJSON(let s): return "malformed handoff message: \(s)"
        case .noFileDescriptor: return "handoff message carried no userfaultfd (expected exactly one SCM_RIGHTS fd)"
        case .tooManyFileDescriptors(let n): return "handoff message carried \(n) file descriptors (expected exactly one, the userfaultfd)"
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

    private struct Raw: Decodable {
        var base_host_virt_addr: UInt64
        var size: UInt64
        var offset: UInt64
        var page_size: UInt64?
        var page_size_kib: UInt64?
    }

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
            out.append(VMMRegion(base: r.base_host_virt_addr, size: r.size, offset: r.offset, pageSize: ps))
        }
        return out
    }

    /// Encodes regions exactly as Firecracker sends them (for tests and the reference guest).
    public static func encode(_ regions: [VMMRegion]) -> [UInt8] {
        let objects = regions.map {
            "{\"base_host_virt_addr\":\($0.base),\"size\":\($0.size),\"offset\":\($0.offset),\"page_size\":\($0.pageSize),\"page_size_kib\":\($0.pageSize)}"
        }
        return Array(("[" + objects.joined(separator: ",") + "]").utf8)
    }
}
