// Posteriors of one batch, transposed for the M-step:
//
//   G[n, p, k] = exp(gamma[n,k,p]) = exp(L[n,k,p] - logp[n])      (0 for the padding k >= K)
//
// Shapes: l (n_images, K, P); logp_all (N); gpost (n_images, P, KP) with KP = K rounded up to a
// multiple of 8 (kpad()), so the M-step reads four kernels' posteriors as one vec4. One thread per
// (n, p, k), k fastest, so the writes of G are contiguous.
// Materialising G costs one read of L and one write of G per batch: ~2% of the batch's time
// beside the two GEMMs on a fast GPU (docs/perf.md), and it spares the M-step an exp() per tile.

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read> logp_all: array<f32>;
@group(0) @binding(3) var<storage, read_write> gpost: array<f32>;

@compute @workgroup_size(64, 4, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    // x: k (fastest in G), y: p, z: n.
    let k4 = kpad();
    let k = gid.x;
    let p = gid.y;
    let n = gid.z;
    if (k >= k4 || p >= prm.positions || n >= prm.n_images) {
        return;
    }
    var v = 0.0;
    if (k < prm.k) {
        v = exp(l[(n * prm.k + k) * prm.positions + p] - logp_all[prm.logp_offset + n]);
    }
    gpost[(n * prm.positions + p) * k4 + k] = v;
}
