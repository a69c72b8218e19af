// Shared by every kernel (prepended to each shader's text at pipeline creation); mirrors
// `gpu::Params` in Rust. One uniform per batch, written once when the engine is built.
struct Params {
    n_images: u32,       // images in this batch
    x_offset: u32,       // index of the batch's first image inside the bound data buffer
    k: u32,              // K kernels
    r: u32,              // R = C * w * w
    positions: u32,      // P = Ho * Wo
    wo: u32,             // Wo
    wp: u32,             // padded image width W + 2p
    img_stride: u32,     // floats per padded image, C * (H + 2p) * (W + 2p)
    logp_offset: u32,    // index of the batch's first image within the epoch (logp_all)
    imgs_per_chunk: u32, // M-step: images per reduction chunk (one partial sum each)
    n_chunks: u32,       // M-step: number of chunks in this batch
    n_total: u32,        // images in the whole dataset
    grid: u32,           // features: pooling regions per axis (1: image-wide, SPEC's features)
    norm_eps: f32,       // contrast-normalised patches' eps (norm_*.wgsl); 0: raw patches
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;

// True unless v is NaN or +-infinity (WGSL has no isnan/isinf).
fn is_finite_f32(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// Where the patch of batch position m = (n, h, w) starts in x, the padded images of the bound
// data buffer: (x_offset + n) * img_stride + h * Wp + w. Shared by the three E-steps.
fn patch_base(m: u32) -> u32 {
    let n = m / prm.positions;
    let p = m - n * prm.positions;
    let h = p / prm.wo;
    let w = p - h * prm.wo;
    return (prm.x_offset + n) * prm.img_stride + h * prm.wp + w;
}

// K rounded up to a multiple of 8: the row length of theta_t (R, KP) and of the posteriors
// G (n, P, KP), so that kernels can be read four or eight at a time as vec4.
fn kpad() -> u32 {
    return (prm.k + 7u) / 8u * 8u;
}

// Online log-sum-exp, shared by logsumexp.wgsl and features.wgsl: a pair (m, s) stands for
// log(sum) = m + log(s). -3e38 is the empty pair's m (WGSL has no -inf literal).
const LSE_EMPTY: vec2<f32> = vec2<f32>(-3.0e38, 0.0);

// Adds exp(v). NaN compares false both ways and would vanish: it is carried into s instead.
fn lse_push(acc: vec2<f32>, v: f32) -> vec2<f32> {
    var r: vec2<f32>;
    if (v > acc.x) {
        r = vec2<f32>(v, acc.y * exp(acc.x - v) + 1.0);
    } else {
        r = vec2<f32>(acc.x, acc.y + exp(v - acc.x));
    }
    if (v != v) {
        r.y = v;
    }
    return r;
}

// Merges two pairs: m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m).
fn lse_merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    if (m == LSE_EMPTY.x) {
        return LSE_EMPTY;
    }
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// Pooling region `region` (row-major over grid x grid) of the Ho x Wo positions: rows
// [a Ho / grid, (a+1) Ho / grid), columns [b Wo / grid, (b+1) Wo / grid). Returns (first row,
// first column, columns, positions in the region); shared by features.wgsl and features_tri.wgsl.
fn pool_region(region: u32) -> vec4<u32> {
    let ho = prm.positions / prm.wo;
    let ra = region / prm.grid;
    let rb = region - ra * prm.grid;
    let h0 = ra * ho / prm.grid;
    let h1 = (ra + 1u) * ho / prm.grid;
    let w0 = rb * prm.wo / prm.grid;
    let w1 = (rb + 1u) * prm.wo / prm.grid;
    return vec4<u32>(h0, w0, w1 - w0, (h1 - h0) * (w1 - w0));
}

// The position index h * Wo + w of the e-th position (row-major) of a pool_region.
fn pool_position(reg: vec4<u32>, e: u32) -> u32 {
    let row = e / reg.z;
    return (reg.x + row) * prm.wo + reg.y + (e - row * reg.z);
}
