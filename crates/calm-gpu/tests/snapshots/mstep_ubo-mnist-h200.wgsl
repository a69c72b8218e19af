// M-step statistics, uniform-buffer variant for software adapters (see estep_ubo.wgsl): the
// same formula as mstep.wgsl,
//
//   partials[z, k, r] = sum over positions t = (n, p) of G[t, k] * A[t, r]
//   with A[t, r] = Xpad[n, c, h+i, w+j] for r = (c,i,j) < R, A[t, R] = 1 (so column R is B[k]),
//
// for one window of the batch's positions t in [lo, lo + rows), whose posteriors come from a
// uniform buffer; the window adds to partial sum `slot` (the first window of a slot writes it).
// The only storage loads of a step are the thread's RR patch values.
//
// Shapes: g_w: rows lo.. of G (n_images * P, KP); x (images, C, Hp, Wp); off (R);
//         partials (n_chunks, K, R + 1). Threads: MT per workgroup (one SIMD register of
// llvmpipe's, so that a block of columns wastes little: 401 columns take 416 slots with RR 4),
// RR consecutive columns each; workgroups x over column blocks, y over blocks of TK kernels.

const RR: u32 = 4u;   // columns per thread
const MT: u32 = 8u;   // threads per workgroup
const TK: u32 = 64u;   // kernels per workgroup, a multiple of 4
const TK4: u32 = TK / 4u;

struct Window {
    lo: u32,
    rows: u32,
    slot: u32,
    first: u32,
}

@group(0) @binding(1) var<uniform> g_w: array<vec4<f32>, 4096>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> off: array<u32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
@group(0) @binding(5) var<uniform> win: Window;

