// M-step statistics of one batch, as partial sums over chunks of images.
//
//   T[k, r]  = sum_{n,h,w} G[n,h,w,k] * Xpad[n, c, h+i, w+j],   r = (c, i, j) < R
//   T[k, R]  = sum_{n,h,w} G[n,h,w,k]                  (= B[k]: a column of ones)
//
// with G = exp(L - logp) from posterior.wgsl, i.e. the GEMM  T[K x (R+1)] = G^T[K x M] A[M x (R+1)]
// with A read from the padded images as in the E-step. The long
// reduction over M = n_images * P is split: workgroup (x, y, z) handles column tile x, kernel tile
// y and images [z * imgs_per_chunk, (z+1) * imgs_per_chunk) of the batch, and writes its partial
// sum to partials[z]; reduce_stats.wgsl adds the partials in a fixed order.
//
// Shapes: gpost (n_images, P, KP); x (images, C, Hp, Wp); off (R); pos_off (P), the
//         offset h * Wp + w of position p; partials (n_chunks, K, R + 1).
// Tiling: 16 x 16 threads, a TK x TR tile, each thread RK contiguous kernels x RR contiguous
// columns. Positions advance BK at a time within one image, so n is fixed per stage.

const WG: u32 = 16u;
const RK: u32 = {{RK}}u;
const RR: u32 = {{RR}}u;
const BK: u32 = {{BK}}u;
const TK: u32 = WG * RK;
const TR: u32 = WG * RR;
const TK4: u32 = TK / 4u;
const TR4: u32 = TR / 4u;

@group(0) @binding(1) var<storage, read> gpost: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> off: array<u32>;
@group(0) @binding(4) var<storage, read> pos_off: array<u32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;

var<workgroup> g_tile: array<vec4<f32>, BK * TK4>;   // [kk][k / 4]
var<workgroup> a_tile: array<vec4<f32>, BK * TR4>;   // [kk][r / 4]

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid3.x;
    let ty = lid3.y;
    let lid = ty * WG + tx;
    let c0 = wid.x * TR;
    let k0 = wid.y * TK;
    let r1 = prm.r + 1u;
    let n_begin = wid.z * prm.imgs_per_chunk;
    let n_end = min(n_begin + prm.imgs_per_chunk, prm.n_images);
    let kp = kpad();

    var acc: array<array<f32, RR>, RK>;
    for (var n = n_begin; n < n_end; n++) {
        let gbase = n * prm.positions;
        let xbase = (prm.x_offset + n) * prm.img_stride;
        for (var p0 = 0u; p0 < prm.positions; p0 += BK) {
            // G tile: BK positions x TK kernels, four kernels per vec4 (zero beyond K).
            for (var e = lid; e < BK * TK4; e += WG * WG) {
                let kk = e / TK4;
                let kq = e - kk * TK4;
                let p = p0 + kk;
                let k = k0 + kq * 4u;
                var v = vec4<f32>(0.0);
                if (p < prm.positions && k < kp) {
                    v = gpost[((gbase + p) * kp + k) / 4u];
                }
                g_tile[e] = v;
            }
            // A tile: BK positions x TR columns of patch values (column R is the constant 1).
            for (var e = lid; e < BK * TR4; e += WG * WG) {
                let kk = e / TR4;
                let cq = e - kk * TR4;
                let p = p0 + kk;
                var v = vec4<f32>(0.0);
                if (p < prm.positions) {
                    let pb = xbase + pos_off[p];
                    for (var q = 0u; q < 4u; q++) {
                        let r = c0 + cq * 4u + q;
                        if (r < prm.r) {
                            v[q] = x[pb + off[r]];
                        } else if (r == prm.r) {
                            v[q] = 1.0;
                        }
                    }
                }
                a_tile[e] = v;
            }
            workgroupBarrier();

            for (var kk = 0u; kk < BK; kk++) {
                var g: array<f32, RK>;
                var a: array<f32, RR>;
                for (var q = 0u; q < RK / 4u; q++) {
                    let v = g_tile[kk * TK4 + ty * (RK / 4u) + q];
                    g[q * 4u] = v.x;
                    g[q * 4u + 1u] = v.y;
                    g[q * 4u + 2u] = v.z;
                    g[q * 4u + 3u] = v.w;
                }
                for (var q = 0u; q < RR / 4u; q++) {
                    let v = a_tile[kk * TR4 + tx * (RR / 4u) + q];
                    a[q * 4u] = v.x;
                    a[q * 4u + 1u] = v.y;
                    a[q * 4u + 2u] = v.z;
                    a[q * 4u + 3u] = v.w;
                }
                for (var i = 0u; i < RK; i++) {
                    for (var j = 0u; j < RR; j++) {
                        acc[i][j] = fma(g[i], a[j], acc[i][j]);
                    }
                }
            }
            workgroupBarrier();
        }
    }

    let pbase = wid.z * prm.k * r1;
    for (var i = 0u; i < RK; i++) {
        let k = k0 + ty * RK + i;
        if (k < prm.k) {
            for (var j = 0u; j < RR; j++) {
                let r = c0 + tx * RR + j;
                if (r < r1) {
                    partials[pbase + k * r1 + r] = acc[i][j];
                }
            }
        }
    }
}
