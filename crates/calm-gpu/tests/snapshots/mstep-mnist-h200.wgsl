// M-step statistics of one batch, as partial sums over chunks of images.
//
//   T[k, r]  = sum_{n,h,w} G[n,h,w,k] * Xpad[n, c, h+i, w+j],   r = (c, i, j) < R
//   T[k, R]  = sum_{n,h,w} G[n,h,w,k]                  (= B[k])
//
// with G = exp(L - logp) from posterior.wgsl (or computed while loading, Tiles::m_fused), i.e. the GEMM  T[K x R] = G^T[K x M] A[M x R]
// with A read from the padded images as in the E-step, and B summed from the same G tiles by
// the workgroups of column tile 0 (not as a column of ones in the GEMM: R + 1 columns would
// cost a whole extra column tile wherever the tile width divides R). The long
// reduction over M = n_images * P is split: workgroup (x, y, z) handles column tile x, kernel tile
// y and images [z * imgs_per_chunk, (z+1) * imgs_per_chunk) of the batch, and writes its partial
// sum to partials[z]; reduce_stats.wgsl adds the partials in a fixed order.
//
// Shapes: gpost (n_images, P, KP) or, with Tiles::m_fused, l (n_images, K, P) and logp_all (N); x (images, C, Hp, Wp); off (R); pos_off (P), the
//         offset h * Wp + w of position p; partials (n_chunks, K, R + 1).
// Tiling: WGX (columns) x WGY (kernels) threads (256 unless the tiles say otherwise), a TK x TR tile, each thread RK contiguous kernels x RR contiguous
// columns. Positions advance BK at a time within one image, so n is fixed per stage.

const WGX: u32 = 16u;  // threads along the tile's first axis (positions / columns)
const WGY: u32 = 16u;  // threads along kernels
const NT: u32 = WGX * WGY;
const RK: u32 = 4u;
const RR: u32 = 4u;
const BK: u32 = 16u;
const TK: u32 = WGY * RK;
const TR: u32 = WGX * RR;
const TK4: u32 = TK / 4u;
const TR4: u32 = TR / 4u;
// A thread's RR values along the A tile are RR / 4 vec4 groups, group g of thread tx at
// tx * A_STEP + g * A_GAP: side by side (A_STEP = RR / 4, A_GAP = 1) or lane-strided (A_STEP = 1,
// A_GAP = WGX: neighbouring threads read neighbouring vec4s, no bank conflict). Set by the host
// from Tiles::m_strided.
const A_STEP: u32 = 1u;
const A_GAP: u32 = 1u;
// What a vec4 of the A tile holds: vec4 q of a step holds columns q * P_STEP + c * P_GAP of the
// tile, four neighbours or, transposed (Tiles::m_gather), four columns TR4 apart: see
// estep.wgsl.
const P_STEP: u32 = 4u;
const P_GAP: u32 = 1u;
const RM: u32 = RR;  // the unrolled block's names: RM along a (columns), RN along b (kernels)
const RN: u32 = RK;

@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> off: array<u32>;
@group(0) @binding(4) var<storage, read> pos_off: array<u32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;

// NBUF stages of tiles: 1, or 2 (double-buffered, Tiles::m_double; see estep.wgsl).
const NBUF: u32 = 1u;
const A_HALF: u32 = BK * TR4;
const B_HALF: u32 = BK * TK4;
var<workgroup> b_tile: array<vec4<f32>, NBUF * BK * TK4>;   // [buf][kk][k / 4], posteriors
var<workgroup> a_tile: array<vec4<f32>, NBUF * BK * TR4>;   // [buf][kk][r / 4], patch values

// The G tile's source: the posteriors from posterior.wgsl's G buffer, or computed from L while
// loading (Tiles::m_fused); load_g(n, p0, e, k0) and g_slot(e) from gpu::kernels.
// <generated g_source> where the posteriors come from: the G buffer (codegen::G_FUSED with Tiles::m_fused)
@group(0) @binding(1) var<storage, read> gpost: array<vec4<f32>>;

fn g_slot(e: u32) -> u32 {
    return e;
}

fn load_g(n: u32, p0: u32, e: u32, k0: u32) -> vec4<f32> {
    let kp = kpad();
    let kk = e / TK4;
    let kq = e - kk * TK4;
    let p = p0 + kk;
    let k = k0 + kq * 4u;
    var v = vec4<f32>(0.0);
    if (p < prm.positions && k < kp) {
        v = gpost[((n * prm.positions + p) * kp + k) / 4u];
    }
    return v;
}
// </generated g_source>

