import CHost
import Devices
import VirtCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// virtio queue notifications through KVM ioeventfds: each queue's QueueNotify write
/// signals an eventfd inside the kernel (no exit to userspace), and this thread processes
/// the queue — the vCPU never waits for the device. One thread per machine.
// SAFETY: doorbells are added before start() (asserted) and the thread gets its own copy; `notifications` is atomic.
final class DoorbellThread: @unchecked Sendable {
    private struct Doorbell { let fd: Int32; let address: UInt64; let queue: Int; let transport: VirtioMMIOTransport }
    private let vm: any NotificationOffload
    private var doorbells: [Doorbell] = []
    /// Signalled to stop the thread.
    private let stopFD: Int32
    private var thread: HostThread?
    /// Notifications handled here (each would otherwise have been an exit to userspace).
    let notifications = Atomic<UInt64>(0)


    init(vm: any NotificationOffload) throws {
        self.vm = vm
        let fd = host_eventfd()
        guard fd >= 0 else { throw DoorbellError.eventfdFailed(errno: -fd) }
        stopFD = fd
    }

    deinit {
        stop()
        for d in doorbells {
            try? vm.deassignNotification(address: d.address, length: 4, value: UInt64(d.queue), eventFD: d.fd)
            close(d.fd)
        }
        close(stopFD)
    }

    /// Routes the QueueNotify writes of each of `transport`'s queues (at `base`) here.
    func add(_ transport: VirtioMMIOTransport, base: UInt64) throws {
        precondition(thread == nil, "doorbells are added before the thread starts")
        let address = base + VirtioMMIOTransport.queueNotifyOffset
        for queue in transport.device.queueMaxSizes.indices {
            let fd = host_eventfd()
            guard fd >= 0 else { throw DoorbellError.eventfdFailed(errno: -fd) }
            do {
                try vm.assignNotification(address: address, length: 4, value: UInt64(queue), eventFD: fd)
            } catch {
                close(fd)
                throw error
            }
            doorbells.append(Doorbell(fd: fd, address: address, queue: queue, transport: transport))
        }
    }

    var isEmpty: Bool { doorbells.isEmpty }

    func start() {
        guard thread == nil, !doorbells.isEmpty else { return }
        let bells = doorbells, stop = stopFD
        thread = HostThread(name: "doorbells") { [self] in
            var fds = bells.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) } + [pollfd(fd: stop, events: Int16(POLLIN), revents: 0)]
            while true {
                let n = poll(&fds, nfds_t(fds.count), -1)
                if n < 0 { if errno == EINTR { continue }; return }
                if fds[fds.count - 1].revents != 0 { return }
                for i in bells.indices where fds[i].revents != 0 {
                    if host_eventfd_take(bells[i].fd) > 0 {
                        notifications.add(1, ordering: .relaxed)
                        bells[i].transport.processQueue(bells[i].queue)  // deferred while frozen for a snapshot
                    }
                }
            }
        }
    }

    func stop() {
        guard let t = thread else { return }
        _ = host_eventfd_signal(stopFD)
        t.join()
        thread = nil
    }
}

public enum DoorbellError: Error, Equatable, CustomStringConvertible {
    case eventfdFailed(errno: Int32)
    public var description: String {
        switch self { case let .eventfdFailed(e): return "eventfd failed: \(String(cString: strerror(e)))" }
    }
}
