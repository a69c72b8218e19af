// M-step statistics, direct variant for adapters where workgroup memory is slow (see
// estep_direct.wgsl). The same formula and output as mstep.wgsl:
//
//   partials[z, k, r] = sum over the images of chunk z, positions p of  G[n,p,k] * A[n,p,r]
//   with A[n,p,r] = Xpad[n, c, h+i, w+j] for r = (c,i,j) < R, A[n,p,R] = 1 (so column R is B[k]).
//
// Each thread computes RR consecutive columns x RK consecutive kernels over its chunk: per
// position RR patch values, RK/4 vec4 of posteriors, RR*RK FMAs.
//
// Shapes: gpost (n_images, P, KP); x (images, C, Hp, Wp); off (R); pos_off (P);
//         partials (n_chunks, K, R + 1). Threads: x over (column block, kernel block), z over chunks.

const RR: u32 = 8u;
const RK: u32 = 8u;
const RK4: u32 = RK / 4u;

@group(0) @binding(1) var<storage, read> gpost: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> off: array<u32>;
@group(0) @binding(4) var<storage, read> pos_off: array<u32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let r1 = prm.r + 1u;
    let kp = kpad();
    let col_blocks = (r1 + RR - 1u) / RR;
    let k_blocks = kp / RK;
    if (gid.x >= col_blocks * k_blocks) {
        return;
    }
    let c0 = (gid.x % col_blocks) * RR;
    let k0 = (gid.x / col_blocks) * RK;
    var o: array<u32, RR>;
    for (var j = 0u; j < RR; j++) {
        o[j] = off[min(c0 + j, prm.r - 1u)];
    }
    let n_begin = wid.z * prm.imgs_per_chunk;
    let n_end = min(n_begin + prm.imgs_per_chunk, prm.n_images);
    var acc: array<vec4<f32>, RR * RK4>;
    for (var n = n_begin; n < n_end; n++) {
        let xbase = (prm.x_offset + n) * prm.img_stride;
        for (var p = 0u; p < prm.positions; p++) {
            let pb = xbase + pos_off[p];
            var g: array<vec4<f32>, RK4>;
            for (var q = 0u; q < RK4; q++) {
                g[q] = gpost[((n * prm.positions + p) * kp + k0) / 4u + q];
            }
            for (var j = 0u; j < RR; j++) {
                var a = 0.0;
                if (c0 + j < prm.r) {
                    a = x[pb + o[j]];
                } else if (c0 + j == prm.r) {
                    a = 1.0;
                }
                for (var q = 0u; q < RK4; q++) {
                    acc[j * RK4 + q] = fma(vec4<f32>(a), g[q], acc[j * RK4 + q]);
                }
            }
        }
    }
    let pbase = wid.z * prm.k * r1;
    for (var j = 0u; j < RR; j++) {
        let r = c0 + j;
        if (r < r1) {
            for (var i = 0u; i < RK; i++) {
                let k = k0 + i;
                if (k < prm.k) {
                    partials[pbase + k * r1 + r] = acc[j * RK4 + i / 4u][i % 4u];
                }
            }
        }
    }
}
