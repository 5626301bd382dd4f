#if canImport(Accelerate)
import Accelerate  // Apple platforms (not built on these machines)
#elseif canImport(COpenBLAS)
import COpenBLAS  // Debian's OpenBLAS
#endif

/// Single-precision matrix products through the platform's BLAS.
enum BLAS {
    /// C [m, n] = A [m, k] x B [n, k]^T, all row-major and contiguous.
    static func multiplyTransposed(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, m: Int, n: Int, k: Int, into c: UnsafeMutablePointer<Float>
    ) {
        #if canImport(Accelerate) || canImport(COpenBLAS)
        cblas_sgemm(
            CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(k), 0, c,
            Int32(n))
        #else
        for i in 0..<m {
            for j in 0..<n {
                var sum: Float = 0
                for p in 0..<k { sum += a[i * k + p] * b[j * k + p] }
                c[i * n + j] = sum
            }
        }
        #endif
    }
}
