// Log-sum-exp per image: logp[n] = log sum_{k,h,w} exp(L[n,k,h,w]), one workgroup per image.
//
// Shapes: l (n_images, K, Ho*Wo); logp_all (N), the epoch's per-image log likelihoods, written at
// logp_offset + n (their sum is the epoch's LL, taken in summary.wgsl).
// Each thread keeps an online (max, sum) pair over a strided slice (lse_push); pairs are merged
// in a fixed tree (lse_merge), both in params.wgsl.

const WGS: u32 = 256u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read_write> logp_all: array<f32>;

var<workgroup> red: array<vec2<f32>, WGS>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n = wid.x;
    let len = prm.k * prm.positions;
    let base = n * len;
    var acc = LSE_EMPTY;
    for (var e = lid; e < len; e += WGS) {
        acc = lse_push(acc, l[base + e]);
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            red[lid] = lse_merge(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        logp_all[prm.logp_offset + n] = red[0].x + log(red[0].y);
    }
}
