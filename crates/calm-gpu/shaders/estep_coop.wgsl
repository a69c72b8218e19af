// E-step on the tensor cores ([`Variant::Coop`]): a batch's L through cooperative matrices,
// each f32 operand split into two f16 parts (Ootomo & Yokota, 2022).
//
//   L^T[m, k] = sum_r A[m, r] theta[k, r] + bias[k]     (the GEMM of estep.wgsl, same layouts)
//
// An operand v (a pixel of the patch A[m, r], or theta[k, r]) is split as
//   hi = v to 11 significant bits,   lo = f16((v - hi) * 2^11),   v = hi + lo * 2^-11
// (to 2^-21 relative, see split)
// and the product as three f16 x f16 -> f32 products on the tensor cores:
//   main = sum_r hi_A hi_B,   corr = sum_r (hi_A lo_B + lo_A hi_B),   L = main + corr * 2^-11 + bias
// (the lo x lo term, 2^-22 of the product, is left out). lo is scaled by 2^11 so that it keeps
// its bits where v is small instead of falling into f16's subnormals; `corr` has its own
// accumulator so that the 2^11 scale never meets `main`. Every product of two f16 is exact in
// f32; the sums are the tensor cores' f32 accumulation. `cpu::coop` is this kernel's CPU twin
// (the same splits, the same 16-step chunks) and states the accuracy contract.
//
// Operands must be finite and below f16's 65504 in magnitude (pixels, whitened pixels and
// theta are far below it); the host checks before it chooses this kernel.
//
// Tiling: a workgroup of 4 subgroups of SG invocations (SG: the adapter's one subgroup size, set
// by the host) computes TM = 64 positions x TN = 64 kernels, each subgroup a 32 x 32 quarter as
// 2 x 2 16x16 matrices. Each stage stages BK = 16 steps of R: the A tile (64 x 16) and the theta
// tile (16 x 64), split into their f16 halves, in workgroup memory; then each subgroup loads its
// 16x16 operands from there and multiplies. The results leave through workgroup memory, a
// 16x16 matrix at a time, with the bias and the tile-edge guards (any P, K and batch size).
//
// Bindings as estep.wgsl: x (images of this data buffer, C, Hp, Wp); theta_t (R, KP); bias (K);
// off (R); l (n_images, K, Ho*Wo).

enable f16;
enable wgpu_cooperative_matrix;

const SG: u32 = 32u;        // invocations per subgroup (the host sets the adapter's)
const NT: u32 = 4u * SG;    // invocations per workgroup: four subgroups
const TM: u32 = 64u;        // positions per workgroup
const TN: u32 = 64u;        // kernels per workgroup
const BK: u32 = 16u;        // reduction steps per stage: one matrix's depth
const LO_SCALE: f32 = 2048.0;          // 2^11
const LO_UNSCALE: f32 = 0.00048828125; // 2^-11
const F16_MIN_NORMAL: f32 = 6.103515625e-5; // 2^-14

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> theta_t: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> off: array<u32>;
@group(0) @binding(5) var<storage, read_write> l: array<f32>;

var<workgroup> a_hi: array<f16, TM * BK>;   // [m][kk], row-major, stride BK
var<workgroup> a_lo: array<f16, TM * BK>;
var<workgroup> b_hi: array<f16, BK * TN>;   // [kk][n], row-major, stride TN
var<workgroup> b_lo: array<f16, BK * TN>;
var<workgroup> row_base: array<u32, TM>;
var<workgroup> out_main: array<f32, 4u * 256u>;  // one 16x16 result per subgroup, [m][n]
var<workgroup> out_corr: array<f32, 4u * 256u>;

// v as (hi, lo). hi is v truncated to f16's 11 significant bits by clearing the low 13
// mantissa bits of its f32 form: exactly an f16 where |v| >= 2^-14 (f16's normal range; below
// it hi = 0, and lo carries v alone). lo = f16((v - hi) 2^11), v - hi exact in f32. Bits, not
// f16(v) and back: a compiler may fold f32(f16(v)) into v (NVIDIA's Vulkan driver did, and lo
// came out zero), which this leaves nothing to fold.
fn split(v: f32) -> vec2<f16> {
    let small = abs(v) < F16_MIN_NORMAL;
    let hi = select(bitcast<f32>(bitcast<u32>(v) & 0xffffe000u), 0.0, small);
    return vec2<f16>(f16(hi), f16((v - hi) * LO_SCALE));
}

// One 16x16 result of subgroup `s`, matrix (i, j) of its quarter, out to l with the bias.
fn store_result(s: u32, lane: u32, m_first: u32, k_first: u32, mtot: u32) {
    for (var e = lane; e < 256u; e += SG) {
        let row = e / 16u;
        let col = e - row * 16u;
        let m = m_first + row;
        let k = k_first + col;
        if (m < mtot && k < prm.k) {
            let n = m / prm.positions;
            let at = s * 256u + e;
            l[n * prm.k * prm.positions + k * prm.positions + (m - n * prm.positions)] =
                out_main[at] + out_corr[at] * LO_UNSCALE + bias[k];
        }
    }
}

