// Features: f[n, k] = log sum_{h,w} exp(L[n,k,h,w]), one workgroup per (k, n) of the batch.
//
// Shapes: l (n_images, K, Ho*Wo); f (n_images, K), this batch's rows (the host reads them back).
// Online (max, sum) pairs per thread merged in a fixed tree, as in logsumexp.wgsl.

const WGS: u32 = 64u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read_write> f: array<f32>;

var<workgroup> red_m: array<f32, WGS>;
var<workgroup> red_s: array<f32, WGS>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = wid.x;
    let n = wid.y;
    let base = (n * prm.k + k) * prm.positions;
    var m = -3.0e38;
    var s = 0.0;
    for (var p = lid; p < prm.positions; p += WGS) {
        let v = l[base + p];
        if (v > m) {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s += exp(v - m);
        }
        if (v != v) {
            s = v;
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            let m1 = red_m[lid];
            let m2 = red_m[lid + stride];
            let mm = max(m1, m2);
            red_s[lid] = red_s[lid] * exp(m1 - mm) + red_s[lid + stride] * exp(m2 - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        f[n * prm.k + k] = red_m[0] + log(red_s[0]);
    }
}
