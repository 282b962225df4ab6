import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// A lab's result as a user sees it: a titled table, notes that explain the numbers, a
/// JSON document and an SVG chart written side by side.
package struct LabTable: Sendable {
    package var title: String
    package var columns: [String]
    package var rows: [[String]]
    package var notes: [String] = []

    package init(title: String, columns: [String], rows: [[String]], notes: [String] = []) {
        self.title = title; self.columns = columns; self.rows = rows; self.notes = notes
    }

    /// Fixed-width text: the first column left-aligned, numbers right-aligned.
    package var text: String {
        var widths = columns.map(\.count)
        for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in i == 0 ? c.padded(to: widths[i]) : c.leftPadded(to: widths[i]) }
                .joined(separator: "  ")
        }
        var out = title + "\n" + line(columns) + "\n"
        out += widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n"
        for r in rows { out += line(r) + "\n" }
        for n in notes { out += "• " + n + "\n" }
        return out
    }
}

/// A grouped bar chart as a standalone SVG document (no dependencies; opens in a browser).
package struct BarChart: Sendable {
    package var title: String
    package var categories: [String]
    /// One series per bar colour: name and one value per category.
    package var series: [(name: String, values: [Double])]
    package var yLabel: String
    /// Logarithmic y axis (for values that span orders of magnitude, like exit counts).
    package var logarithmic = false

    package init(title: String, categories: [String], series: [(name: String, values: [Double])], yLabel: String, logarithmic: Bool = false) {
        self.title = title; self.categories = categories; self.series = series; self.yLabel = yLabel; self.logarithmic = logarithmic
    }

    static let palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]

    package var svg: String {
        let width = 720.0, height = 420.0, left = 80.0, right = 20.0, top = 50.0, bottom = 70.0
        let plotW = width - left - right, plotH = height - top - bottom
        let all = series.flatMap(\.values).filter { $0.isFinite }
        let maxValue = max(all.max() ?? 1, logarithmic ? 10 : 1e-9)
        func scale(_ v: Double) -> Double {
            guard v > 0 else { return 0 }
            if logarithmic {
                let top = ceil(log10(maxValue))
                return max(0, log10(max(v, 1))) / max(top, 1) * plotH
            }
            return v / (maxValue * 1.1) * plotH
        }
        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(width / 2)" y="24" text-anchor="middle" font-size="15">\(Self.escape(title))</text>
            <line x1="\(left)" y1="\(top + plotH)" x2="\(left + plotW)" y2="\(top + plotH)" stroke="black"/>
            <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(top + plotH)" stroke="black"/>
            <text x="16" y="\(top + plotH / 2)" transform="rotate(-90 16 \(top + plotH / 2))" text-anchor="middle">\(Self.escape(yLabel + (logarithmic ? " (log scale)" : "")))</text>

            """
        // Axis ticks.
        let tickValues: [Double] = logarithmic
            ? (0...Int(ceil(log10(maxValue)))).map { pow(10, Double($0)) }
            : (0...4).map { Double($0) * maxValue * 1.1 / 4 }
        for t in tickValues {
            let y = top + plotH - scale(t)
            s += "<line x1=\"\(left - 4)\" y1=\"\(y)\" x2=\"\(left)\" y2=\"\(y)\" stroke=\"black\"/>"
            s += "<text x=\"\(left - 6)\" y=\"\(y + 4)\" text-anchor=\"end\">\(Self.short(t))</text>\n"
        }
        let groupW = plotW / Double(max(categories.count, 1))
        let barW = groupW * 0.8 / Double(max(series.count, 1))
        for (ci, c) in categories.enumerated() {
            let gx = left + Double(ci) * groupW + groupW * 0.1
            for (si, ser) in series.enumerated() where ci < ser.values.count {
                let v = ser.values[ci]
                let h = scale(v)
                let x = gx + Double(si) * barW
                s += "<rect x=\"\(x)\" y=\"\(top + plotH - h)\" width=\"\(barW * 0.95)\" height=\"\(h)\" fill=\"\(Self.palette[si % Self.palette.count])\"/>"
                s += "<text x=\"\(x + barW / 2)\" y=\"\(top + plotH - h - 4)\" text-anchor=\"middle\" font-size=\"10\">\(Self.short(v))</text>\n"
            }
            s += "<text x=\"\(gx + groupW * 0.4)\" y=\"\(top + plotH + 18)\" text-anchor=\"middle\">\(Self.escape(c))</text>\n"
        }
        for (si, ser) in series.enumerated() {
            let x = left + Double(si) * 160
            s += "<rect x=\"\(x)\" y=\"\(height - 24)\" width=\"12\" height=\"12\" fill=\"\(Self.palette[si % Self.palette.count])\"/>"
            s += "<text x=\"\(x + 16)\" y=\"\(height - 14)\">\(Self.escape(ser.name))</text>\n"
        }
        return s + "</svg>\n"
    }

    static func short(_ v: Double) -> String {
        let a = abs(v)
        if a >= 1e9 { return "\((v / 1e9).fixed(1))G" }
        if a >= 1e6 { return "\((v / 1e6).fixed(1))M" }
        if a >= 1e4 { return "\((v / 1e3).fixed(0))k" }
        if a >= 100 || v == v.rounded() { return v.fixed(0) }
        return v.significant(3)
    }

    static func escape(_ s: String) -> String {
        s.replacing("&", with: "&amp;").replacing("<", with: "&lt;").replacing(">", with: "&gt;")
    }
}

/// Why a lab could not produce its numbers.
package enum LabError: Error, CustomStringConvertible {
    /// A guest run ended other than by its own exit (or reported a failure).
    case guestFailed(what: String, reason: String, output: String)
    /// A guest did not reach the point the lab waits for.
    case guestStalled(what: String, output: String)
    /// The guest did not mark the phase the lab times.
    case noMarkers(String)
    case badParameters(String)

    package var description: String {
        switch self {
        case let .guestFailed(what, reason, output): return "\(what): \(reason); guest output:\n\(output)"
        case let .guestStalled(what, output): return "\(what) did not get going; guest output:\n\(output)"
        case let .noMarkers(what): return "\(what): the guest did not mark its measured phase"
        case let .badParameters(s): return s
        }
    }
}

/// A guest's serial output as a lab collects it (from the vCPU thread): the text, how many
/// lines, and when the first line completed.
// SAFETY: the bytes and counters are touched only under `lock`.
final class GuestOutput: @unchecked Sendable {
    private let lock = HostLock()
    private var bytes: [UInt8] = []
    private var count = 0
    private var first: UInt64?
    private let signal = DispatchSemaphore(value: 0)

    func append(_ b: UInt8) {
        let newline = b == UInt8(ascii: "\n")
        lock.withLock {
            bytes.append(b)
            if newline {
                count += 1
                if first == nil { first = monotonicNanoseconds() }
            }
        }
        if newline { signal.signal() }
    }

    var lines: Int { lock.withLock { count } }
    var firstLineAt: UInt64? { lock.withLock { first } }
    var text: String { lock.withLock { String(decoding: bytes, as: UTF8.self) } }

    /// Waits (up to a minute) for `n` lines.
    func waitForLines(_ n: Int) -> Bool {
        let deadline = DispatchTime.now() + 60
        while lines < n {
            if signal.wait(timeout: deadline) == .timedOut { return lines >= n }
        }
        return true
    }
}

package enum LabOutputError: Error, CustomStringConvertible {
    case cannotWrite(path: String, reason: String)
    package var description: String {
        switch self {
        case let .cannotWrite(path, reason): return "cannot write \(path): \(reason)"
        }
    }
}

/// Writes `<directory>/<name>.json` and `<name>.svg`, atomically (temporary file, then
/// rename), and returns their paths.
package func writeLabOutputs<R: Encodable>(name: String, directory: String, result: R, chart: some LabChart) throws -> (json: String, svg: String) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    let json = try encoder.encode(result)
    let dir = URL(fileURLWithPath: directory)
    do {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    } catch {
        throw LabOutputError.cannotWrite(path: directory, reason: "\(error)")
    }
    let jsonURL = dir.appendingPathComponent(name + ".json"), svgURL = dir.appendingPathComponent(name + ".svg")
    do {
        try json.write(to: jsonURL, options: .atomic)
        try Data(chart.svg.utf8).write(to: svgURL, options: .atomic)
    } catch {
        throw LabOutputError.cannotWrite(path: jsonURL.path, reason: "\(error)")
    }
    return (jsonURL.path, svgURL.path)
}
