// Runs each kernel of expert_kernels.metal over its whole grid on the CPU, one call per thread
// position (plus positions past the edge, which each kernel must ignore), as the GPU would dispatch it.
// Built and driven by tests/test_metal_kernels.py.
#include KERNELS

extern "C" void run_matmul_dense(const float* x, const float* w, float* y, MatmulParams p) {
    for (uint r = 0; r < p.rows + 1; ++r)
        for (uint n = 0; n < p.out_dim + 3; ++n) matmul_dense(x, w, y, p, uint2{n, r});
}

extern "C" void run_matmul_affine(const float* x, const uint* words, const float* scales, const float* biases, float* y,
                                  MatmulParams p) {
    for (uint r = 0; r < p.rows + 1; ++r)
        for (uint n = 0; n < p.out_dim + 3; ++n) matmul_affine(x, words, scales, biases, y, p, uint2{n, r});
}

extern "C" void run_silu_multiply(float* gate, const float* up, uint count) {
    for (uint i = 0; i < count + 5; ++i) silu_multiply(gate, up, count, i);
}
