import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// The page channels in use. A reconnect replaces both and bumps the
/// generation; each thread notices the new generation and moves over.
struct Channels {
    var generation = 0
    var demand: PageChannel
    var background: PageChannel?
}

/// Opens new channels to the source after a connection loss (rejoining the session).
typealias Reconnector = @Sendable () throws(TransportError) -> (demand: PageChannel, background: PageChannel)

/// How a thread goes on after a connection loss.
enum Recovery: Equatable {
    /// Connected again (by this thread or another): move to the current
    /// channels and re-send what is in flight.
    case reconnected
    /// Every page was already in: the source going away is the normal end, not
    /// a loss. Stop using the channel; nothing is re-sent, nothing failed.
    case sourceDone
}

extension PostcopyEngine {
    func currentChannels() -> Channels {
        channelLock.withLock { channels }
    }

    var channelGeneration: Int { channelLock.withLock { channels.generation } }

    /// After a connection loss seen on channels of `generation`: reconnects
    /// (once, whichever thread gets here first), with backoff, until the
    /// deadline. Guest threads stay parked meanwhile; nothing is lost, since
    /// every request in flight is re-sent on the new channels by its owner.
    /// Once every page has been settled the source is no longer needed: a
    /// connection that closes then (a source that exits after the migration)
    /// ends quietly (`.sourceDone`), with no reconnect and no failure.
    func recover(from generation: Int, cause: TransportError) throws(TransportError) -> Recovery {
        guard cause.isConnectionLoss else { throw cause }
        if streamEnd != 0 {
            logger.debug("connection to the source closed after the last page (\(cause)); not reconnecting")
            return .sourceDone
        }
        guard let reconnect, config.recoveryDeadline > 0 else { throw cause }
        let result: Result<Void, TransportError> = recoveryLock.withLock {
            if channelGeneration > generation { return .success(()) }
            logger.warning("connection to the source lost (\(cause)); reconnecting")
            var backoff = Backoff(deadline: config.recoveryDeadline)
            let t0 = backoff.since
            while lifecycle.load(ordering: .relaxed) < .stopping {
                do {
                    let (d, b) = try reconnect()
                    placeReplies(on: [d, b])
                    channelLock.withLock {
                        channels.demand = d
                        channels.background = b
                        channels.generation += 1
                    }
                    let took = nowNanoseconds() - t0
                    recoveryTimes.withLock { $0.append(took) }
                    config.observer?.recovered(took)
                    logger.warning("reconnected to the source after \(formatDuration(ns: took))")
                    return .success(())
                } catch {
                    let error = error as? TransportError ?? .closed("\(error)")
                    guard error.isConnectionLoss else { return .failure(error) }  // refused, not broken
                    if backoff.expired {
                        return .failure(.timedOut("no connection to the source for \(config.recoveryDeadline) s (last: \(error))"))
                    }
                    backoff.wait()
                }
            }
            return .failure(cause)
        }
        try result.get()
        return .reconnected
    }

    /// Pages of this thread's requests in flight (demand or background).
    func inflightPages(background: Bool) -> Int {
        ownRequests(background: background).reduce(0) { $0 + Int($1.pageCount) }
    }

    /// This thread's requests in flight, by id: the background thread's are the
    /// stream classes and the prefetch it sent for the fault thread.
    func ownRequests(background: Bool) -> [PageRequest] {
        let viaStream = streamPrefetch.withLock { $0 }
        return inflight.withLock {
            $0.values.filter { ($0.pageClass.isStream || viaStream.contains($0.requestID)) == background }.sorted { $0.requestID < $1.requestID }
        }
    }

    /// After a reconnect: moves `epoll`'s watch (when `watched`) from the old
    /// channel to the new one and re-sends, on it, this thread's requests still in
    /// flight (demand or background). Returns how many; a send that fails throws
    /// for the caller to recover again.
    func switchChannel(_ epoll: Epoll, from old: PageChannel, to new: PageChannel, watched: Bool,
                       background: Bool) throws(TransportError) -> Int {
        if watched {
            epoll.remove(old.pollDescriptor)
            do { try epoll.add(new.pollDescriptor, for: .channel) } catch { throw .local(error) }
        }
        let pending = ownRequests(background: background)
        for r in pending { try new.submit(r) }
        return pending.count
    }
}
