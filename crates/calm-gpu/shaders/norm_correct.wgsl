// Contrast-normalised patches, pass 3 of 3, after the M-step and before reduce_stats.wgsl. The
// M-step summed, with G' = exp(L - logp) = gamma / s (norm_shift.wgsl),
//
//   T'[k, r] = sum_{n,u} G'[n,k,u] x_u[r],   B'[k] = sum_{n,u} G'[n,k,u];
//
// the normalised patches z_u = (x_u - m_u) / s_u want T[k, r] = sum gamma z_u[r] and
// B[k] = sum gamma, so this adds to each chunk's partial sums
//
//   T[k, r] = T'[k, r] - sum G' m_u,          B[k] = B'[k] + sum G' (s_u - 1),
//
// the sums over the chunk's images, z of n_chunks: images [z nb / n_chunks, (z+1) nb / n_chunks)
// (any split that covers the batch once will do: reduce_stats.wgsl adds every chunk's sums).
// One workgroup per (k, chunk), a fixed reduction tree.
//
// Shapes: l (n_images, K, P); logp_all (N); pm (n_images, P, 2) from norm_estep.wgsl; partials
// (n_chunks, K, R + 1), column R holding B.

const WGS: u32 = 64u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read> logp_all: array<f32>;
@group(0) @binding(3) var<storage, read> pm: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;

var<workgroup> red: array<vec2<f32>, WGS>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = wid.x;
    let z = wid.y;
    let n0 = z * prm.n_images / prm.n_chunks;
    let n1 = (z + 1u) * prm.n_images / prm.n_chunks;
    let count = (n1 - n0) * prm.positions;
    var acc = vec2<f32>(0.0, 0.0);
    for (var e = lid; e < count; e += WGS) {
        let n = n0 + e / prm.positions;
        let u = e - (n - n0) * prm.positions;
        let g = exp(l[(n * prm.k + k) * prm.positions + u] - logp_all[prm.logp_offset + n]);
        let q = (n * prm.positions + u) * 2u;
        acc += vec2<f32>(g * pm[q], g / pm[q + 1u] - g);
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            red[lid] = red[lid] + red[lid + stride];
        }
        workgroupBarrier();
    }
    let c = red[0];
    let row = (z * prm.k + k) * (prm.r + 1u);
    for (var r = lid; r < prm.r; r += WGS) {
        partials[row + r] -= c.x;
    }
    if (lid == 0u) {
        partials[row + prm.r] += c.y;
    }
}
