// Features: log-sum-exp of L over each of grid x grid regions of the positions,
//
//   f[n, k, a, b] = log sum_{(h,w) in region (a,b)} exp(L[n,k,h,w]),
//
// region (a, b) holding rows [a Ho / grid, (a+1) Ho / grid) and columns [b Wo / grid,
// (b+1) Wo / grid). grid = 1 is SPEC's image-wide feature f[n,k] = logsumexp_{h,w} L[n,k,h,w].
// One workgroup per (k, n, region) of the batch.
//
// Shapes: l (n_images, K, Ho*Wo); f (n_images, K, grid, grid), this batch's rows (read back by
// the host). Online (max, sum) pairs per thread merged in a fixed tree (params.wgsl's lse_*).

const WGS: u32 = 64u;

@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(2) var<storage, read_write> f: array<f32>;

var<workgroup> red: array<vec2<f32>, WGS>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = wid.x;
    let n = wid.y;
    let region = wid.z;
    let reg = pool_region(region);
    let base = (n * prm.k + k) * prm.positions;
    var acc = LSE_EMPTY;
    for (var e = lid; e < reg.w; e += WGS) {
        acc = lse_push(acc, l[base + pool_position(reg, e)]);
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var stride = WGS / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            red[lid] = lse_merge(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        f[(n * prm.k + k) * prm.grid * prm.grid + region] = red[0].x + log(red[0].y);
    }
}