// One vec4 of the A tile: element e = (kk, vec4 q) of image n's positions from p0, columns
// c0 + q * P_STEP + c * P_GAP. off and pos_off are padded with zeros past R and P, so every read
// is in bounds (columns past R are computed, never stored).
fn load_x(n: u32, p0: u32, e: u32, c0: u32) -> vec4<f32> {
    let kk = e / TR4;
    let pb = (prm.x_offset + n) * prm.img_stride + pos_off[p0 + kk];
    let r = c0 + (e - kk * TR4) * P_STEP;
    return vec4<f32>(x[pb + off[r]], x[pb + off[r + P_GAP]], x[pb + off[r + 2u * P_GAP]], x[pb + off[r + 3u * P_GAP]]);
}

@compute @workgroup_size(WGX, WGY, 1)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid3.x;
    let ty = lid3.y;
    let lid = ty * WGX + tx;
    let c0 = wid.x * TR;
    let k0 = wid.y * TK;
    let r1 = prm.r + 1u;
    let n_begin = wid.z * prm.imgs_per_chunk;
    let n_end = min(n_begin + prm.imgs_per_chunk, prm.n_images);
    let kp = kpad();

    // <generated acc_decl>
    var acc_0_0 = vec4<f32>(0.0);
    var acc_1_0 = vec4<f32>(0.0);
    var acc_2_0 = vec4<f32>(0.0);
    var acc_3_0 = vec4<f32>(0.0);
    // </generated acc_decl>
    // B: in column tile 0, thread lid adds the G tile's vec4s lid, lid + NT, ...; NT is a
    // multiple of TK4 (Tiles::check), so they all hold the same four kernels, lid % TK4.
    let sum_b = wid.x == 0u;
    var bsum = vec4<f32>(0.0);
    // Stages run over (image, BK positions) of the chunk; the next stage's tiles are loaded into
    // registers while the current one computes (pf_* blocks from gpu::codegen::prefetch).
    let steps = (prm.positions + BK - 1u) / BK;
    let total = (n_end - n_begin) * steps;
    var n = n_begin;
    var p0 = 0u;
    // <generated pf_init>
    var pg0 = load_g(n, p0, lid + 0u, k0);
    var px0 = load_x(n, p0, lid + 0u, c0);
    // </generated pf_init>
    var buf = 0u;  // the half this stage reads (always 0 with one buffer)
    if (NBUF == 2u) {
        let a_tile_w = 0u;
        let b_tile_w = 0u;
        // <generated pf_store>
        b_tile[b_tile_w + g_slot((lid + 0u))] = pg0;
        a_tile[a_tile_w + (lid + 0u)] = px0;
        // </generated pf_store>
        workgroupBarrier();
    }
    for (var s = 0u; s < total; s++) {
        if (NBUF == 1u) {
            let a_tile_w = 0u;
            let b_tile_w = 0u;
            // <generated pf_store>
        b_tile[b_tile_w + g_slot((lid + 0u))] = pg0;
        a_tile[a_tile_w + (lid + 0u)] = px0;
            // </generated pf_store>
            workgroupBarrier();
        }
        let more = s + 1u < total;
        if (more) {
            let s1 = s + 1u;
            n = n_begin + s1 / steps;
            p0 = (s1 % steps) * BK;
            // <generated pf_next>
            pg0 = load_g(n, p0, lid + 0u, k0);
            px0 = load_x(n, p0, lid + 0u, c0);
            // </generated pf_next>
        }

        // The register block: RR columns x RK kernels, unrolled by the host (codegen::unrolled).
        // A loop over the stage's BK steps, or the steps written out by the host
        // (Tiles::e_unroll / m_unroll): codegen::steps.
        if (sum_b) {
            for (var e = lid; e < BK * TK4; e += NT) {
                bsum += b_tile[buf * B_HALF + e];
            }
        }
        { let kk = 0u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 1u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 2u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 3u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 4u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 5u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 6u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 7u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 8u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 9u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 10u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 11u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 12u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 13u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 14u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        { let kk = 15u;
            let ab = buf * A_HALF + kk * TR4 + tx * A_STEP;
            let bb = buf * B_HALF + kk * TK4 + ty * (RK / 4u);
            // <generated fma>
            let a0 = a_tile[ab + 0u * A_GAP];
            let b0 = b_tile[bb + 0u];
            acc_0_0 = fma(vec4<f32>(a0.x), b0, acc_0_0);
            acc_1_0 = fma(vec4<f32>(a0.y), b0, acc_1_0);
            acc_2_0 = fma(vec4<f32>(a0.z), b0, acc_2_0);
            acc_3_0 = fma(vec4<f32>(a0.w), b0, acc_3_0);
            // </generated fma>
        }
        if (NBUF == 2u && more) {
            let a_tile_w = (1u - buf) * A_HALF;
            let b_tile_w = (1u - buf) * B_HALF;
            // <generated pf_store>
        b_tile[b_tile_w + g_slot((lid + 0u))] = pg0;
        a_tile[a_tile_w + (lid + 0u)] = px0;
            // </generated pf_store>
        }
        workgroupBarrier();
        buf = (buf + 1u) % NBUF;
    }

    let pbase = wid.z * prm.k * r1;
    // <generated store>
    {
        let r = c0 + (tx * A_STEP + 0u * A_GAP) * P_STEP + 0u * P_GAP;
        if (r < prm.r) {
            let k = k0 + ty * RN;
            if (k + 0u < prm.k) { partials[pbase + (k + 0u) * r1 + r] = acc_0_0.x; }
            if (k + 1u < prm.k) { partials[pbase + (k + 1u) * r1 + r] = acc_0_0.y; }
            if (k + 2u < prm.k) { partials[pbase + (k + 2u) * r1 + r] = acc_0_0.z; }
            if (k + 3u < prm.k) { partials[pbase + (k + 3u) * r1 + r] = acc_0_0.w; }
        }
    }
    {
        let r = c0 + (tx * A_STEP + 0u * A_GAP) * P_STEP + 1u * P_GAP;
        if (r < prm.r) {
            let k = k0 + ty * RN;
            if (k + 0u < prm.k) { partials[pbase + (k + 0u) * r1 + r] = acc_1_0.x; }
            if (k + 1u < prm.k) { partials[pbase + (k + 1u) * r1 + r] = acc_1_0.y; }
            if (k + 2u < prm.k) { partials[pbase + (k + 2u) * r1 + r] = acc_1_0.z; }
            if (k + 3u < prm.k) { partials[pbase + (k + 3u) * r1 + r] = acc_1_0.w; }
        }
    }
    {
        let r = c0 + (tx * A_STEP + 0u * A_GAP) * P_STEP + 2u * P_GAP;
        if (r < prm.r) {
            let k = k0 + ty * RN;
            if (k + 0u < prm.k) { partials[pbase + (k + 0u) * r1 + r] = acc_2_0.x; }
            if (k + 1u < prm.k) { partials[pbase + (k + 1u) * r1 + r] = acc_2_0.y; }
            if (k + 2u < prm.k) { partials[pbase + (k + 2u) * r1 + r] = acc_2_0.z; }
            if (k + 3u < prm.k) { partials[pbase + (k + 3u) * r1 + r] = acc_2_0.w; }
        }
    }
    {
        let r = c0 + (tx * A_STEP + 0u * A_GAP) * P_STEP + 3u * P_GAP;
        if (r < prm.r) {
            let k = k0 + ty * RN;
            if (k + 0u < prm.k) { partials[pbase + (k + 0u) * r1 + r] = acc_3_0.x; }
            if (k + 1u < prm.k) { partials[pbase + (k + 1u) * r1 + r] = acc_3_0.y; }
            if (k + 2u < prm.k) { partials[pbase + (k + 2u) * r1 + r] = acc_3_0.z; }
            if (k + 3u < prm.k) { partials[pbase + (k + 3u) * r1 + r] = acc_3_0.w; }
        }
    }
    // </generated store>

    // B: the threads' sums of each vec4 of kernels, added in thread order through the (now
    // free) G tile, written to column R.
    if (sum_b) {
        if (lid < BK * TK4) {
            b_tile[lid] = bsum;
        }
        workgroupBarrier();
        if (lid < TK4) {
            var b = vec4<f32>(0.0);
            for (var e = lid; e < min(NT, BK * TK4); e += TK4) {
                b += b_tile[e];
            }
            let k = k0 + lid * 4u;
            for (var c = 0u; c < 4u; c++) {
                if (k + c < prm.k) {
                    partials[pbase + (k + c) * r1 + prm.r] = b[c];
                }
            }
        }
    }
}
