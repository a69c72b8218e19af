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

const RR: u32 = {{RR}}u;   // columns per thread
const MT: u32 = {{MT}}u;   // threads per workgroup
const TK: u32 = {{TN}}u;   // kernels per workgroup, a multiple of 4
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
{{ACC_DECL}}
    for (var s = 0u; s < win.rows; s++) {
        let xb = (prm.x_offset + n) * prm.img_stride + h * prm.wp + w;
        let gb = (s * kp + k0) / 4u;
{{FMA}}
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
{{STORE}}
}
