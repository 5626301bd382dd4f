// TYPE-CHECK STUB, not SwiftUI: the part of SwiftUI's API the app uses, transcribed from Apple's
// documentation, with no implementation (every body is a placeholder). A type-check against it finds
// errors in our Swift (names, types, optionals, isolation, calls into the FlashmeshNode library, which is
// real), not differences between this transcription and the real SwiftUI.
import Foundation
@_exported import Observation
import UniformTypeIdentifiers

@MainActor @preconcurrency public protocol View {
    associatedtype Body: View
    @ViewBuilder var body: Body { get }
}
extension Never: View { public var body: Never { fatalError() } }
public struct EmptyView: View { nonisolated public init() {}; public var body: Never { fatalError() } }
public struct TupleView<T>: View { public var body: Never { fatalError() } }
public struct ModifiedView: View { public var body: Never { fatalError() } }
public struct ConditionalView<A, B>: View { public var body: Never { fatalError() } }
public struct OptionalView<A>: View { public var body: Never { fatalError() } }

@resultBuilder public enum ViewBuilder {
    public static func buildExpression<V: View>(_ v: V) -> V { v }
    public static func buildBlock() -> EmptyView { EmptyView() }
    public static func buildBlock<V: View>(_ v: V) -> V { v }
    public static func buildBlock<each V: View>(_ v: repeat each V) -> TupleView<(repeat each V)> { TupleView() }
    public static func buildIf<V: View>(_ v: V?) -> OptionalView<V> { OptionalView() }
    public static func buildEither<A: View, B: View>(first: A) -> ConditionalView<A, B> { ConditionalView() }
    public static func buildEither<A: View, B: View>(second: B) -> ConditionalView<A, B> { ConditionalView() }
}

@MainActor @preconcurrency public protocol Scene { associatedtype Body: Scene; var body: Body { get } }
extension Never: Scene {}
@resultBuilder public enum SceneBuilder { public static func buildBlock<S: Scene>(_ s: S) -> S { s } }
@MainActor @preconcurrency public protocol App {
    associatedtype Body: Scene
    @SceneBuilder var body: Body { get }
    init()
}
extension App { @MainActor public static func main() {} }
public struct WindowGroup<Content: View>: Scene {
    public init(@ViewBuilder content: () -> Content) {}
    public var body: Never { fatalError() }
}

@propertyWrapper @dynamicMemberLookup public struct Binding<Value> {
    public init(get: @escaping () -> Value, set: @escaping (Value) -> Void) { fatalError() }
    public var wrappedValue: Value { get { fatalError() } nonmutating set {} }
    public var projectedValue: Binding<Value> { self }
    public subscript<T>(dynamicMember key: WritableKeyPath<Value, T>) -> Binding<T> { fatalError() }
}
@propertyWrapper public struct State<Value> {
    public init(wrappedValue: Value) {}
    public var wrappedValue: Value { get { fatalError() } nonmutating set {} }
    public var projectedValue: Binding<Value> { fatalError() }
}
@propertyWrapper @dynamicMemberLookup public struct Bindable<Value: AnyObject & Observable> {
    public init(wrappedValue: Value) {}
    public var wrappedValue: Value { fatalError() }
    public var projectedValue: Bindable<Value> { self }
    public subscript<T>(dynamicMember key: ReferenceWritableKeyPath<Value, T>) -> Binding<T> { fatalError() }
}
public enum ScenePhase: Sendable, Equatable { case background, inactive, active }
public struct EnvironmentValues { public var scenePhase: ScenePhase { .active } }
@propertyWrapper public struct Environment<Value> {
    public init(_ key: KeyPath<EnvironmentValues, Value>) {}
    public var wrappedValue: Value { fatalError() }
}

public struct Font: Sendable {
    public static let body = Font(), footnote = Font()
    public func monospaced() -> Font { self }
}
public protocol ShapeStyle {}
public struct Color: ShapeStyle, Sendable { public static let orange = Color() }
extension ShapeStyle where Self == Color { public static var orange: Color { .orange } }
public struct ButtonRole: Sendable { public static let destructive = ButtonRole() }
public struct TextInputAutocapitalization: Sendable { public static let never = TextInputAutocapitalization() }

extension View {
    public func onChange<V: Equatable>(of value: V, _ action: @escaping (V, V) -> Void) -> ModifiedView { ModifiedView() }
    public func fileImporter(
        isPresented: Binding<Bool>, allowedContentTypes: [UTType], onCompletion: @escaping (Result<URL, any Error>) -> Void
    ) -> ModifiedView { ModifiedView() }
    public func navigationTitle(_ title: String) -> ModifiedView { ModifiedView() }
    public func disabled(_ disabled: Bool) -> ModifiedView { ModifiedView() }
    public func textInputAutocapitalization(_ a: TextInputAutocapitalization?) -> ModifiedView { ModifiedView() }
    public func autocorrectionDisabled(_ disable: Bool = true) -> ModifiedView { ModifiedView() }
    public func font(_ font: Font?) -> ModifiedView { ModifiedView() }
    public func foregroundStyle<S: ShapeStyle>(_ style: S) -> ModifiedView { ModifiedView() }
}

public struct Text: View {
    public init(_ content: String) {}
    public var body: Never { fatalError() }
}
public struct NavigationStack<Root: View>: View {
    public init(@ViewBuilder root: () -> Root) {}
    public var body: Never { fatalError() }
}
public struct Form<Content: View>: View {
    public init(@ViewBuilder content: () -> Content) {}
    public var body: Never { fatalError() }
}
public struct Section<Parent: View, Content: View, Footer: View>: View {
    public init(@ViewBuilder content: () -> Content, @ViewBuilder header: () -> Parent, @ViewBuilder footer: () -> Footer) {}
    public var body: Never { fatalError() }
}
extension Section where Parent == Text, Footer == EmptyView {
    public init(_ title: String, @ViewBuilder content: () -> Content) {}
}
public struct ForEach<Data: RandomAccessCollection, ID: Hashable, Content: View>: View {
    public init(_ data: Data, id: KeyPath<Data.Element, ID>, @ViewBuilder content: @escaping (Data.Element) -> Content) {}
    public var body: Never { fatalError() }
}
public struct Button<Label: View>: View {
    public var body: Never { fatalError() }
}
extension Button where Label == Text {
    public init(_ title: String, action: @escaping @MainActor () -> Void) {}
    public init(_ title: String, role: ButtonRole?, action: @escaping @MainActor () -> Void) {}
}
public struct LabeledContent: View {
    public init(_ title: String, value: String) {}
    public var body: Never { fatalError() }
}
public struct Stepper: View {
    public init(_ title: String, value: Binding<Int>, in bounds: ClosedRange<Int>) {}
    public var body: Never { fatalError() }
}
public struct Slider: View {
    public init(value: Binding<Double>, in bounds: ClosedRange<Double>) {}
    public var body: Never { fatalError() }
}
public struct TextField: View {
    public init(_ title: String, text: Binding<String>) {}
    public var body: Never { fatalError() }
}
public struct HStack<Content: View>: View {
    public init(@ViewBuilder content: () -> Content) {}
    public var body: Never { fatalError() }
}
public struct Spacer: View { public init() {}; public var body: Never { fatalError() } }
public struct ProgressView: View {
    public init(_ title: String) {}
    public var body: Never { fatalError() }
}
