import ArgumentParser
import CPostcopy

@main
struct Postcopy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy",
        abstract: "Postcopy live-migration page transport (userfaultfd destination, page-serving source).",
        discussion: """
            A source serves guest RAM from a memory file; a destination registers guest RAM with \
            userfaultfd, resumes at once, pulls every page the guest touches on demand and streams \
            the rest in the background. Integrity is checked on every run (digest of all RAM).

            Typical run on one machine:
              postcopy make-memory /dev/shm/guest.ram --size 1G
              postcopy source --memory /dev/shm/guest.ram --listen 127.0.0.1:7070 &
              postcopy dest --connect 127.0.0.1:7070 --touch random --threads 4
            """,
        subcommands: [MigrateCommand.self, RestoreCommand.self, SourceCommand.self, DestCommand.self, GuestCommand.self, MakeMemoryCommand.self, BaselineCommand.self, ChaosProxyCommand.self])

    static func main() {
        // Children spawned by Foundation's Process can inherit a blocked SIGTERM.
        cpc_unblock_signals()
        Self.main(nil)
    }
}
