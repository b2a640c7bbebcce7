import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyGuest
import PostcopyTransport

extension GuestResumeCommand {
    /// The task guest (with or without async page faults): resume, count the
    /// work done in the first --work-window-ms and over --run-for, then bring every
    /// page in from inside tasks and check every page against the source's RAM.
    func runTaskGuest(ram: MemoryMapping, state: GuestDeviceState, receivedAt: UInt64, control: TCPTransport, info: SessionInfo,
                      channel: APFGuestChannel?, baseline: StopAndCopy?) throws {
        let guest = TaskGuest(base: ram.base, bytes: ram.length, vcpus: state.vcpus.count, tasksPerVCPU: tasks, think: think,
                              seed: 7, channel: channel)
        let resumedAt = nowNanoseconds()
        guest.start()
        let downtime = resumedAt &- state.pausedAtNs
        if json {
            emitEvent(.resumed(.init(resumedAtNs: resumedAt, downtimeNs: downtime, deviceStateReceivedNs: receivedAt &- state.pausedAtNs,
                                     restoreNs: resumedAt - receivedAt)))
        } else {
            print("resumed (\(state.vcpus.count) vCPUs x \(tasks) tasks, \(apf ? "async page faults" : "blocking faults")): downtime \(formatDuration(ns: downtime))")
        }
        let reporter = try OpsReporter(side: "destination", json: json, intervalMs: reportMs) { guest.totalOps }
        let windowEnd = resumedAt + UInt64(workWindowMs) * 1_000_000
        let now0 = nowNanoseconds()
        if windowEnd > now0 { usleep(useconds_t((windowEnd - now0) / 1000)) }
        let windowOps = guest.totalOps
        let rest = Double(resumedAt) / 1e9 + runFor - Double(nowNanoseconds()) / 1e9
        if rest > 0 { usleep(useconds_t(rest * 1e6)) }
        guest.stop()
        reporter.finish()
        let ops = guest.totalOps
        let perTask = guest.perTask
        let v = guest.vcpuTotals
        guest.touchAll()
        // Integrity: the task guest only reads, so every page must equal the source's at pause.
        let digests: [UInt64]
        do { digests = try control.fetchAllPageDigests(info.table) } catch {
            throw fail("could not fetch the source's page digests: \(error)")
        }
        baseline?.confirmComplete()
        let (pages, pageSize) = (info.table.totalPages, info.table.pageSize)
        control.close()
        var mismatched = 0
        for p in 0..<pages where cpc_xxh64(ram.base + p * pageSize, pageSize, 0) != digests[p] { mismatched += 1 }
        let kv = try ReferenceGuest(base: ram.base, memoryBytes: ram.length, workload: state.workload, vcpus: state.vcpus,
                                    trackDirty: false, zipfSkew: state.zipfSkew).verifyStore()
        let stalls = perTask.map(\.stallNs).sorted()
        let ok = mismatched == 0 && kv.failed == 0
        let result = GuestEvent.verified(.init(
            ok: ok, kvSlotsVerified: kv.verified, kvSlotsFailed: kv.failed, getChecksumFailures: 0,
            pagesVerified: pages - mismatched, pagesVerifiedBeforeFirstWrite: 0, pagesMismatched: mismatched, ops: ops))
        let work = GuestEvent.taskWork(.init(
            apf: apf, vcpus: state.vcpus.count, tasksPerVCPU: tasks, think: Int(think), workWindowMs: workWindowMs,
            opsInWindow: windowOps, ops: ops, notPresent: v.notPresent, ready: v.ready, notifications: v.notifications,
            blockingFallbacks: v.blockingFallbacks, vcpuIdleNs: v.idleNs,
            taskStallNs: .init(p50: stalls[stalls.count / 2], max: stalls.last ?? 0, mean: stalls.reduce(0, +) / UInt64(max(stalls.count, 1))),
            taskStallNsEach: stalls))
        if json {
            emitEvent(work)
            emitEvent(result)
        } else {
            print("work: \(windowOps) reads in the first \(workWindowMs) ms, \(ops) in all; \(v.notPresent) async faults, \(v.notifications) notifications")
            print("integrity: \(ok ? "OK" : "FAILED") \(result.line)")
        }
        if !ok { throw ExitCode(3) }
    }
}
