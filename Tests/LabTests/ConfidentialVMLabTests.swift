import Foundation
import Testing
@testable import Lab
import VirtCore
import VMM

@Suite struct ConfidentialVMLabTests {
    @Test func theLabShowsCiphertextStillEnforcedPermissionsAndEveryAttackDetectedOnlyWithTheReverseMap() throws {
        var lab = ConfidentialVMLab()
        lab.walkPages = 1200
        let r = try lab.run()
        let byMode = Dictionary(uniqueKeysWithValues: r.hostView.map { ($0.mode, $0) })
        #expect(byMode["none"]?.patternFoundInPrivatePages == true)
        for m in ["sev", "snp"] {
            let h = try #require(byMode[m])
            #expect(!h.patternFoundInPrivatePages && !h.patternFoundElsewhere && h.patternFoundInSharedPage)
            #expect(h.privateEntropy > 7.9 && h.sharedEntropy < 4)
        }
        #expect(r.permissions.count == 6)
        for p in r.permissions {
            #expect(p.faults > 0, "\(p)")
            #expect(p.guestResult == "data intact", "\(p)")
            #expect(p.patternSeenByVMM == (p.mode == "none"), "\(p)")
        }
        #expect(r.attacks.count == 8)
        for a in r.attacks {
            #expect(a.detected == (a.mode == "snp"), "\(a)")
            #expect(a.guestResult == (a.mode == "snp" ? "#VC raised (reverse-map violation)" : "computed on altered data"), "\(a)")
        }
        #expect(r.cost.count == 6)
        #expect(r.cost.allSatisfy { $0.instructions > 0 && $0.pageWalks > 0 })
        #expect(r.cost.filter { $0.mode != "none" }.allSatisfy { $0.decryptions > 0 })
        let table = ConfidentialVMLab.table(r).text
        #expect(table.contains("DETECTED") && table.contains("not detected"))
        let encoded = try JSONEncoder().encode(r)
        #expect(try JSONDecoder().decode(ConfidentialVMLab.Result.self, from: encoded).attacks.count == 8)
        #expect(ConfidentialVMLab.chart(r).svg.contains("<svg"))
    }
}
