// The end-of-epoch update, one workgroup per kernel k:
//
//   S = sum_k B[k],  B'[k] = (B[k] + 1/S) * S / (S + 1),  theta_next[k, r] = T[k, r] / B'[k],
//   theta_t_next[r, k] = theta_next[k, r]  (the E-step's layout, rows padded to KP = kpad()),
//   bias_next[k] = -0.5 * ||theta_next_k||^2,  counts_next[k] = B'[k],
//   bad[k] = 1 if any of these is not finite (SPEC's stopping rule), else 0.
//
// Shapes: t_acc, t_comp (K, R + 1) with B in column R (true value t_acc - t_comp);
//         theta_next (K, R); theta_t_next (R, KP); bias_next, counts_next (K); bad (K).
// theta itself is not touched here: the host copies theta_next over it only when the epoch was
// finite, so the last finite theta survives a numerical failure.

const WGS: u32 = 256u;

@group(0) @binding(1) var<storage, read> t_acc: array<f32>;
@group(0) @binding(2) var<storage, read> t_comp: array<f32>;
@group(0) @binding(3) var<storage, read_write> theta_next: array<f32>;
@group(0) @binding(4) var<storage, read_write> bias_next: array<f32>;
@group(0) @binding(5) var<storage, read_write> counts_next: array<f32>;
@group(0) @binding(6) var<storage, read_write> bad: array<u32>;
@group(0) @binding(7) var<storage, read_write> theta_t_next: array<f32>;

var<workgroup> red: array<f32, WGS>;
var<workgroup> red_bad: array<u32, WGS>;

fn stat(e: u32) -> f32 {
    return t_acc[e] - t_comp[e];
}

fn tree_sum(lid: u32) {
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            red[lid] += red[lid + stride];
            red_bad[lid] |= red_bad[lid + stride];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = wid.x;
    let r1 = prm.r + 1u;

    var s = 0.0;
    for (var kk = lid; kk < prm.k; kk += WGS) {
        s += stat(kk * r1 + prm.r);
    }
    red[lid] = s;
    red_bad[lid] = 0u;
    workgroupBarrier();
    tree_sum(lid);
    let total = red[0];
    workgroupBarrier();

    let b_prime = (stat(k * r1 + prm.r) + 1.0 / total) * total / (total + 1.0);
    var sq = 0.0;
    var nonfinite = 0u;
    for (var r = lid; r < prm.r; r += WGS) {
        let t = stat(k * r1 + r) / b_prime;
        theta_next[k * prm.r + r] = t;
        theta_t_next[r * kpad() + k] = t;
        sq = fma(t, t, sq);
        if (!is_finite_f32(t)) {
            nonfinite = 1u;
        }
    }
    red[lid] = sq;
    red_bad[lid] = nonfinite;
    workgroupBarrier();
    tree_sum(lid);
    if (lid == 0u) {
        bias_next[k] = -0.5 * red[0];
        counts_next[k] = b_prime;
        var b = red_bad[0];
        if (!is_finite_f32(b_prime) || !is_finite_f32(total) || !is_finite_f32(red[0])) {
            b = 1u;
        }
        bad[k] = b;
    }
}
