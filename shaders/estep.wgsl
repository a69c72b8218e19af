// E-step: the convolution with bias, one batch.
//
//   L[n,k,h,w] = sum_{c,i,j} theta[k,c,i,j] * Xpad[n,c,h+i,w+j] + bias[k],  bias[k] = -0.5 ||theta_k||^2
//
// computed as the implicit GEMM  L^T[m, k] = sum_r A[m, r] theta[k, r] + bias[k]  with
// m = (n, h, w) over the batch's n_images * P patch positions and r = (c, i, j) over R = C*w*w.
// A[m, r] = x[row_base(m) + off[r]] reads the patch straight from the padded image, where
// row_base(m) = (x_offset + n) * img_stride + h * Wp + w and off[r] = (c * Hp + i) * Wp + j:
// no im2col buffer and no division in the inner loop.
//
// Shapes: x (images of this data buffer, C, Hp, Wp); theta_t (R, KP), theta transposed with
//         rows padded by zeros to KP = kpad(); bias (K); off (R);
//         l (n_images, K, Ho*Wo), the layout of SPEC's L.
// Tiling: a workgroup of 16 x 16 threads computes a TM x TN tile (TM positions, TN kernels);
// each thread an RM x RN block (RM contiguous positions, RN contiguous kernels) held in registers.
// A and theta tiles of BK reduction steps are staged through workgroup memory as vec4.

const WG: u32 = 16u;
const RM: u32 = {{RM}}u;   // positions per thread, a multiple of 4
const RN: u32 = {{RN}}u;   // kernels per thread, a multiple of 4
const BK: u32 = {{BK}}u;   // reduction slice per stage
const TM: u32 = WG * RM;
const TN: u32 = WG * RN;
const TM4: u32 = TM / 4u;
const TN4: u32 = TN / 4u;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> theta_t: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> off: array<u32>;
@group(0) @binding(5) var<storage, read_write> l: array<f32>;

var<workgroup> a_tile: array<vec4<f32>, BK * TM4>;   // [kk][m / 4]
var<workgroup> b_tile: array<vec4<f32>, BK * TN4>;   // [kk][k / 4]
var<workgroup> row_base: array<u32, TM>;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid3.x;
    let ty = lid3.y;
    let lid = ty * WG + tx;
    let m0 = wid.x * TM;
    let n0 = wid.y * TN;
    let mtot = prm.n_images * prm.positions;
    let kp = kpad();

    // Where each of the tile's patches starts in x (the only divisions of the kernel).
    for (var i = lid; i < TM; i += WG * WG) {
        let m = m0 + i;
        var base = 0u;
        if (m < mtot) {
            let n = m / prm.positions;
            let p = m - n * prm.positions;
            let h = p / prm.wo;
            let w = p - h * prm.wo;
            base = (prm.x_offset + n) * prm.img_stride + h * prm.wp + w;
        }
        row_base[i] = base;
    }
    workgroupBarrier();

    var acc: array<array<f32, RN>, RM>;
    for (var r0 = 0u; r0 < prm.r; r0 += BK) {
        // A tile: BK x TM patch values, four consecutive positions per vec4.
        for (var e = lid; e < BK * TM4; e += WG * WG) {
            let kk = e / TM4;
            let mq = e - kk * TM4;
            let r = r0 + kk;
            var v = vec4<f32>(0.0);
            if (r < prm.r) {
                let o = off[r];
                for (var q = 0u; q < 4u; q++) {
                    let mm = mq * 4u + q;
                    if (m0 + mm < mtot) {
                        v[q] = x[row_base[mm] + o];
                    }
                }
            }
            a_tile[e] = v;
        }
        // theta tile: BK x TN, four consecutive kernels per vec4 (zero beyond K).
        for (var e = lid; e < BK * TN4; e += WG * WG) {
            let kk = e / TN4;
            let kq = e - kk * TN4;
            let r = r0 + kk;
            let k = n0 + kq * 4u;
            var v = vec4<f32>(0.0);
            if (r < prm.r && k < kp) {
                v = theta_t[(r * kp + k) / 4u];
            }
            b_tile[e] = v;
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, RM>;
            var b: array<f32, RN>;
            for (var q = 0u; q < RM / 4u; q++) {
                let v = a_tile[kk * TM4 + tx * (RM / 4u) + q];
                a[q * 4u] = v.x;
                a[q * 4u + 1u] = v.y;
                a[q * 4u + 2u] = v.z;
                a[q * 4u + 3u] = v.w;
            }
            for (var q = 0u; q < RN / 4u; q++) {
                let v = b_tile[kk * TN4 + ty * (RN / 4u) + q];
                b[q * 4u] = v.x;
                b[q * 4u + 1u] = v.y;
                b[q * 4u + 2u] = v.z;
                b[q * 4u + 3u] = v.w;
            }
            for (var i = 0u; i < RM; i++) {
                for (var j = 0u; j < RN; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < RM; i++) {
        let m = m0 + tx * RM + i;
        if (m < mtot) {
            let n = m / prm.positions;
            let p = m - n * prm.positions;
            for (var j = 0u; j < RN; j++) {
                let k = n0 + ty * RN + j;
                if (k < prm.k) {
                    l[(n * prm.k + k) * prm.positions + p] = acc[i][j] + bias[k];
                }
            }
        }
    }
}
