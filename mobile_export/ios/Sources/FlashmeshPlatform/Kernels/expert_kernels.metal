// SwiGLU experts on the GPU, on the weights as the node's cache holds them (no copy, no expansion):
// fp32 matrices, or MLX's affine layout (uint32 words, first value in the lowest bits; fp32 scales and
// biases per group of `group_size` values along a row: w = scale * q + bias). Loaded as source by
// MetalExpertCompute; tools/metal-emulation compiles this same file as C++ to check its arithmetic.
#include <metal_stdlib>
using namespace metal;

struct MatmulParams {
    uint rows;        // rows of x and y
    uint out_dim;     // N: rows of the weight matrix
    uint in_dim;      // K: its columns
    uint bits;        // 2, 4 or 8 (affine); unused by matmul_dense
    uint group_size;  // affine group length along K
};

// y [rows, N] = x [rows, K] @ W^T, W fp32 [N, K]; one thread per (n, row).
kernel void matmul_dense(device const float* x [[buffer(0)]],
                         device const float* w [[buffer(1)]],
                         device float* y [[buffer(2)]],
                         constant MatmulParams& p [[buffer(3)]],
                         uint2 gid [[thread_position_in_grid]]) {
    if (gid.x >= p.out_dim || gid.y >= p.rows) return;
    device const float* xr = x + gid.y * p.in_dim;
    device const float* wr = w + gid.x * p.in_dim;
    float acc = 0.0f;
    for (uint k = 0; k < p.in_dim; ++k) acc += xr[k] * wr[k];
    y[gid.y * p.out_dim + gid.x] = acc;
}

// The same with W affine: words [N, K * bits / 32], scales and biases [N, K / group_size].
kernel void matmul_affine(device const float* x [[buffer(0)]],
                          device const uint* words [[buffer(1)]],
                          device const float* scales [[buffer(2)]],
                          device const float* biases [[buffer(3)]],
                          device float* y [[buffer(4)]],
                          constant MatmulParams& p [[buffer(5)]],
                          uint2 gid [[thread_position_in_grid]]) {
    if (gid.x >= p.out_dim || gid.y >= p.rows) return;
    const uint per_word = 32 / p.bits;
    const uint mask = (1u << p.bits) - 1u;
    const uint groups = p.in_dim / p.group_size;
    device const float* xr = x + gid.y * p.in_dim;
    device const uint* wr = words + gid.x * (p.in_dim / per_word);
    device const float* sr = scales + gid.x * groups;
    device const float* br = biases + gid.x * groups;
    float acc = 0.0f;
    for (uint word = 0; word < p.in_dim / per_word; ++word) {
        const uint packed = wr[word];
        for (uint j = 0; j < per_word; ++j) {
            const uint k = word * per_word + j;
            const uint g = k / p.group_size;
            const float w = sr[g] * float((packed >> (j * p.bits)) & mask) + br[g];
            acc += xr[k] * w;
        }
    }
    y[gid.y * p.out_dim + gid.x] = acc;
}

// gate [count] <- silu(gate) * up, in place: the SwiGLU activation between up/gate and down.
kernel void silu_multiply(device float* gate [[buffer(0)]],
                          device const float* up [[buffer(1)]],
                          constant uint& count [[buffer(2)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= count) return;
    const float a = gate[i];
    gate[i] = a * (1.0f / (1.0f + exp(-a))) * up[i];
}
