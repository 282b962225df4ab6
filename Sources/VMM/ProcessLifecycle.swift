import CHost
import Devices
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How the process ends: on SIGINT, SIGTERM or SIGHUP the running VMs stop in order and the
/// files this process made (sockets, temporary snapshot files) are removed; a fatal fault on
/// any thread ends the process with one line instead of leaving a vCPU running the guest.
///
/// `install()` (first thing in `main`, before any other thread) blocks the stop signals in
/// every thread and takes them on one watcher thread, so no Swift code runs in a signal
/// handler. On a stop signal the watcher runs the `onStop` hooks (a `run` stops its
/// machines); the main thread then ends the run normally — devices flushed, sockets closed —
/// and exits with `exitStatus(signal)` after `announceStop`. With no hook registered, or
/// if the process is still alive `graceSeconds` later, or on a second stop signal, the
/// watcher removes the registered files and ends the process itself.
public enum ProcessLifecycle {
    /// Identifies an `onStop` hook for `removeHook`.
    public struct HookID: Hashable, Sendable { let value: Int }

    private struct Registry {
        /// Registered paths with how many registrations each has (two writers may share one).
        var paths: [String: Int] = [:]
        var hooks: [(id: Int, run: @Sendable (Int32) -> Void)] = []
        var nextHookID = 0
    }
    private static let registry = Mutex(Registry())
    private static let received = Atomic<Int32>(0)
    private static let installed = Atomic<Bool>(false)

    /// How long the main thread has to finish an orderly stop before the watcher ends the process.
    public static let graceSeconds = 10

    /// Blocks the stop signals, installs the fatal-fault handlers and starts the watcher.
    /// Call once, before any other thread exists (threads inherit the blocked mask).
    public static func install() {
        guard !installed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = host_lifecycle_block_stop_signals()
        _ = host_lifecycle_install_fatal_handlers()
        atexit { host_lifecycle_remove_cleanup_paths() }
        HostThread(name: "signals") { watch() }.detach()
    }

    /// The stop signal received, if any.
    public static var stopSignal: Int32? {
        let s = received.load(ordering: .acquiring)
        return s == 0 ? nil : s
    }

    /// Whether a stop signal has arrived: long work (a snapshot write) gives up.
    public static var isStopping: Bool { received.load(ordering: .relaxed) != 0 }

    /// What the process exits with after `signal`: 128 + its number (130, 143, 129).
    public static func exitStatus(_ signal: Int32) -> Int32 { 128 + signal }

    public static func signalName(_ signal: Int32) -> String {
        switch signal {
        case SIGINT: return "SIGINT"
        case SIGTERM: return "SIGTERM"
        case SIGHUP: return "SIGHUP"
        default: return "signal \(signal)"
        }
    }

    /// The line a stopped process ends with, on its own line after guest output.
    public static func stopMessage(_ signal: Int32) -> String {
        lineBreakBeforeMessage() + "swiftvisor: stopped by \(signalName(signal))\n"
    }

    /// "\n" when the guest's console output left a line open and standard error goes where
    /// standard output goes (that line then counts as ended), else "": a message printed
    /// after it starts on its own line.
    public static func lineBreakBeforeMessage() -> String {
        guard host_lifecycle_needs_newline() != 0 else { return "" }
        host_lifecycle_note_console_byte(UInt8(ascii: "\n"))
        return "\n"
    }

    /// Writes `stopMessage(signal)` to standard error.
    public static func announceStop(_ signal: Int32) {
        var text = stopMessage(signal)
        text.withUTF8 { buffer in
            var offset = 0
            while offset < buffer.count {
                let n = write(2, buffer.baseAddress! + offset, buffer.count - offset)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }
                offset += n
            }
        }
    }

    /// Records the guest console's output byte (see `stopMessage`).
    @inline(__always)
    public static func noteConsoleByte(_ byte: UInt8) { host_lifecycle_note_console_byte(byte) }

    /// A file this process made and removes before it ends: it is removed if a signal or a
    /// fatal fault ends the process, or at `exit`. Register before creating the file.
    public static func register(path: String) {
        registry.withLock { r in
            r.paths[path, default: 0] += 1
            publish(r.paths)
        }
    }

    /// The file is gone or has become a result (a snapshot renamed into place).
    public static func unregister(path: String) {
        registry.withLock { r in
            guard let n = r.paths[path] else { return }
            r.paths[path] = n > 1 ? n - 1 : nil
            publish(r.paths)
        }
    }

    /// Paths registered now (for tests and diagnostics).
    public static var registeredPaths: [String] { registry.withLock { Array($0.paths.keys).sorted() } }

    /// Runs `hook` (on the watcher thread, with the signal) when a stop signal arrives. A
    /// hook asks work to end (`Machine.stop()`); it must not block.
    @discardableResult
    public static func onStop(_ hook: @escaping @Sendable (Int32) -> Void) -> HookID {
        registry.withLock { r in
            r.nextHookID += 1
            r.hooks.append((r.nextHookID, hook))
            return HookID(value: r.nextHookID)
        }
    }

    public static func removeHook(_ id: HookID) {
        registry.withLock { r in r.hooks.removeAll { $0.id == id.value } }
    }

    /// Runs `body` with a hook that stops `machines` on a stop signal.
    public static func stoppingOnSignal<T>(_ machines: [Machine], _ body: () throws -> T) rethrows -> T {
        let hook = onStop { _ in machines.forEach { $0.stop() } }
        defer { removeHook(hook) }
        if isStopping { machines.forEach { $0.stop() } }  // the signal came before the hook
        return try body()
    }

    /// The fatal-fault handler reads the paths from C memory (no Swift in a signal handler).
    private static func publish(_ paths: [String: Int]) {
        var packed: [UInt8] = []
        for path in paths.keys { packed += Array(path.utf8) + [0] }
        _ = packed.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) {
                host_lifecycle_set_cleanup_paths($0.baseAddress, $0.count, Int32(paths.count))
            }
        }
    }

    private static func watch() {
        while true {
            let signal = host_lifecycle_wait_stop_signal(-1)
            guard signal > 0 else { continue }
            received.store(signal, ordering: .releasing)
            let hooks = registry.withLock { $0.hooks.map(\.run) }
            if hooks.isEmpty { exitNow(signal) }
            hooks.forEach { $0(signal) }
            // The main thread now ends the run and exits; a second signal, or a stop that
            // takes longer than the grace period, ends the process here.
            _ = host_lifecycle_wait_stop_signal(Int32(graceSeconds * 1000))
            exitNow(signal)
        }
    }

    /// Removes the registered files, says why, and ends the process without running more Swift.
    private static func exitNow(_ signal: Int32) -> Never {
        var message = stopMessage(signal)
        // Held until the process ends: no file can be registered (and created) past this point.
        registry.withLock { _ in
            message.withUTF8 { host_lifecycle_exit_now($0.baseAddress, $0.count, exitStatus(signal)) }
        }
    }
}

extension Machine {
    /// Makes what the devices wrote durable: every virtio-blk image is fdatasync'd. Errors
    /// are returned as lines (the run has ended; there is nothing left to stop).
    public func flushDevices() -> [String] {
        var problems: [String] = []
        for device in attachedDevices {
            guard let disk = device.transport?.device as? VirtioBlock else { continue }
            do { try disk.flush() } catch { problems.append("\(disk.path): \(error)") }
        }
        return problems
    }
}
