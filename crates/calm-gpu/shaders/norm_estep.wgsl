// Contrast-normalised patches (`Geometry::patch_norm`), pass 1 of 3, after the E-step: the
// E-step computed L = theta_t . x_u + bias on the raw patches x_u; for every patch u of every
// image n of the batch this makes it the normalised patch's,
//
//   m = mean(x_u), v = var(x_u) over its R values, inv_s = 1 / sqrt(v + eps),
//   z_u = (x_u - m) inv_s,
//   L[n,k,u] = (L[n,k,u] - bias[k] - m ksum[k]) inv_s + bias[k] = theta_t[:,k] . z_u + bias[k],
//
// with ksum[k] = sum_r theta_t[r,k] (written by the host with theta_t). (m, inv_s) go to
// pm[(n * P + u) * 2 + {0, 1}] for norm_shift.wgsl, norm_correct.wgsl and tri_mean.wgsl. The
// moments are summed in order in two passes, as geometry::normalize_patch does on the CPU.
// One thread per (position, image); the reads of L and pm are contiguous along positions.
//
// Shapes: x the bound data buffer of padded images; off (R) the offset of each patch element
// inside a padded image; ksum, bias (K); l (n_images, K, P); pm (n_images, P, 2).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> off: array<u32>;
@group(0) @binding(3) var<storage, read> ksum: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> l: array<f32>;
@group(0) @binding(6) var<storage, read_write> pm: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let u = gid.x;
    let n = gid.y;
    if (u >= prm.positions || n >= prm.n_images) {
        return;
    }
    let base = patch_base(n * prm.positions + u);
    let rf = f32(prm.r);
    var sum = 0.0;
    for (var r = 0u; r < prm.r; r++) {
        sum += x[base + off[r]];
    }
    let m = sum / rf;
    var ss = 0.0;
    for (var r = 0u; r < prm.r; r++) {
        let d = x[base + off[r]] - m;
        ss += d * d;
    }
    let inv_s = 1.0 / sqrt(ss / rf + prm.norm_eps);
    let q = (n * prm.positions + u) * 2u;
    pm[q] = m;
    pm[q + 1u] = inv_s;
    for (var k = 0u; k < prm.k; k++) {
        let i = (n * prm.k + k) * prm.positions + u;
        l[i] = (l[i] - bias[k] - m * ksum[k]) * inv_s + bias[k];
    }
}
