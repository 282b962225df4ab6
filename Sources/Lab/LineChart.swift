import FoundationEssentials
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// A lab's chart as a standalone SVG document (written beside the JSON, inlined in `lab report`).
package protocol LabChart: Sendable {
    var svg: String { get }
}

extension BarChart: LabChart {}

/// Curves against a numeric x axis, one unit per axis: measured points joined by lines, model
/// curves dashed, negative values below a zero line, and vertical markers (a break-even).
package struct LineChart: LabChart {
    package struct Series: Sendable {
        package var name: String
        package var points: [(x: Double, y: Double)]
        /// A model's curve: dashed, no point marks.
        package var isModel: Bool

        package init(name: String, points: [(x: Double, y: Double)], isModel: Bool = false) {
            self.name = name; self.points = points; self.isModel = isModel
        }
    }

    /// A vertical line at `x` with a label (e.g. "break-even (model) p = 0.059").
    package struct Marker: Sendable {
        package var x: Double
        package var label: String
        package init(x: Double, label: String) { self.x = x; self.label = label }
    }

    package var title: String
    /// Axis labels, each naming the one unit of its axis.
    package var xLabel: String
    package var yLabel: String
    package var series: [Series]
    package var markers: [Marker] = []

    package init(title: String, xLabel: String, yLabel: String, series: [Series], markers: [Marker] = []) {
        self.title = title; self.xLabel = xLabel; self.yLabel = yLabel; self.series = series; self.markers = markers
    }

    /// Dashes for model curves, by series index (so two models stay apart).
    static let dashes = ["6 4", "2 3", "10 3 2 3"]

    package var svg: String {
        let width = 720.0, height = 440.0, left = 80.0, right = 24.0, top = 50.0, bottom = 100.0
        let plotW = width - left - right, plotH = height - top - bottom
        let points = series.flatMap(\.points).filter { $0.x.isFinite && $0.y.isFinite }
        let xs = points.map(\.x) + markers.map(\.x).filter(\.isFinite)
        let ys = points.map(\.y)
        let xTicks = Self.ticks(from: xs.min() ?? 0, to: xs.max() ?? 1)
        // The y axis always shows zero, so signs read at a glance.
        let yTicks = Self.ticks(from: min(ys.min() ?? 0, 0), to: max(ys.max() ?? 1, 0))
        let (x0, x1) = (xTicks.first!, xTicks.last!), (y0, y1) = (yTicks.first!, yTicks.last!)
        func px(_ x: Double) -> Double { left + (x - x0) / (x1 - x0) * plotW }
        func py(_ y: Double) -> Double { top + plotH - (y - y0) / (y1 - y0) * plotH }
        let escape = BarChart.escape
        func n(_ v: Double) -> String { v.fixed(1) }

        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(n(width / 2))" y="24" text-anchor="middle" font-size="15">\(escape(title))</text>
            <rect x="\(n(left))" y="\(n(top))" width="\(n(plotW))" height="\(n(plotH))" fill="none" stroke="black"/>
            <text x="\(n(left + plotW / 2))" y="\(n(top + plotH + 36))" text-anchor="middle">\(escape(xLabel))</text>
            <text x="18" y="\(n(top + plotH / 2))" transform="rotate(-90 18 \(n(top + plotH / 2)))" text-anchor="middle">\(escape(yLabel))</text>

            """
        for t in xTicks {
            s += "<line x1=\"\(n(px(t)))\" y1=\"\(n(top + plotH))\" x2=\"\(n(px(t)))\" y2=\"\(n(top + plotH + 4))\" stroke=\"black\"/>"
            s += "<text x=\"\(n(px(t)))\" y=\"\(n(top + plotH + 18))\" text-anchor=\"middle\">\(Self.label(t))</text>\n"
        }
        for t in yTicks {
            s += "<line x1=\"\(n(left - 4))\" y1=\"\(n(py(t)))\" x2=\"\(n(left + plotW))\" y2=\"\(n(py(t)))\" stroke=\"#ddd\"/>"
            s += "<text x=\"\(n(left - 6))\" y=\"\(n(py(t) + 4))\" text-anchor=\"end\" class=\"y-tick\">\(Self.label(t))</text>\n"
        }
        if y0 < 0 {
            s += "<line class=\"zero\" x1=\"\(n(left))\" y1=\"\(n(py(0)))\" x2=\"\(n(left + plotW))\" y2=\"\(n(py(0)))\" stroke=\"black\" stroke-width=\"1.5\"/>\n"
        }
        for m in markers where m.x.isFinite {
            s += "<line class=\"marker\" x1=\"\(n(px(m.x)))\" y1=\"\(n(top))\" x2=\"\(n(px(m.x)))\" y2=\"\(n(top + plotH))\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"/>"
        }
        var modelIndex = 0
        for (i, ser) in series.enumerated() {
            let colour = BarChart.palette[i % BarChart.palette.count]
            let valid = ser.points.filter { $0.x.isFinite && $0.y.isFinite }.sorted { $0.x < $1.x }
            guard !valid.isEmpty else { continue }
            let path = valid.map { "\(n(px($0.x))),\(n(py($0.y)))" }.joined(separator: " ")
            let dash = ser.isModel ? " stroke-dasharray=\"\(Self.dashes[modelIndex % Self.dashes.count])\"" : ""
            if ser.isModel { modelIndex += 1 }
            s += "<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(colour)\" stroke-width=\"2\"\(dash)/>\n"
            if !ser.isModel {
                for p in valid {
                    s += "<circle cx=\"\(n(px(p.x)))\" cy=\"\(n(py(p.y)))\" r=\"3.5\" fill=\"\(colour)\" data-x=\"\(p.x.significant(4))\" data-y=\"\(p.y.significant(4))\"/>"
                }
                s += "\n"
            }
        }
        // Marker labels last, over the curves, stacked from the top.
        for (i, m) in markers.enumerated() where m.x.isFinite {
            let anchor = px(m.x) > left + plotW * 0.7 ? "end" : "start"
            let dx = anchor == "end" ? -4.0 : 4.0
            s += "<text class=\"marker-label\" x=\"\(n(px(m.x) + dx))\" y=\"\(n(top + 14 + Double(i) * 14))\" text-anchor=\"\(anchor)\" fill=\"#c0392b\">\(escape(m.label))</text>\n"
        }
        // Legend: two columns under the x label.
        for (i, ser) in series.enumerated() {
            let colour = BarChart.palette[i % BarChart.palette.count]
            let x = left + Double(i % 2) * 320, y = top + plotH + 56 + Double(i / 2) * 16
            let dash = ser.isModel ? " stroke-dasharray=\"6 4\"" : ""
            s += "<line x1=\"\(n(x))\" y1=\"\(n(y - 4))\" x2=\"\(n(x + 24))\" y2=\"\(n(y - 4))\" stroke=\"\(colour)\" stroke-width=\"2\"\(dash)/>"
            s += "<text x=\"\(n(x + 30))\" y=\"\(n(y))\">\(escape(ser.name))</text>\n"
        }
        return s + "</svg>\n"
    }

    /// Round tick values (steps of 1, 2 or 5 × 10^k) covering [low, high], about five of them.
    static func ticks(from low: Double, to high: Double) -> [Double] {
        var (a, b) = (low, high)
        if !(b > a) { (a, b) = (a - 1, a + 1) }
        let raw = (b - a) / 5
        let magnitude = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? 10 * magnitude
        let first = floor(a / step), last = ceil(b / step)
        return (Int(first)...Int(last)).map { Double($0) * step }
    }

    /// A tick label: as few digits as the value needs; a real minus sign for negatives.
    static func label(_ v: Double) -> String {
        let rounded = abs(v) < 1e-12 ? 0 : v
        var text = BarChart.short(rounded)
        if text.hasPrefix("-") { text = "−" + text.dropFirst() }
        return text
    }
}
