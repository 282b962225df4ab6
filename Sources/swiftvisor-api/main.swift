import SwiftvisorCLI

// swiftvisor-api: the whole command set of swiftvisor, with the commands that need the
// operator API's libraries or the attestation key carried out here (swiftvisor hands them
// over by exec).
OperatorCommands.implementation = OperatorAPIImplementation()
AttestationCommands.implementation = AttestationReports()
Swiftvisor.main()
