import Foundation

/// Zipf sampler over 0..<n (Gray et al., as in YCSB): O(1) set-up, O(1) draws.
struct Zipf: Sendable {
    let n: Int, theta: Double, alpha: Double, zetan: Double, eta: Double
    init(n: Int, theta: Double = 0.99) {
        let theta = min(max(theta, 0.01), 0.999)  // the generator needs 0 < theta < 1
        self.n = n
        self.theta = theta
        // zeta(n): the first terms exactly, the tail by its integral (Euler-Maclaurin
        // midpoint), so set-up is O(1) even for millions of keys: a resume must not wait.
        var z = 0.0
        let exact = min(max(n, 1), 1000)
        for i in 1...exact { z += 1 / pow(Double(i), theta) }
        if n > exact { z += (pow(Double(n) + 0.5, 1 - theta) - pow(Double(exact) + 0.5, 1 - theta)) / (1 - theta) }
        zetan = z
        let zeta2 = 1 + 1 / pow(2, theta)
        alpha = 1 / (1 - theta)
        eta = (1 - pow(2 / Double(n), 1 - theta)) / (1 - zeta2 / zetan)
    }
    func next(_ u: Double) -> Int {
        let uz = u * zetan
        if uz < 1 { return 0 }
        if uz < 1 + pow(0.5, theta) { return 1 }
        return min(n - 1, Int(Double(n) * pow(eta * u - eta + 1, alpha)))
    }
}
