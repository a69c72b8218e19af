// Posteriors of one batch, transposed for the M-step:
//
//   G[n, p, k] = exp(gamma[n,k,p]) = exp(L[n,k,p] - logp[n])      (0 for the padding k >= K)
//
// Shapes: l (n_images, K, P); logp_all (N); gpost (n_images, P, KP) with KP = K rounded up to a
// multiple of 8 (kpad()), so the M-step reads four kernels' posteriors as one vec4.
// A workgroup transposes a 32 (p) x 32 (k) tile of one image through workgroup memory, so both
// the reads of L (along p) and the writes of G (along k) are contiguous.
// Materialising G costs one read of L and one write of G per batch, small beside the two GEMMs,
// and spares the M-step an exp() per element per column tile.

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read> logp_all: array<f32>;
@group(0) @binding(3) var<storage, read_write> gpost: array<f32>;

var<workgroup> tile: array<f32, 1056>;   // 32 x 33: the extra column avoids bank conflicts

@compute @workgroup_size(32, 8, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let p0 = wid.x * 32u;
    let k0 = wid.y * 32u;
    let n = wid.z;
    let kp = kpad();
    let lp = logp_all[prm.logp_offset + n];
    for (var j = 0u; j < 4u; j++) {
        let k = k0 + lid.y + 8u * j;
        let p = p0 + lid.x;
        var v = 0.0;
        if (k < prm.k && p < prm.positions) {
            v = exp(l[(n * prm.k + k) * prm.positions + p] - lp);
        }
        tile[(lid.y + 8u * j) * 33u + lid.x] = v;
    }
    workgroupBarrier();
    for (var j = 0u; j < 4u; j++) {
        let p = p0 + lid.y + 8u * j;
        let k = k0 + lid.x;
        if (p < prm.positions && k < kp) {
            gpost[(n * prm.positions + p) * kp + k] = tile[lid.x * 33u + lid.y + 8u * j];
        }
    }
}
