import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The holes of a memory file (`lseek` with `SEEK_DATA`): ranges
/// that hold no data and read as zeros. Shmem counts a page swapped out as
/// data, so a hole is never a page with contents. On a file system without
/// hole support the whole file is data (the kernel's generic answer), and any
/// error is taken as "data": the answer errs on reading a page, never on
/// calling one zero.
final class FileHoles: Sendable {
    let fd: OwnedFD
    init(duplicating raw: Int32) throws(SystemError) {
        fd = OwnedFD(try libcCall("fcntl(F_DUPFD_CLOEXEC)") { fcntl(raw, F_DUPFD_CLOEXEC, 0) })
    }

    /// The first byte of data at or after `offset`; nil when there is none.
    func nextData(from offset: Int) -> Int? { MemoryFile.nextData(fd.raw, from: offset) }

    /// Whether [offset, offset+length) holds no data.
    func isHole(offset: Int, length: Int) -> Bool { MemoryFile.rangeIsHole(fd.raw, offset: offset, length: length) }

    /// Reads [offset, offset+length) into `buffer`; holes read as zeros and
    /// nothing is allocated (unlike a read through a mapping). False on error.
    func read(into buffer: UnsafeMutableRawPointer, offset: Int, length: Int) -> Bool {
        var done = 0
        while done < length {
            let n = pread(fd.raw, buffer + done, length - done, off_t(offset + done))
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }
}
