// TYPE-CHECK STUB, not UniformTypeIdentifiers.
public struct UTType: Sendable { public static let folder = UTType() }
