// Log-sum-exp per image: logp[n] = log sum_{k,h,w} exp(L[n,k,h,w]), one workgroup per image.
//
// Shapes: l (n_images, K, Ho*Wo); logp_all (N), the epoch's per-image log likelihoods, written at
// logp_offset + n (their sum is the epoch's LL, taken in summary.wgsl).
// Each thread keeps an online (max, sum) pair over a strided slice; pairs are merged in a fixed
// tree with  m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m).

const WGS: u32 = 256u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read_write> logp_all: array<f32>;

var<workgroup> red_m: array<f32, WGS>;
var<workgroup> red_s: array<f32, WGS>;

fn merge(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
    let m = max(m1, m2);
    if (m == -3.0e38) {
        return vec2<f32>(m, 0.0);
    }
    return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n = wid.x;
    let len = prm.k * prm.positions;
    let base = n * len;
    var m = -3.0e38;
    var s = 0.0;
    for (var e = lid; e < len; e += WGS) {
        let v = l[base + e];
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
        // NaN compares false both ways above and would vanish: carry it into the sum instead.
        if (v != v) {
            s = v;
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            let r = merge(red_m[lid], red_s[lid], red_m[lid + stride], red_s[lid + stride]);
            red_m[lid] = r.x;
            red_s[lid] = r.y;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        logp_all[prm.logp_offset + n] = red_m[0] + log(red_s[0]);
    }
}
