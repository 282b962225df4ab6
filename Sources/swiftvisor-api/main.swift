import SwiftvisorCLI

// swiftvisor-api: the whole command set of swiftvisor, with the commands that need the
// operator API's libraries carried out here (swiftvisor hands them over by exec).
OperatorCommands.implementation = OperatorAPIImplementation()
Swiftvisor.main()
