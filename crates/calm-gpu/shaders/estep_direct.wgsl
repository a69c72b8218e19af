// E-step, direct variant for adapters where workgroup memory and barriers are slow (software
// rasterisers such as lavapipe/llvmpipe run each workgroup on one CPU thread, and every barrier
// is a coroutine switch): the same formula as estep.wgsl,
//
//   L[n,k,h,w] = sum_{c,i,j} theta[k,c,i,j] * Xpad[n,c,h+i,w+j] + bias[k],
//
// with each thread computing RM consecutive positions x RN consecutive kernels straight from
// device memory: per reduction step RM patch values, RN/4 vec4 of theta_t, RM*RN FMAs.
//
// Shapes: x (images, C, Hp, Wp); theta_t (R, KP); bias (K); off (R); l (n_images, K, P).
// Threads: x over position blocks, y over kernel blocks.

const RM: u32 = 8u;
const RN: u32 = 8u;
const RN4: u32 = RN / 4u;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> theta_t: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> off: array<u32>;
@group(0) @binding(5) var<storage, read_write> l: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let mtot = prm.n_images * prm.positions;
    let m0 = gid.x * RM;
    let k0 = gid.y * RN;
    let kp = kpad();
    if (m0 >= mtot || k0 >= kp) {
        return;
    }
    var base: array<u32, RM>;
    for (var i = 0u; i < RM; i++) {
        base[i] = patch_base(min(m0 + i, mtot - 1u));
    }
    var acc: array<vec4<f32>, RM * RN4>;
    for (var r = 0u; r < prm.r; r++) {
        let o = off[r];
        var b: array<vec4<f32>, RN4>;
        for (var q = 0u; q < RN4; q++) {
            b[q] = theta_t[(r * kp + k0) / 4u + q];
        }
        for (var i = 0u; i < RM; i++) {
            let a = x[base[i] + o];
            for (var q = 0u; q < RN4; q++) {
                acc[i * RN4 + q] = fma(vec4<f32>(a), b[q], acc[i * RN4 + q]);
            }
        }
    }
    for (var i = 0u; i < RM; i++) {
        let m = m0 + i;
        if (m < mtot) {
            let n = m / prm.positions;
            let p = m - n * prm.positions;
            for (var j = 0u; j < RN; j++) {
                let k = k0 + j;
                if (k < prm.k) {
                    l[(n * prm.k + k) * prm.positions + p] = acc[i * RN4 + j / 4u][j % 4u] + bias[k];
                }
            }
        }
    }
}
