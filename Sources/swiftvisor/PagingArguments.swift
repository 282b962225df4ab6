import ArgumentParser
import VirtCore

extension PagingMode: ExpressibleByArgument {}
extension SecondLevelPageSize: ExpressibleByArgument {}
