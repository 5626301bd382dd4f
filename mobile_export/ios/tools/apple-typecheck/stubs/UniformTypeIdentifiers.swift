// TYPE-CHECK STUB, not UniformTypeIdentifiers.
public struct UTType: Sendable {
    public static let folder = UTType(), data = UTType()
    public init?(filenameExtension: String, conformingTo supertype: UTType = .data) {}
    private init() {}
}
