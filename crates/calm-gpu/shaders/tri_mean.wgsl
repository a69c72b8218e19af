// Triangle features, pass 1 of 2 (pass 2: features_tri.wgsl). For every patch u of every image
// of the batch:
//
//   norm[n,u] = ||x_u||^2                      (the padded image's C x w x w window at u)
//   mean[n,u] = (1/K) sum_k d_k(u),  d_k(u) = sqrt(max(norm - 2 L[n,k,u], 0)) = ||x_u - theta_k||
//
// written as pm[(n * P + u) * 2 + {0, 1}]. One thread per (position, image). With
// contrast-normalised patches (prm.norm_eps > 0) pm holds each patch's (mean, 1 / s) from
// norm_estep.wgsl, L is the normalised patches', and norm is ||(x_u - mean) / s||^2.
//
// Shapes: x the bound data buffer of padded images; off (R) the offset of each patch element
// inside a padded image (as the E-step reads it); l (n_images, K, P); pm (n_images, P, 2).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> off: array<u32>;
@group(0) @binding(3) var<storage, read> l: array<f32>;
@group(0) @binding(4) var<storage, read_write> pm: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let u = gid.x;
    let n = gid.y;
    if (u >= prm.positions || n >= prm.n_images) {
        return;
    }
    let h = u / prm.wo;
    let base = (prm.x_offset + n) * prm.img_stride + h * prm.wp + (u - h * prm.wo);
    let q = (n * prm.positions + u) * 2u;
    var mean = 0.0;
    var inv_s = 1.0;
    if (prm.norm_eps > 0.0) {
        mean = pm[q];
        inv_s = pm[q + 1u];
    }
    var norm = 0.0;
    for (var r = 0u; r < prm.r; r++) {
        let v = (x[base + off[r]] - mean) * inv_s;
        norm += v * v;
    }
    var sum = 0.0;
    for (var k = 0u; k < prm.k; k++) {
        sum += sqrt(max(norm - 2.0 * l[(n * prm.k + k) * prm.positions + u], 0.0));
    }
    pm[q] = norm;
    pm[q + 1u] = sum / f32(prm.k);
}