@compute @workgroup_size(NT, 1, 1)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) s: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let m0 = wid.x * TM;
    let n0 = wid.y * TN;
    let mtot = prm.n_images * prm.positions;
    let kp = kpad();
    // This subgroup's quarter: positions sm * 32 .., kernels sn * 32 ..
    let sm = s / 2u;
    let sn = s - sm * 2u;

    for (var i = lid; i < TM; i += NT) {
        let m = m0 + i;
        var base = 0u;
        if (m < mtot) {
            base = patch_base(m);
        }
        row_base[i] = base;
    }
    workgroupBarrier();

    var main_00 = coop_mat16x16<f32, C>();
    var main_01 = coop_mat16x16<f32, C>();
    var main_10 = coop_mat16x16<f32, C>();
    var main_11 = coop_mat16x16<f32, C>();
    var corr_00 = coop_mat16x16<f32, C>();
    var corr_01 = coop_mat16x16<f32, C>();
    var corr_10 = coop_mat16x16<f32, C>();
    var corr_11 = coop_mat16x16<f32, C>();

    for (var r0 = 0u; r0 < prm.r; r0 += BK) {
        // Stage: the A tile (patches; rows past the batch read row_base 0, a valid unused value)
        // and the theta tile, zero past R and KP, split into f16 halves.
        for (var e = lid; e < TM * BK; e += NT) {
            let mm = e / BK;
            let kk = e - mm * BK;
            let r = r0 + kk;
            var v = 0.0;
            if (r < prm.r) {
                v = x[row_base[mm] + off[r]];
            }
            let h = split(v);
            a_hi[e] = h.x;
            a_lo[e] = h.y;
        }
        for (var e = lid; e < BK * TN; e += NT) {
            let kk = e / TN;
            let nn = e - kk * TN;
            let r = r0 + kk;
            let k = n0 + nn;
            var v = 0.0;
            if (r < prm.r && k < kp) {
                v = theta_t[r * kp + k];
            }
            let h = split(v);
            b_hi[e] = h.x;
            b_lo[e] = h.y;
        }
        workgroupBarrier();

        let a0 = (sm * 32u) * BK;
        let a1 = (sm * 32u + 16u) * BK;
        let b0 = sn * 32u;
        let b1 = sn * 32u + 16u;
        let ah0 = coopLoadT<coop_mat16x16<f16, A>>(&a_hi[a0], BK);
        let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&a_hi[a1], BK);
        let al0 = coopLoadT<coop_mat16x16<f16, A>>(&a_lo[a0], BK);
        let al1 = coopLoadT<coop_mat16x16<f16, A>>(&a_lo[a1], BK);
        let bh0 = coopLoadT<coop_mat16x16<f16, B>>(&b_hi[b0], TN);
        let bh1 = coopLoadT<coop_mat16x16<f16, B>>(&b_hi[b1], TN);
        let bl0 = coopLoadT<coop_mat16x16<f16, B>>(&b_lo[b0], TN);
        let bl1 = coopLoadT<coop_mat16x16<f16, B>>(&b_lo[b1], TN);
        main_00 = coopMultiplyAdd(ah0, bh0, main_00);
        main_01 = coopMultiplyAdd(ah0, bh1, main_01);
        main_10 = coopMultiplyAdd(ah1, bh0, main_10);
        main_11 = coopMultiplyAdd(ah1, bh1, main_11);
        corr_00 = coopMultiplyAdd(ah0, bl0, corr_00);
        corr_01 = coopMultiplyAdd(ah0, bl1, corr_01);
        corr_10 = coopMultiplyAdd(ah1, bl0, corr_10);
        corr_11 = coopMultiplyAdd(ah1, bl1, corr_11);
        corr_00 = coopMultiplyAdd(al0, bh0, corr_00);
        corr_01 = coopMultiplyAdd(al0, bh1, corr_01);
        corr_10 = coopMultiplyAdd(al1, bh0, corr_10);
        corr_11 = coopMultiplyAdd(al1, bh1, corr_11);
        workgroupBarrier();
    }

    // The four results, one at a time through workgroup memory.
    let mq = m0 + sm * 32u;
    let kq = n0 + sn * 32u;
    let at = s * 256u;
    coopStoreT(main_00, &out_main[at], 16u);
    coopStoreT(corr_00, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq, kq, mtot);
    workgroupBarrier();
    coopStoreT(main_01, &out_main[at], 16u);
    coopStoreT(corr_01, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq, kq + 16u, mtot);
    workgroupBarrier();
    coopStoreT(main_10, &out_main[at], 16u);
    coopStoreT(corr_10, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 16u, kq, mtot);
    workgroupBarrier();
    coopStoreT(main_11, &out_main[at], 16u);
    coopStoreT(corr_11, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 16u, kq + 16u, mtot);
}
