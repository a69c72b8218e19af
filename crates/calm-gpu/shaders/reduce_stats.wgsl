// Adds one batch's M-step partial sums into the epoch's statistics, in a fixed order:
//
//   t_acc[k, r] += sum_{z < n_chunks} partials[z, k, r]      for r <= R  (column R holds B[k])
//
// Shapes: partials (n_chunks, K, R + 1); t_acc, t_comp (K, R + 1). The epoch sum is compensated
// (Kahan): t_comp carries the rounding error, so the statistics of a 60,000-image epoch keep
// close to f32 precision; the true sum is t_acc - t_comp.

@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> t_acc: array<f32>;
@group(0) @binding(3) var<storage, read_write> t_comp: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * 256u;
    let len = prm.k * (prm.r + 1u);
    if (e >= len) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < prm.n_chunks; z++) {
        s += partials[z * len + e];
    }
    let y = s - t_comp[e];
    let t = t_acc[e] + y;
    t_comp[e] = (t - t_acc[e]) - y;
    t_acc[e] = t;
}