@compute @workgroup_size(MT, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let r1 = prm.r + 1u;
    let kp = kpad();
    let c0 = gid.x * RR;
    let k0 = wid.y * TK;
    // The thread's columns: patch offsets (clamped, so that every read is in bounds) and
    // whether a column is R, the column of ones.
    var o: array<u32, RR>;
    var ones: array<bool, RR>;
    for (var j = 0u; j < RR; j++) {
        o[j] = off[min(c0 + j, prm.r - 1u)];
        ones[j] = c0 + j == prm.r;
    }
    // The window's first position as (image, row, column), then stepped without divisions.
    let ho = prm.positions / prm.wo;
    var n = win.lo / prm.positions;
    let p = win.lo - n * prm.positions;
    var h = p / prm.wo;
    var w = p - h * prm.wo;
    // <generated acc_decl>
    var acc_0_0 = vec4<f32>(0.0);
    var acc_1_0 = vec4<f32>(0.0);
    var acc_2_0 = vec4<f32>(0.0);
    var acc_3_0 = vec4<f32>(0.0);
    var acc_0_1 = vec4<f32>(0.0);
    var acc_1_1 = vec4<f32>(0.0);
    var acc_2_1 = vec4<f32>(0.0);
    var acc_3_1 = vec4<f32>(0.0);
    var acc_0_2 = vec4<f32>(0.0);
    var acc_1_2 = vec4<f32>(0.0);
    var acc_2_2 = vec4<f32>(0.0);
    var acc_3_2 = vec4<f32>(0.0);
    var acc_0_3 = vec4<f32>(0.0);
    var acc_1_3 = vec4<f32>(0.0);
    var acc_2_3 = vec4<f32>(0.0);
    var acc_3_3 = vec4<f32>(0.0);
    var acc_0_4 = vec4<f32>(0.0);
    var acc_1_4 = vec4<f32>(0.0);
    var acc_2_4 = vec4<f32>(0.0);
    var acc_3_4 = vec4<f32>(0.0);
    var acc_0_5 = vec4<f32>(0.0);
    var acc_1_5 = vec4<f32>(0.0);
    var acc_2_5 = vec4<f32>(0.0);
    var acc_3_5 = vec4<f32>(0.0);
    var acc_0_6 = vec4<f32>(0.0);
    var acc_1_6 = vec4<f32>(0.0);
    var acc_2_6 = vec4<f32>(0.0);
    var acc_3_6 = vec4<f32>(0.0);
    var acc_0_7 = vec4<f32>(0.0);
    var acc_1_7 = vec4<f32>(0.0);
    var acc_2_7 = vec4<f32>(0.0);
    var acc_3_7 = vec4<f32>(0.0);
    var acc_0_8 = vec4<f32>(0.0);
    var acc_1_8 = vec4<f32>(0.0);
    var acc_2_8 = vec4<f32>(0.0);
    var acc_3_8 = vec4<f32>(0.0);
    var acc_0_9 = vec4<f32>(0.0);
    var acc_1_9 = vec4<f32>(0.0);
    var acc_2_9 = vec4<f32>(0.0);
    var acc_3_9 = vec4<f32>(0.0);
    var acc_0_10 = vec4<f32>(0.0);
    var acc_1_10 = vec4<f32>(0.0);
    var acc_2_10 = vec4<f32>(0.0);
    var acc_3_10 = vec4<f32>(0.0);
    var acc_0_11 = vec4<f32>(0.0);
    var acc_1_11 = vec4<f32>(0.0);
    var acc_2_11 = vec4<f32>(0.0);
    var acc_3_11 = vec4<f32>(0.0);
    var acc_0_12 = vec4<f32>(0.0);
    var acc_1_12 = vec4<f32>(0.0);
    var acc_2_12 = vec4<f32>(0.0);
    var acc_3_12 = vec4<f32>(0.0);
    var acc_0_13 = vec4<f32>(0.0);
    var acc_1_13 = vec4<f32>(0.0);
    var acc_2_13 = vec4<f32>(0.0);
    var acc_3_13 = vec4<f32>(0.0);
    var acc_0_14 = vec4<f32>(0.0);
    var acc_1_14 = vec4<f32>(0.0);
    var acc_2_14 = vec4<f32>(0.0);
    var acc_3_14 = vec4<f32>(0.0);
    var acc_0_15 = vec4<f32>(0.0);
    var acc_1_15 = vec4<f32>(0.0);
    var acc_2_15 = vec4<f32>(0.0);
    var acc_3_15 = vec4<f32>(0.0);
    // </generated acc_decl>
    for (var s = 0u; s < win.rows; s++) {
        let xb = (prm.x_offset + n) * prm.img_stride + h * prm.wp + w;
        let gb = (s * kp + k0) / 4u;
        // <generated fma>
        let a0 = vec4<f32>(select(x[xb + o[0]], 1.0, ones[0]));
        let a1 = vec4<f32>(select(x[xb + o[1]], 1.0, ones[1]));
        let a2 = vec4<f32>(select(x[xb + o[2]], 1.0, ones[2]));
        let a3 = vec4<f32>(select(x[xb + o[3]], 1.0, ones[3]));
        let t0 = g_w[gb + 0u];
        acc_0_0 = fma(a0, t0, acc_0_0);
        acc_1_0 = fma(a1, t0, acc_1_0);
        acc_2_0 = fma(a2, t0, acc_2_0);
        acc_3_0 = fma(a3, t0, acc_3_0);
        let t1 = g_w[gb + 1u];
        acc_0_1 = fma(a0, t1, acc_0_1);
        acc_1_1 = fma(a1, t1, acc_1_1);
        acc_2_1 = fma(a2, t1, acc_2_1);
        acc_3_1 = fma(a3, t1, acc_3_1);
        let t2 = g_w[gb + 2u];
        acc_0_2 = fma(a0, t2, acc_0_2);
        acc_1_2 = fma(a1, t2, acc_1_2);
        acc_2_2 = fma(a2, t2, acc_2_2);
        acc_3_2 = fma(a3, t2, acc_3_2);
        let t3 = g_w[gb + 3u];
        acc_0_3 = fma(a0, t3, acc_0_3);
        acc_1_3 = fma(a1, t3, acc_1_3);
        acc_2_3 = fma(a2, t3, acc_2_3);
        acc_3_3 = fma(a3, t3, acc_3_3);
        let t4 = g_w[gb + 4u];
        acc_0_4 = fma(a0, t4, acc_0_4);
        acc_1_4 = fma(a1, t4, acc_1_4);
        acc_2_4 = fma(a2, t4, acc_2_4);
        acc_3_4 = fma(a3, t4, acc_3_4);
        let t5 = g_w[gb + 5u];
        acc_0_5 = fma(a0, t5, acc_0_5);
        acc_1_5 = fma(a1, t5, acc_1_5);
        acc_2_5 = fma(a2, t5, acc_2_5);
        acc_3_5 = fma(a3, t5, acc_3_5);
        let t6 = g_w[gb + 6u];
        acc_0_6 = fma(a0, t6, acc_0_6);
        acc_1_6 = fma(a1, t6, acc_1_6);
        acc_2_6 = fma(a2, t6, acc_2_6);
        acc_3_6 = fma(a3, t6, acc_3_6);
        let t7 = g_w[gb + 7u];
        acc_0_7 = fma(a0, t7, acc_0_7);
        acc_1_7 = fma(a1, t7, acc_1_7);
        acc_2_7 = fma(a2, t7, acc_2_7);
        acc_3_7 = fma(a3, t7, acc_3_7);
        let t8 = g_w[gb + 8u];
        acc_0_8 = fma(a0, t8, acc_0_8);
        acc_1_8 = fma(a1, t8, acc_1_8);
        acc_2_8 = fma(a2, t8, acc_2_8);
        acc_3_8 = fma(a3, t8, acc_3_8);
        let t9 = g_w[gb + 9u];
        acc_0_9 = fma(a0, t9, acc_0_9);
        acc_1_9 = fma(a1, t9, acc_1_9);
        acc_2_9 = fma(a2, t9, acc_2_9);
        acc_3_9 = fma(a3, t9, acc_3_9);
        let t10 = g_w[gb + 10u];
        acc_0_10 = fma(a0, t10, acc_0_10);
        acc_1_10 = fma(a1, t10, acc_1_10);
        acc_2_10 = fma(a2, t10, acc_2_10);
        acc_3_10 = fma(a3, t10, acc_3_10);
        let t11 = g_w[gb + 11u];
        acc_0_11 = fma(a0, t11, acc_0_11);
        acc_1_11 = fma(a1, t11, acc_1_11);
        acc_2_11 = fma(a2, t11, acc_2_11);
        acc_3_11 = fma(a3, t11, acc_3_11);
        let t12 = g_w[gb + 12u];
        acc_0_12 = fma(a0, t12, acc_0_12);
        acc_1_12 = fma(a1, t12, acc_1_12);
        acc_2_12 = fma(a2, t12, acc_2_12);
        acc_3_12 = fma(a3, t12, acc_3_12);
        let t13 = g_w[gb + 13u];
        acc_0_13 = fma(a0, t13, acc_0_13);
        acc_1_13 = fma(a1, t13, acc_1_13);
        acc_2_13 = fma(a2, t13, acc_2_13);
        acc_3_13 = fma(a3, t13, acc_3_13);
        let t14 = g_w[gb + 14u];
        acc_0_14 = fma(a0, t14, acc_0_14);
        acc_1_14 = fma(a1, t14, acc_1_14);
        acc_2_14 = fma(a2, t14, acc_2_14);
        acc_3_14 = fma(a3, t14, acc_3_14);
        let t15 = g_w[gb + 15u];
        acc_0_15 = fma(a0, t15, acc_0_15);
        acc_1_15 = fma(a1, t15, acc_1_15);
        acc_2_15 = fma(a2, t15, acc_2_15);
        acc_3_15 = fma(a3, t15, acc_3_15);
        // </generated fma>
        w++;
        if (w == prm.wo) {
            w = 0u;
            h++;
            if (h == ho) {
                h = 0u;
                n++;
            }
        }
    }
    let pbase = win.slot * prm.k * r1;
    // <generated store>
    {
        let r = c0 + 0u;
        if (r < r1) {
            { let k = k0 + 0u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_0.x; } else { partials[pi] = partials[pi] + acc_0_0.x; } } }
            { let k = k0 + 1u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_0.y; } else { partials[pi] = partials[pi] + acc_0_0.y; } } }
            { let k = k0 + 2u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_0.z; } else { partials[pi] = partials[pi] + acc_0_0.z; } } }
            { let k = k0 + 3u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_0.w; } else { partials[pi] = partials[pi] + acc_0_0.w; } } }
            { let k = k0 + 4u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_1.x; } else { partials[pi] = partials[pi] + acc_0_1.x; } } }
            { let k = k0 + 5u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_1.y; } else { partials[pi] = partials[pi] + acc_0_1.y; } } }
            { let k = k0 + 6u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_1.z; } else { partials[pi] = partials[pi] + acc_0_1.z; } } }
            { let k = k0 + 7u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_1.w; } else { partials[pi] = partials[pi] + acc_0_1.w; } } }
            { let k = k0 + 8u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_2.x; } else { partials[pi] = partials[pi] + acc_0_2.x; } } }
            { let k = k0 + 9u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_2.y; } else { partials[pi] = partials[pi] + acc_0_2.y; } } }
            { let k = k0 + 10u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_2.z; } else { partials[pi] = partials[pi] + acc_0_2.z; } } }
            { let k = k0 + 11u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_2.w; } else { partials[pi] = partials[pi] + acc_0_2.w; } } }
            { let k = k0 + 12u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_3.x; } else { partials[pi] = partials[pi] + acc_0_3.x; } } }
            { let k = k0 + 13u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_3.y; } else { partials[pi] = partials[pi] + acc_0_3.y; } } }
            { let k = k0 + 14u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_3.z; } else { partials[pi] = partials[pi] + acc_0_3.z; } } }
            { let k = k0 + 15u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_3.w; } else { partials[pi] = partials[pi] + acc_0_3.w; } } }
            { let k = k0 + 16u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_4.x; } else { partials[pi] = partials[pi] + acc_0_4.x; } } }
            { let k = k0 + 17u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_4.y; } else { partials[pi] = partials[pi] + acc_0_4.y; } } }
            { let k = k0 + 18u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_4.z; } else { partials[pi] = partials[pi] + acc_0_4.z; } } }
            { let k = k0 + 19u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_4.w; } else { partials[pi] = partials[pi] + acc_0_4.w; } } }
            { let k = k0 + 20u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_5.x; } else { partials[pi] = partials[pi] + acc_0_5.x; } } }
            { let k = k0 + 21u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_5.y; } else { partials[pi] = partials[pi] + acc_0_5.y; } } }
            { let k = k0 + 22u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_5.z; } else { partials[pi] = partials[pi] + acc_0_5.z; } } }
            { let k = k0 + 23u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_5.w; } else { partials[pi] = partials[pi] + acc_0_5.w; } } }
            { let k = k0 + 24u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_6.x; } else { partials[pi] = partials[pi] + acc_0_6.x; } } }
            { let k = k0 + 25u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_6.y; } else { partials[pi] = partials[pi] + acc_0_6.y; } } }
            { let k = k0 + 26u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_6.z; } else { partials[pi] = partials[pi] + acc_0_6.z; } } }
            { let k = k0 + 27u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_6.w; } else { partials[pi] = partials[pi] + acc_0_6.w; } } }
            { let k = k0 + 28u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_7.x; } else { partials[pi] = partials[pi] + acc_0_7.x; } } }
            { let k = k0 + 29u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_7.y; } else { partials[pi] = partials[pi] + acc_0_7.y; } } }
            { let k = k0 + 30u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_7.z; } else { partials[pi] = partials[pi] + acc_0_7.z; } } }
            { let k = k0 + 31u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_7.w; } else { partials[pi] = partials[pi] + acc_0_7.w; } } }
            { let k = k0 + 32u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_8.x; } else { partials[pi] = partials[pi] + acc_0_8.x; } } }
            { let k = k0 + 33u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_8.y; } else { partials[pi] = partials[pi] + acc_0_8.y; } } }
            { let k = k0 + 34u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_8.z; } else { partials[pi] = partials[pi] + acc_0_8.z; } } }
            { let k = k0 + 35u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_8.w; } else { partials[pi] = partials[pi] + acc_0_8.w; } } }
            { let k = k0 + 36u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_9.x; } else { partials[pi] = partials[pi] + acc_0_9.x; } } }
            { let k = k0 + 37u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_9.y; } else { partials[pi] = partials[pi] + acc_0_9.y; } } }
            { let k = k0 + 38u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_9.z; } else { partials[pi] = partials[pi] + acc_0_9.z; } } }
            { let k = k0 + 39u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_9.w; } else { partials[pi] = partials[pi] + acc_0_9.w; } } }
            { let k = k0 + 40u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_10.x; } else { partials[pi] = partials[pi] + acc_0_10.x; } } }
            { let k = k0 + 41u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_10.y; } else { partials[pi] = partials[pi] + acc_0_10.y; } } }
            { let k = k0 + 42u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_10.z; } else { partials[pi] = partials[pi] + acc_0_10.z; } } }
            { let k = k0 + 43u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_10.w; } else { partials[pi] = partials[pi] + acc_0_10.w; } } }
            { let k = k0 + 44u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_11.x; } else { partials[pi] = partials[pi] + acc_0_11.x; } } }
            { let k = k0 + 45u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_11.y; } else { partials[pi] = partials[pi] + acc_0_11.y; } } }
            { let k = k0 + 46u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_11.z; } else { partials[pi] = partials[pi] + acc_0_11.z; } } }
            { let k = k0 + 47u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_11.w; } else { partials[pi] = partials[pi] + acc_0_11.w; } } }
            { let k = k0 + 48u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_12.x; } else { partials[pi] = partials[pi] + acc_0_12.x; } } }
            { let k = k0 + 49u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_12.y; } else { partials[pi] = partials[pi] + acc_0_12.y; } } }
            { let k = k0 + 50u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_12.z; } else { partials[pi] = partials[pi] + acc_0_12.z; } } }
            { let k = k0 + 51u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_12.w; } else { partials[pi] = partials[pi] + acc_0_12.w; } } }
            { let k = k0 + 52u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_13.x; } else { partials[pi] = partials[pi] + acc_0_13.x; } } }
            { let k = k0 + 53u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_13.y; } else { partials[pi] = partials[pi] + acc_0_13.y; } } }
            { let k = k0 + 54u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_13.z; } else { partials[pi] = partials[pi] + acc_0_13.z; } } }
            { let k = k0 + 55u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_13.w; } else { partials[pi] = partials[pi] + acc_0_13.w; } } }
            { let k = k0 + 56u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_14.x; } else { partials[pi] = partials[pi] + acc_0_14.x; } } }
            { let k = k0 + 57u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_14.y; } else { partials[pi] = partials[pi] + acc_0_14.y; } } }
            { let k = k0 + 58u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_14.z; } else { partials[pi] = partials[pi] + acc_0_14.z; } } }
            { let k = k0 + 59u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_14.w; } else { partials[pi] = partials[pi] + acc_0_14.w; } } }
            { let k = k0 + 60u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_15.x; } else { partials[pi] = partials[pi] + acc_0_15.x; } } }
            { let k = k0 + 61u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_15.y; } else { partials[pi] = partials[pi] + acc_0_15.y; } } }
            { let k = k0 + 62u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_15.z; } else { partials[pi] = partials[pi] + acc_0_15.z; } } }
            { let k = k0 + 63u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_0_15.w; } else { partials[pi] = partials[pi] + acc_0_15.w; } } }
        }
    }
    {
        let r = c0 + 1u;
        if (r < r1) {
            { let k = k0 + 0u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_0.x; } else { partials[pi] = partials[pi] + acc_1_0.x; } } }
            { let k = k0 + 1u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_0.y; } else { partials[pi] = partials[pi] + acc_1_0.y; } } }
            { let k = k0 + 2u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_0.z; } else { partials[pi] = partials[pi] + acc_1_0.z; } } }
            { let k = k0 + 3u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_0.w; } else { partials[pi] = partials[pi] + acc_1_0.w; } } }
            { let k = k0 + 4u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_1.x; } else { partials[pi] = partials[pi] + acc_1_1.x; } } }
            { let k = k0 + 5u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_1.y; } else { partials[pi] = partials[pi] + acc_1_1.y; } } }
            { let k = k0 + 6u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_1.z; } else { partials[pi] = partials[pi] + acc_1_1.z; } } }
            { let k = k0 + 7u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_1.w; } else { partials[pi] = partials[pi] + acc_1_1.w; } } }
            { let k = k0 + 8u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_2.x; } else { partials[pi] = partials[pi] + acc_1_2.x; } } }
            { let k = k0 + 9u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_2.y; } else { partials[pi] = partials[pi] + acc_1_2.y; } } }
            { let k = k0 + 10u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_2.z; } else { partials[pi] = partials[pi] + acc_1_2.z; } } }
            { let k = k0 + 11u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_2.w; } else { partials[pi] = partials[pi] + acc_1_2.w; } } }
            { let k = k0 + 12u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_3.x; } else { partials[pi] = partials[pi] + acc_1_3.x; } } }
            { let k = k0 + 13u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_3.y; } else { partials[pi] = partials[pi] + acc_1_3.y; } } }
            { let k = k0 + 14u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_3.z; } else { partials[pi] = partials[pi] + acc_1_3.z; } } }
            { let k = k0 + 15u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_3.w; } else { partials[pi] = partials[pi] + acc_1_3.w; } } }
            { let k = k0 + 16u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_4.x; } else { partials[pi] = partials[pi] + acc_1_4.x; } } }
            { let k = k0 + 17u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_4.y; } else { partials[pi] = partials[pi] + acc_1_4.y; } } }
            { let k = k0 + 18u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_4.z; } else { partials[pi] = partials[pi] + acc_1_4.z; } } }
            { let k = k0 + 19u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_4.w; } else { partials[pi] = partials[pi] + acc_1_4.w; } } }
            { let k = k0 + 20u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_5.x; } else { partials[pi] = partials[pi] + acc_1_5.x; } } }
            { let k = k0 + 21u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_5.y; } else { partials[pi] = partials[pi] + acc_1_5.y; } } }
            { let k = k0 + 22u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_5.z; } else { partials[pi] = partials[pi] + acc_1_5.z; } } }
            { let k = k0 + 23u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_5.w; } else { partials[pi] = partials[pi] + acc_1_5.w; } } }
            { let k = k0 + 24u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_6.x; } else { partials[pi] = partials[pi] + acc_1_6.x; } } }
            { let k = k0 + 25u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_6.y; } else { partials[pi] = partials[pi] + acc_1_6.y; } } }
            { let k = k0 + 26u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_6.z; } else { partials[pi] = partials[pi] + acc_1_6.z; } } }
            { let k = k0 + 27u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_6.w; } else { partials[pi] = partials[pi] + acc_1_6.w; } } }
            { let k = k0 + 28u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_7.x; } else { partials[pi] = partials[pi] + acc_1_7.x; } } }
            { let k = k0 + 29u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_7.y; } else { partials[pi] = partials[pi] + acc_1_7.y; } } }
            { let k = k0 + 30u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_7.z; } else { partials[pi] = partials[pi] + acc_1_7.z; } } }
            { let k = k0 + 31u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_7.w; } else { partials[pi] = partials[pi] + acc_1_7.w; } } }
            { let k = k0 + 32u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_8.x; } else { partials[pi] = partials[pi] + acc_1_8.x; } } }
            { let k = k0 + 33u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_8.y; } else { partials[pi] = partials[pi] + acc_1_8.y; } } }
            { let k = k0 + 34u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_8.z; } else { partials[pi] = partials[pi] + acc_1_8.z; } } }
            { let k = k0 + 35u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_8.w; } else { partials[pi] = partials[pi] + acc_1_8.w; } } }
            { let k = k0 + 36u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_9.x; } else { partials[pi] = partials[pi] + acc_1_9.x; } } }
            { let k = k0 + 37u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_9.y; } else { partials[pi] = partials[pi] + acc_1_9.y; } } }
            { let k = k0 + 38u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_9.z; } else { partials[pi] = partials[pi] + acc_1_9.z; } } }
            { let k = k0 + 39u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_9.w; } else { partials[pi] = partials[pi] + acc_1_9.w; } } }
            { let k = k0 + 40u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_10.x; } else { partials[pi] = partials[pi] + acc_1_10.x; } } }
            { let k = k0 + 41u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_10.y; } else { partials[pi] = partials[pi] + acc_1_10.y; } } }
            { let k = k0 + 42u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_10.z; } else { partials[pi] = partials[pi] + acc_1_10.z; } } }
            { let k = k0 + 43u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_10.w; } else { partials[pi] = partials[pi] + acc_1_10.w; } } }
            { let k = k0 + 44u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_11.x; } else { partials[pi] = partials[pi] + acc_1_11.x; } } }
            { let k = k0 + 45u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_11.y; } else { partials[pi] = partials[pi] + acc_1_11.y; } } }
            { let k = k0 + 46u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_11.z; } else { partials[pi] = partials[pi] + acc_1_11.z; } } }
            { let k = k0 + 47u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_11.w; } else { partials[pi] = partials[pi] + acc_1_11.w; } } }
            { let k = k0 + 48u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_12.x; } else { partials[pi] = partials[pi] + acc_1_12.x; } } }
            { let k = k0 + 49u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_12.y; } else { partials[pi] = partials[pi] + acc_1_12.y; } } }
            { let k = k0 + 50u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_12.z; } else { partials[pi] = partials[pi] + acc_1_12.z; } } }
            { let k = k0 + 51u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_12.w; } else { partials[pi] = partials[pi] + acc_1_12.w; } } }
            { let k = k0 + 52u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_13.x; } else { partials[pi] = partials[pi] + acc_1_13.x; } } }
            { let k = k0 + 53u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_13.y; } else { partials[pi] = partials[pi] + acc_1_13.y; } } }
            { let k = k0 + 54u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_13.z; } else { partials[pi] = partials[pi] + acc_1_13.z; } } }
            { let k = k0 + 55u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_13.w; } else { partials[pi] = partials[pi] + acc_1_13.w; } } }
            { let k = k0 + 56u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_14.x; } else { partials[pi] = partials[pi] + acc_1_14.x; } } }
            { let k = k0 + 57u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_14.y; } else { partials[pi] = partials[pi] + acc_1_14.y; } } }
            { let k = k0 + 58u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_14.z; } else { partials[pi] = partials[pi] + acc_1_14.z; } } }
            { let k = k0 + 59u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_14.w; } else { partials[pi] = partials[pi] + acc_1_14.w; } } }
            { let k = k0 + 60u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_15.x; } else { partials[pi] = partials[pi] + acc_1_15.x; } } }
            { let k = k0 + 61u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_15.y; } else { partials[pi] = partials[pi] + acc_1_15.y; } } }
            { let k = k0 + 62u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_15.z; } else { partials[pi] = partials[pi] + acc_1_15.z; } } }
            { let k = k0 + 63u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_1_15.w; } else { partials[pi] = partials[pi] + acc_1_15.w; } } }
        }
    }
    {
        let r = c0 + 2u;
        if (r < r1) {
            { let k = k0 + 0u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_0.x; } else { partials[pi] = partials[pi] + acc_2_0.x; } } }
            { let k = k0 + 1u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_0.y; } else { partials[pi] = partials[pi] + acc_2_0.y; } } }
            { let k = k0 + 2u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_0.z; } else { partials[pi] = partials[pi] + acc_2_0.z; } } }
            { let k = k0 + 3u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_0.w; } else { partials[pi] = partials[pi] + acc_2_0.w; } } }
            { let k = k0 + 4u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_1.x; } else { partials[pi] = partials[pi] + acc_2_1.x; } } }
            { let k = k0 + 5u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_1.y; } else { partials[pi] = partials[pi] + acc_2_1.y; } } }
            { let k = k0 + 6u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_1.z; } else { partials[pi] = partials[pi] + acc_2_1.z; } } }
            { let k = k0 + 7u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_1.w; } else { partials[pi] = partials[pi] + acc_2_1.w; } } }
            { let k = k0 + 8u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_2.x; } else { partials[pi] = partials[pi] + acc_2_2.x; } } }
            { let k = k0 + 9u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_2.y; } else { partials[pi] = partials[pi] + acc_2_2.y; } } }
            { let k = k0 + 10u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_2.z; } else { partials[pi] = partials[pi] + acc_2_2.z; } } }
            { let k = k0 + 11u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_2.w; } else { partials[pi] = partials[pi] + acc_2_2.w; } } }
            { let k = k0 + 12u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_3.x; } else { partials[pi] = partials[pi] + acc_2_3.x; } } }
            { let k = k0 + 13u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_3.y; } else { partials[pi] = partials[pi] + acc_2_3.y; } } }
            { let k = k0 + 14u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_3.z; } else { partials[pi] = partials[pi] + acc_2_3.z; } } }
            { let k = k0 + 15u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_3.w; } else { partials[pi] = partials[pi] + acc_2_3.w; } } }
            { let k = k0 + 16u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_4.x; } else { partials[pi] = partials[pi] + acc_2_4.x; } } }
            { let k = k0 + 17u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_4.y; } else { partials[pi] = partials[pi] + acc_2_4.y; } } }
            { let k = k0 + 18u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_4.z; } else { partials[pi] = partials[pi] + acc_2_4.z; } } }
            { let k = k0 + 19u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_4.w; } else { partials[pi] = partials[pi] + acc_2_4.w; } } }
            { let k = k0 + 20u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_5.x; } else { partials[pi] = partials[pi] + acc_2_5.x; } } }
            { let k = k0 + 21u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_5.y; } else { partials[pi] = partials[pi] + acc_2_5.y; } } }
            { let k = k0 + 22u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_5.z; } else { partials[pi] = partials[pi] + acc_2_5.z; } } }
            { let k = k0 + 23u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_5.w; } else { partials[pi] = partials[pi] + acc_2_5.w; } } }
            { let k = k0 + 24u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_6.x; } else { partials[pi] = partials[pi] + acc_2_6.x; } } }
            { let k = k0 + 25u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_6.y; } else { partials[pi] = partials[pi] + acc_2_6.y; } } }
            { let k = k0 + 26u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_6.z; } else { partials[pi] = partials[pi] + acc_2_6.z; } } }
            { let k = k0 + 27u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_6.w; } else { partials[pi] = partials[pi] + acc_2_6.w; } } }
            { let k = k0 + 28u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_7.x; } else { partials[pi] = partials[pi] + acc_2_7.x; } } }
            { let k = k0 + 29u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_7.y; } else { partials[pi] = partials[pi] + acc_2_7.y; } } }
            { let k = k0 + 30u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_7.z; } else { partials[pi] = partials[pi] + acc_2_7.z; } } }
            { let k = k0 + 31u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_7.w; } else { partials[pi] = partials[pi] + acc_2_7.w; } } }
            { let k = k0 + 32u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_8.x; } else { partials[pi] = partials[pi] + acc_2_8.x; } } }
            { let k = k0 + 33u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_8.y; } else { partials[pi] = partials[pi] + acc_2_8.y; } } }
            { let k = k0 + 34u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_8.z; } else { partials[pi] = partials[pi] + acc_2_8.z; } } }
            { let k = k0 + 35u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_8.w; } else { partials[pi] = partials[pi] + acc_2_8.w; } } }
            { let k = k0 + 36u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_9.x; } else { partials[pi] = partials[pi] + acc_2_9.x; } } }
            { let k = k0 + 37u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_9.y; } else { partials[pi] = partials[pi] + acc_2_9.y; } } }
            { let k = k0 + 38u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_9.z; } else { partials[pi] = partials[pi] + acc_2_9.z; } } }
            { let k = k0 + 39u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_9.w; } else { partials[pi] = partials[pi] + acc_2_9.w; } } }
            { let k = k0 + 40u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_10.x; } else { partials[pi] = partials[pi] + acc_2_10.x; } } }
            { let k = k0 + 41u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_10.y; } else { partials[pi] = partials[pi] + acc_2_10.y; } } }
            { let k = k0 + 42u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_10.z; } else { partials[pi] = partials[pi] + acc_2_10.z; } } }
            { let k = k0 + 43u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_10.w; } else { partials[pi] = partials[pi] + acc_2_10.w; } } }
            { let k = k0 + 44u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_11.x; } else { partials[pi] = partials[pi] + acc_2_11.x; } } }
            { let k = k0 + 45u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_11.y; } else { partials[pi] = partials[pi] + acc_2_11.y; } } }
            { let k = k0 + 46u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_11.z; } else { partials[pi] = partials[pi] + acc_2_11.z; } } }
            { let k = k0 + 47u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_11.w; } else { partials[pi] = partials[pi] + acc_2_11.w; } } }
            { let k = k0 + 48u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_12.x; } else { partials[pi] = partials[pi] + acc_2_12.x; } } }
            { let k = k0 + 49u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_12.y; } else { partials[pi] = partials[pi] + acc_2_12.y; } } }
            { let k = k0 + 50u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_12.z; } else { partials[pi] = partials[pi] + acc_2_12.z; } } }
            { let k = k0 + 51u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_12.w; } else { partials[pi] = partials[pi] + acc_2_12.w; } } }
            { let k = k0 + 52u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_13.x; } else { partials[pi] = partials[pi] + acc_2_13.x; } } }
            { let k = k0 + 53u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_13.y; } else { partials[pi] = partials[pi] + acc_2_13.y; } } }
            { let k = k0 + 54u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_13.z; } else { partials[pi] = partials[pi] + acc_2_13.z; } } }
            { let k = k0 + 55u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_13.w; } else { partials[pi] = partials[pi] + acc_2_13.w; } } }
            { let k = k0 + 56u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_14.x; } else { partials[pi] = partials[pi] + acc_2_14.x; } } }
            { let k = k0 + 57u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_14.y; } else { partials[pi] = partials[pi] + acc_2_14.y; } } }
            { let k = k0 + 58u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_14.z; } else { partials[pi] = partials[pi] + acc_2_14.z; } } }
            { let k = k0 + 59u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_14.w; } else { partials[pi] = partials[pi] + acc_2_14.w; } } }
            { let k = k0 + 60u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_15.x; } else { partials[pi] = partials[pi] + acc_2_15.x; } } }
            { let k = k0 + 61u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_15.y; } else { partials[pi] = partials[pi] + acc_2_15.y; } } }
            { let k = k0 + 62u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_15.z; } else { partials[pi] = partials[pi] + acc_2_15.z; } } }
            { let k = k0 + 63u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_2_15.w; } else { partials[pi] = partials[pi] + acc_2_15.w; } } }
        }
    }
    {
        let r = c0 + 3u;
        if (r < r1) {
            { let k = k0 + 0u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_0.x; } else { partials[pi] = partials[pi] + acc_3_0.x; } } }
            { let k = k0 + 1u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_0.y; } else { partials[pi] = partials[pi] + acc_3_0.y; } } }
            { let k = k0 + 2u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_0.z; } else { partials[pi] = partials[pi] + acc_3_0.z; } } }
            { let k = k0 + 3u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_0.w; } else { partials[pi] = partials[pi] + acc_3_0.w; } } }
            { let k = k0 + 4u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_1.x; } else { partials[pi] = partials[pi] + acc_3_1.x; } } }
            { let k = k0 + 5u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_1.y; } else { partials[pi] = partials[pi] + acc_3_1.y; } } }
            { let k = k0 + 6u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_1.z; } else { partials[pi] = partials[pi] + acc_3_1.z; } } }
            { let k = k0 + 7u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_1.w; } else { partials[pi] = partials[pi] + acc_3_1.w; } } }
            { let k = k0 + 8u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_2.x; } else { partials[pi] = partials[pi] + acc_3_2.x; } } }
            { let k = k0 + 9u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_2.y; } else { partials[pi] = partials[pi] + acc_3_2.y; } } }
            { let k = k0 + 10u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_2.z; } else { partials[pi] = partials[pi] + acc_3_2.z; } } }
            { let k = k0 + 11u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_2.w; } else { partials[pi] = partials[pi] + acc_3_2.w; } } }
            { let k = k0 + 12u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_3.x; } else { partials[pi] = partials[pi] + acc_3_3.x; } } }
            { let k = k0 + 13u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_3.y; } else { partials[pi] = partials[pi] + acc_3_3.y; } } }
            { let k = k0 + 14u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_3.z; } else { partials[pi] = partials[pi] + acc_3_3.z; } } }
            { let k = k0 + 15u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_3.w; } else { partials[pi] = partials[pi] + acc_3_3.w; } } }
            { let k = k0 + 16u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_4.x; } else { partials[pi] = partials[pi] + acc_3_4.x; } } }
            { let k = k0 + 17u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_4.y; } else { partials[pi] = partials[pi] + acc_3_4.y; } } }
            { let k = k0 + 18u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_4.z; } else { partials[pi] = partials[pi] + acc_3_4.z; } } }
            { let k = k0 + 19u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_4.w; } else { partials[pi] = partials[pi] + acc_3_4.w; } } }
            { let k = k0 + 20u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_5.x; } else { partials[pi] = partials[pi] + acc_3_5.x; } } }
            { let k = k0 + 21u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_5.y; } else { partials[pi] = partials[pi] + acc_3_5.y; } } }
            { let k = k0 + 22u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_5.z; } else { partials[pi] = partials[pi] + acc_3_5.z; } } }
            { let k = k0 + 23u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_5.w; } else { partials[pi] = partials[pi] + acc_3_5.w; } } }
            { let k = k0 + 24u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_6.x; } else { partials[pi] = partials[pi] + acc_3_6.x; } } }
            { let k = k0 + 25u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_6.y; } else { partials[pi] = partials[pi] + acc_3_6.y; } } }
            { let k = k0 + 26u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_6.z; } else { partials[pi] = partials[pi] + acc_3_6.z; } } }
            { let k = k0 + 27u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_6.w; } else { partials[pi] = partials[pi] + acc_3_6.w; } } }
            { let k = k0 + 28u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_7.x; } else { partials[pi] = partials[pi] + acc_3_7.x; } } }
            { let k = k0 + 29u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_7.y; } else { partials[pi] = partials[pi] + acc_3_7.y; } } }
            { let k = k0 + 30u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_7.z; } else { partials[pi] = partials[pi] + acc_3_7.z; } } }
            { let k = k0 + 31u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_7.w; } else { partials[pi] = partials[pi] + acc_3_7.w; } } }
            { let k = k0 + 32u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_8.x; } else { partials[pi] = partials[pi] + acc_3_8.x; } } }
            { let k = k0 + 33u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_8.y; } else { partials[pi] = partials[pi] + acc_3_8.y; } } }
            { let k = k0 + 34u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_8.z; } else { partials[pi] = partials[pi] + acc_3_8.z; } } }
            { let k = k0 + 35u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_8.w; } else { partials[pi] = partials[pi] + acc_3_8.w; } } }
            { let k = k0 + 36u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_9.x; } else { partials[pi] = partials[pi] + acc_3_9.x; } } }
            { let k = k0 + 37u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_9.y; } else { partials[pi] = partials[pi] + acc_3_9.y; } } }
            { let k = k0 + 38u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_9.z; } else { partials[pi] = partials[pi] + acc_3_9.z; } } }
            { let k = k0 + 39u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_9.w; } else { partials[pi] = partials[pi] + acc_3_9.w; } } }
            { let k = k0 + 40u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_10.x; } else { partials[pi] = partials[pi] + acc_3_10.x; } } }
            { let k = k0 + 41u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_10.y; } else { partials[pi] = partials[pi] + acc_3_10.y; } } }
            { let k = k0 + 42u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_10.z; } else { partials[pi] = partials[pi] + acc_3_10.z; } } }
            { let k = k0 + 43u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_10.w; } else { partials[pi] = partials[pi] + acc_3_10.w; } } }
            { let k = k0 + 44u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_11.x; } else { partials[pi] = partials[pi] + acc_3_11.x; } } }
            { let k = k0 + 45u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_11.y; } else { partials[pi] = partials[pi] + acc_3_11.y; } } }
            { let k = k0 + 46u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_11.z; } else { partials[pi] = partials[pi] + acc_3_11.z; } } }
            { let k = k0 + 47u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_11.w; } else { partials[pi] = partials[pi] + acc_3_11.w; } } }
            { let k = k0 + 48u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_12.x; } else { partials[pi] = partials[pi] + acc_3_12.x; } } }
            { let k = k0 + 49u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_12.y; } else { partials[pi] = partials[pi] + acc_3_12.y; } } }
            { let k = k0 + 50u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_12.z; } else { partials[pi] = partials[pi] + acc_3_12.z; } } }
            { let k = k0 + 51u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_12.w; } else { partials[pi] = partials[pi] + acc_3_12.w; } } }
            { let k = k0 + 52u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_13.x; } else { partials[pi] = partials[pi] + acc_3_13.x; } } }
            { let k = k0 + 53u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_13.y; } else { partials[pi] = partials[pi] + acc_3_13.y; } } }
            { let k = k0 + 54u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_13.z; } else { partials[pi] = partials[pi] + acc_3_13.z; } } }
            { let k = k0 + 55u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_13.w; } else { partials[pi] = partials[pi] + acc_3_13.w; } } }
            { let k = k0 + 56u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_14.x; } else { partials[pi] = partials[pi] + acc_3_14.x; } } }
            { let k = k0 + 57u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_14.y; } else { partials[pi] = partials[pi] + acc_3_14.y; } } }
            { let k = k0 + 58u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_14.z; } else { partials[pi] = partials[pi] + acc_3_14.z; } } }
            { let k = k0 + 59u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_14.w; } else { partials[pi] = partials[pi] + acc_3_14.w; } } }
            { let k = k0 + 60u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_15.x; } else { partials[pi] = partials[pi] + acc_3_15.x; } } }
            { let k = k0 + 61u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_15.y; } else { partials[pi] = partials[pi] + acc_3_15.y; } } }
            { let k = k0 + 62u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_15.z; } else { partials[pi] = partials[pi] + acc_3_15.z; } } }
            { let k = k0 + 63u; if (k < prm.k) { let pi = pbase + k * r1 + r; if (win.first == 1u) { partials[pi] = acc_3_15.w; } else { partials[pi] = partials[pi] + acc_3_15.w; } } }
        }
    }
    // </generated store>
}
