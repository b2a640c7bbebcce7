import PostcopyCore

// MARK: paravirtual async page faults

/// Guest tasks parked on missing pages ("page not present", by token) and the
/// "page ready" answers they wait for. Waiters are kept by page in
/// `apfWaiters` (under `pages.lock`); the fault thread batches the answers of
/// one pass (`fault.readyBatch`) into one post.
extension PostcopyEngine {
    /// Attaches (or, with nil, detaches) a guest's async page fault channel. The
    /// fault thread itself takes its requests (no extra thread hop on the way to
    /// a fetch); "page ready" is posted by whichever engine thread installs the page.
    public func attachAPF(_ hooks: APFHooks?) {
        apfHooks.withLock { $0 = hooks }
        apfWake.signal()
    }

    /// Fault thread: keeps the epoll watch on the attached channel's request fd.
    func refreshAPFWatch(_ epoll: Epoll) {
        assert(faultThread.isCurrent)
        let fd = apfHooks.withLock { $0?.requestFD } ?? -1
        guard fd != fault.apfWatchedFD else { return }
        if fault.apfWatchedFD >= 0 { epoll.remove(fault.apfWatchedFD) }
        fault.apfWatchedFD = fd
        if fd >= 0 { try? epoll.add(fd, for: .apfRequests) }
    }

    /// Fault thread: "page not present (token)" requests from the guest. A page
    /// already present is ready at once; a missing one is fetched like a demand
    /// fault (once, however many wait for it); an address outside guest memory
    /// is answered as such.
    func takeAPFRequests(at now: UInt64) {
        assert(faultThread.isCurrent)
        guard let hooks = apfHooks.withLock({ $0 }) else { return }
        var answers: [(UInt64, APFStatus)] = []
        for r in hooks.take() {
            guard let p = map.globalPage(r.address & ~UInt64(unitBytes - 1)) else {
                answers.append((r.token, .invalidAddress))
                continue
            }
            let presentNow: Bool = pages.lock.withLock {
                if pages.state(p) == .present { return true }
                apfWaiters[p, default: []].append(r.token)
                return false
            }
            if presentNow {
                answers.append((r.token, .ready))
            } else {
                counters.apfFaults.add(1, ordering: .relaxed)
                handleFault(address: r.address, at: now)
            }
        }
        if !answers.isEmpty {
            counters.apfReady.add(UInt64(answers.count { $0.1 == .ready }), ordering: .relaxed)
            hooks.post(answers)
        }
    }

    /// "Page ready" for every token the fault thread released in this pass:
    /// one post (one completion-eventfd write) for a burst of installs.
    func flushReadyBatch() {
        assert(faultThread.isCurrent)
        guard !fault.readyBatch.isEmpty else { return }
        postAPFReady(fault.readyBatch)
        fault.readyBatch.removeAll(keepingCapacity: true)
    }

    func postAPFReady(_ tokens: [UInt64]) {
        guard !tokens.isEmpty, let hooks = apfHooks.withLock({ $0 }) else { return }
        counters.apfReady.add(UInt64(tokens.count), ordering: .relaxed)
        hooks.post(tokens.map { ($0, .ready) })
    }

    /// Reports ready every token waiting on these pages (now present, or removed).
    /// On the fault thread (fault, REMOVE): the tokens join this pass's batch.
    func releaseAPFWaiters(_ ps: [Int]) {
        assert(faultThread.isCurrent)
        fault.readyBatch += pages.lock.withLock { ps.flatMap { apfWaiters.removeValue(forKey: $0) ?? [] } }
    }
}
