import Foundation
import TestSupport

/// A Linux guest's serial console as the tests drive it: what it printed so far, a line
/// typed into it, and whether the VM still runs (a stopped VM ends every wait at once).
protocol LinuxConsole {
    var text: String { get }
    var isRunning: Bool { get }
    func type(_ line: String)
}

extension LinuxConsole {
    /// Waits (bounded) for the shell's next prompt after `from`; the offset past it.
    func prompt(after from: String.Index?, seconds: Double = 300) -> String.Index? {
        waitFor("/ # ", after: from, seconds: seconds)
    }

    /// Waits (bounded) until the output after `from` contains `needle`; the offset past it.
    func waitFor(_ needle: String, after from: String.Index? = nil, seconds: Double) -> String.Index? {
        var found: String.Index?
        _ = waitUntil(seconds: seconds) {
            found = search(needle, after: from)
            return found != nil || !isRunning
        }
        return found ?? search(needle, after: from)
    }

    /// Types `command`, waits for its echo and then for `expected` after it; the offset past
    /// `expected`, or nil (the caller's failure message shows `tail`). The prompt and the
    /// command must fit on one 80-column line: the shell echoes a longer one wrapped.
    func answer(_ command: String, expecting expected: String, after from: String.Index?, seconds: Double = 120) -> String.Index? {
        type(command)
        guard let echoed = waitFor(command, after: from, seconds: seconds) else { return nil }
        return waitFor(expected, after: echoed, seconds: seconds)
    }

    private func search(_ needle: String, after from: String.Index?) -> String.Index? {
        let t = text
        let start = from.map { min($0, t.endIndex) } ?? t.startIndex
        return t.range(of: needle, range: start..<t.endIndex)?.upperBound
    }

    /// The last lines of the console, for a failure message.
    var tail: String { text.split(separator: "\n", omittingEmptySubsequences: false).suffix(25).joined(separator: "\n") }
}
