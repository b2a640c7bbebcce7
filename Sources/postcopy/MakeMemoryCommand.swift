import ArgumentParser
import Foundation
import PostcopyCore

struct MakeMemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "make-memory",
        abstract: "Create a guest memory file with a deterministic pattern (for demos and tests).")

    @Argument(help: "Path of the file to create (for example /dev/shm/guest.ram).")
    var path: String

    @Option(name: .long, help: "Size, e.g. 64M, 1G.")
    var size = ByteCount(argument: "256M")!

    @Option(name: .long, help: "Percentage of pages left all-zero.")
    var zeroPercent: Int = 25

    @Option(name: .long, help: "Pattern seed.")
    var seed: UInt64 = 42

    func validate() throws {
        guard size.bytes > 0, size.bytes % Int(getpagesize()) == 0 else {
            throw ValidationError("--size must be a positive multiple of the page size (e.g. 64M, 1G)")
        }
        guard (0...100).contains(zeroPercent) else { throw ValidationError("--zero-percent must be 0...100") }
    }

    func run() throws {
        do {
            try MemoryFile.create(path: path, size: size.bytes, pageSize: Int(getpagesize()), zeroPercent: zeroPercent, seed: seed)
        } catch {
            throw fail("\(error)")
        }
        print("created \(path): \(size), \(zeroPercent)% zero pages")
    }
}
