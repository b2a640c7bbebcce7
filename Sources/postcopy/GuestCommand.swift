import ArgumentParser

struct GuestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest",
        abstract: "The reference guest: a workload on vCPU threads over guest RAM that can pause at the source and resume at the destination.",
        subcommands: [GuestRunCommand.self, GuestResumeCommand.self])
}
