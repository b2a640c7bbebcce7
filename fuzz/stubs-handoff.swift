// HandoffMessage.swift's only outside dependency, for the standalone fuzz build.
public struct SystemError: Error, Sendable, CustomStringConvertible, Equatable {
    public var description: String
}
