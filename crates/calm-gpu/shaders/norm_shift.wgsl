// Contrast-normalised patches, pass 2 of 3, after the log-sum-exp and before the M-step:
//
//   L[n,k,u] += log(inv_s_u),  so that exp(L - logp[n]) = gamma[n,k,u] / s_u
//
// and the M-step's T = sum gamma x_u / s_u, the raw patches weighted by the posterior over their
// scale (norm_correct.wgsl makes that sum gamma z_u). logp was taken from the unshifted L, so the
// epoch's LL is the normalised patches'. One thread per (position, image); pm (n_images, P, 2)
// from norm_estep.wgsl; l (n_images, K, P).

@group(0) @binding(1) var<storage, read> pm: array<f32>;
@group(0) @binding(2) var<storage, read_write> l: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let u = gid.x;
    let n = gid.y;
    if (u >= prm.positions || n >= prm.n_images) {
        return;
    }
    let shift = log(pm[(n * prm.positions + u) * 2u + 1u]);
    for (var k = 0u; k < prm.k; k++) {
        l[(n * prm.k + k) * prm.positions + u] += shift;
    }
}
