// Triangle features, pass 2 of 2 (after tri_mean.wgsl): the triangle encoding (Coates, Lee & Ng
// 2011) of the model's per-patch distances, summed over each of grid x grid regions,
//
//   f[n, k, a, b] = sum_{u in region (a,b)} max(0, mean[n,u] - d_k(u)),
//   d_k(u) = sqrt(max(norm[n,u] - 2 L[n,k,u], 0)) = ||x_u - theta_k||,
//
// with the regions of features.wgsl. One workgroup per (k, n, region), a fixed reduction tree.
//
// Shapes: l (n_images, K, P); pm (n_images, P, 2) from tri_mean.wgsl; f (n_images, K, grid,
// grid), this batch's rows.

const WGS: u32 = 64u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read> pm: array<f32>;
@group(0) @binding(3) var<storage, read_write> f: array<f32>;

var<workgroup> red: array<f32, WGS>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = wid.x;
    let n = wid.y;
    let region = wid.z;
    let reg = pool_region(region);
    let base = (n * prm.k + k) * prm.positions;
    var acc = 0.0;
    for (var e = lid; e < reg.w; e += WGS) {
        let u = pool_position(reg, e);
        let q = (n * prm.positions + u) * 2u;
        let d = sqrt(max(pm[q] - 2.0 * l[base + u], 0.0));
        acc += max(pm[q + 1u] - d, 0.0);
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        f[(n * prm.k + k) * prm.grid * prm.grid + region] = red[0];
    }
}
