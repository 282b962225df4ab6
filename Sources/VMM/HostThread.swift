import CHost
#if canImport(Glibc)
import Glibc
#endif

/// A joinable OS thread (one per vCPU). Foundation's Thread cannot be joined, and the
/// run loop wants a plain thread with nothing else scheduled on it.
// SAFETY: the pthread handle is written once in init, before any other thread can see the object.
public final class HostThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }

    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box {
            host_set_thread_name(name)
            body()
        }).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    public func join() { pthread_join(thread, nil) }

    /// Sleeps the calling thread.
    public static func sleep(milliseconds: Int) { usleep(useconds_t(max(0, milliseconds)) * 1000) }

    /// Lets the thread end on its own (it is never joined).
    public func detach() { pthread_detach(thread) }
}
