import Testing
@testable import Lab

@Suite struct LabWordingTests {
    /// A slowdown is worded as one: "1.82× slower", never "0.55× faster".
    @Test func speedRatiosReadTheRightWay() {
        #expect(ParavirtVsEmulatedLab.speedRatio(0.55) == "1.82× slower")
        #expect(ParavirtVsEmulatedLab.speedRatio(1.8) == "1.80× faster")
        #expect(ParavirtVsEmulatedLab.speedRatio(82.4) == "82.4× faster")
        #expect(ParavirtVsEmulatedLab.speedRatio(0.01) == "100.0× slower")
        #expect(ParavirtVsEmulatedLab.speedRatio(0) == "not comparable")
        #expect(!ParavirtVsEmulatedLab.speedRatio(0.9).contains("faster"))
    }
}
