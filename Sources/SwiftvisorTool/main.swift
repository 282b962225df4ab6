import SwiftvisorCLI

// swiftvisor: every command; those that need the operator API's libraries are handed over to
// swiftvisor-api, built beside it (OperatorCommands.swift), so this binary stays small.
Swiftvisor.main()
