// The scalars the host reads back once per epoch, one workgroup:
//
//   LL = sum_{n < N} logp_all[n]       as a pair (hi, lo) of f32 whose sum is exact to ~1e-14
//   S  = sum_k B[k],   finite = (LL is finite and bad[k] == 0 for every k)
//
// Shapes: logp_all (N); t_acc, t_comp (K, R + 1); bad (K); summary: [LL hi, LL lo, S, finite].
// Each thread sums a strided slice with Kahan compensation; partial (hi, lo) pairs are merged in a
// fixed tree by Knuth's TwoSum, so LL is reproducible and as accurate as an f64 sum.

const WGS: u32 = 256u;

@group(0) @binding(1) var<storage, read> logp_all: array<f32>;
@group(0) @binding(2) var<storage, read> t_acc: array<f32>;
@group(0) @binding(3) var<storage, read> t_comp: array<f32>;
@group(0) @binding(4) var<storage, read> bad: array<u32>;
@group(0) @binding(5) var<storage, read_write> summary: array<f32>;

var<workgroup> red_hi: array<f32, WGS>;
var<workgroup> red_lo: array<f32, WGS>;
var<workgroup> red_s: array<f32, WGS>;
var<workgroup> red_bad: array<u32, WGS>;

// (a + b) as hi + lo exactly.
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    return vec2<f32>(s, err);
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32) {
    var hi = 0.0;
    var lo = 0.0;
    for (var n = lid; n < prm.n_total; n += WGS) {
        let t = two_sum(hi, logp_all[n]);
        hi = t.x;
        lo += t.y;
    }
    let r1 = prm.r + 1u;
    var s = 0.0;
    var b = 0u;
    for (var k = lid; k < prm.k; k += WGS) {
        s += t_acc[k * r1 + prm.r] - t_comp[k * r1 + prm.r];
        b |= bad[k];
    }
    red_hi[lid] = hi;
    red_lo[lid] = lo;
    red_s[lid] = s;
    red_bad[lid] = b;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            let t = two_sum(red_hi[lid], red_hi[lid + stride]);
            red_hi[lid] = t.x;
            red_lo[lid] += red_lo[lid + stride] + t.y;
            red_s[lid] += red_s[lid + stride];
            red_bad[lid] |= red_bad[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let ll = red_hi[0] + red_lo[0];
        summary[0] = red_hi[0];
        summary[1] = red_lo[0];
        summary[2] = red_s[0];
        var finite = 1.0;
        if (red_bad[0] != 0u || !is_finite_f32(ll) || !is_finite_f32(red_s[0])) {
            finite = 0.0;
        }
        summary[3] = finite;
    }
}
