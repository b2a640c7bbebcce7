import Foundation

/// A line chart as standalone SVG: axes with ticks and units, a title, a legend.
struct LineChart {
    struct Series {
        var name: String
        var points: [(Double, Double)]
        var dashed = false
    }
    var title: String
    var xLabel: String
    var yLabel: String
    var series: [Series]
    var logX = false
    /// Vertical marker lines: (x, label).
    var markers: [(Double, String)] = []

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

    func render(width: Double = 900, height: Double = 460) -> String {
        let left = 78.0, right = 300.0, top = 40.0, bottom = 56.0
        let pw = width - left - right, ph = height - top - bottom
        let all = series.flatMap { $0.points }.filter { !logX || $0.0 > 0 }
        let tx: (Double) -> Double = { logX ? log10(max($0, 1e-12)) : $0 }
        var xMin = all.map { tx($0.0) }.min() ?? 0, xMax = all.map { tx($0.0) }.max() ?? 1
        for m in markers { xMin = min(xMin, tx(m.0)); xMax = max(xMax, tx(m.0)) }
        var yMin = min(0, all.map { $0.1 }.min() ?? 0), yMax = all.map { $0.1 }.max() ?? 1
        if xMax <= xMin { xMax = xMin + 1 }
        if yMax <= yMin { yMax = yMin + 1 }
        if logX { xMin = floor(xMin); xMax = ceil(xMax) } else { yMax *= 1.05 }
        let px: (Double) -> Double = { left + (tx($0) - xMin) / (xMax - xMin) * pw }
        let py: (Double) -> Double = { top + ph - ($0 - yMin) / (yMax - yMin) * ph }
        var out = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left + pw / 2)" y="22" text-anchor="middle" font-size="15" font-weight="bold">\(esc(title))</text>
            <rect x="\(left)" y="\(top)" width="\(pw)" height="\(ph)" fill="none" stroke="#333"/>

            """
        // Ticks and grid.
        let xTicks: [Double] = logX ? stride(from: xMin, through: xMax, by: 1).map { $0 } : niceTicks(xMin, xMax)
        for t in xTicks {
            let x = left + (t - xMin) / (xMax - xMin) * pw
            let label = logX ? fmt(pow(10, t)) : fmt(t)
            out += "<line x1=\"\(x)\" y1=\"\(top)\" x2=\"\(x)\" y2=\"\(top + ph)\" stroke=\"#ddd\"/>"
            out += "<text x=\"\(x)\" y=\"\(top + ph + 16)\" text-anchor=\"middle\">\(label)</text>\n"
        }
        for t in niceTicks(yMin, yMax) {
            let y = py(t)
            out += "<line x1=\"\(left)\" y1=\"\(y)\" x2=\"\(left + pw)\" y2=\"\(y)\" stroke=\"#ddd\"/>"
            out += "<text x=\"\(left - 6)\" y=\"\(y + 4)\" text-anchor=\"end\">\(fmt(t))</text>\n"
        }
        out += "<text x=\"\(left + pw / 2)\" y=\"\(height - 14)\" text-anchor=\"middle\">\(esc(xLabel))</text>\n"
        out += "<text transform=\"translate(18,\(top + ph / 2)) rotate(-90)\" text-anchor=\"middle\">\(esc(yLabel))</text>\n"
        for (x, label) in markers {
            let mx = px(x)
            out += "<line x1=\"\(mx)\" y1=\"\(top)\" x2=\"\(mx)\" y2=\"\(top + ph)\" stroke=\"#555\" stroke-dasharray=\"4,3\"/>"
            out += "<text x=\"\(mx + 4)\" y=\"\(top + 14)\">\(esc(label))</text>\n"
        }
        for (i, s) in series.enumerated() {
            let color = Self.palette[i % Self.palette.count]
            let pts = s.points.filter { !logX || $0.0 > 0 }.map { "\(px($0.0)),\(py($0.1))" }.joined(separator: " ")
            out += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"\(s.dashed ? " stroke-dasharray=\"6,4\"" : "") points=\"\(pts)\"/>\n"
            let ly = top + 10 + Double(i) * 20
            out += "<line x1=\"\(left + pw + 12)\" y1=\"\(ly)\" x2=\"\(left + pw + 36)\" y2=\"\(ly)\" stroke=\"\(color)\" stroke-width=\"2\"\(s.dashed ? " stroke-dasharray=\"6,4\"" : "")/>"
            out += "<text x=\"\(left + pw + 42)\" y=\"\(ly + 4)\">\(esc(s.name))</text>\n"
        }
        return out + "</svg>\n"
    }

    private func niceTicks(_ lo: Double, _ hi: Double) -> [Double] {
        let span = hi - lo
        let raw = span / 6
        let mag = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? raw
        var t = ceil(lo / step) * step
        var out: [Double] = []
        while t <= hi + step * 1e-9 { out.append(t); t += step }
        return out
    }

    private func fmt(_ v: Double) -> String {
        let a = abs(v)
        if a < 1e-9 { return "0" }
        if a >= 1e9 { return String(format: "%.1fG", v / 1e9) }
        if a >= 1e6 { return String(format: "%.1fM", v / 1e6) }
        if a >= 1e4 { return String(format: "%.0fk", v / 1e3) }
        if a >= 100 || v == v.rounded() { return String(format: "%.0f", v) }
        return String(format: "%.2g", v)
    }

    private func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
