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
// Tiling: a workgroup of WM x WN subgroups of SG invocations (SG: the adapter's one subgroup
// size, set by the host) computes TM = WM MI 16 positions x TN = WN NJ 16 kernels, each
// subgroup a block of MI x NJ 16x16 matrices (gpu::kernels::CoopTiles; this file holds the
// default, 2 x 2 subgroups of 2 x 2 matrices, BK 16). Each stage stages BK steps of R: the A
// tile (TM x BK) and the theta tile (BK x TN), split into their f16 halves, in workgroup memory;
// then each subgroup loads its 16x16 operands from there and multiplies. The results leave
// through workgroup memory, a 16x16 matrix at a time, with the bias and the tile-edge guards
// (any P, K and batch size).
//
// Bindings as estep.wgsl: x (images of this data buffer, C, Hp, Wp); theta_t (R, KP); bias (K);
// off (R); l (n_images, K, Ho*Wo).

enable f16;
enable wgpu_cooperative_matrix;

const SG: u32 = 32u;        // invocations per subgroup (the host sets the adapter's)
const WM: u32 = 2u;         // subgroups along positions
const WN: u32 = 2u;         // subgroups along kernels
const MI: u32 = 2u;         // 16x16 matrices per subgroup along positions
const NJ: u32 = 2u;         // 16x16 matrices per subgroup along kernels
const BK: u32 = 16u;        // reduction steps per stage: a multiple of a matrix's depth, 16
const NT: u32 = WM * WN * SG;   // invocations per workgroup
const TM: u32 = WM * MI * 16u;  // positions per workgroup
const TN: u32 = WN * NJ * 16u;  // kernels per workgroup
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
var<workgroup> out_main: array<f32, WM * WN * 256u>;  // one 16x16 result per subgroup, [m][n]
var<workgroup> out_corr: array<f32, WM * WN * 256u>;

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
    // This subgroup's block: positions sm * MI * 16 .., kernels sn * NJ * 16 ..
    let sm = s / WN;
    let sn = s - sm * WN;

    for (var i = lid; i < TM; i += NT) {
        let m = m0 + i;
        var base = 0u;
        if (m < mtot) {
            base = patch_base(m);
        }
        row_base[i] = base;
    }
    workgroupBarrier();

    // The accumulators, main_i_j and corr_i_j for the block's MI x NJ matrices (generated by
    // gpu::codegen::coop_text for the constants above).
    // <generated coop_acc>
    var main_0_0 = coop_mat16x16<f32, C>();
    var corr_0_0 = coop_mat16x16<f32, C>();
    var main_0_1 = coop_mat16x16<f32, C>();
    var corr_0_1 = coop_mat16x16<f32, C>();
    var main_1_0 = coop_mat16x16<f32, C>();
    var corr_1_0 = coop_mat16x16<f32, C>();
    var main_1_1 = coop_mat16x16<f32, C>();
    var corr_1_1 = coop_mat16x16<f32, C>();
    // </generated coop_acc>

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

        // Each 16-step slice t of the stage: the block's operands from workgroup memory, then
        // main += hi hi, corr += hi lo, corr += lo hi for every matrix of the block.
        for (var t = 0u; t < BK; t += 16u) {
            // <generated coop_mma>
            let ah0 = coopLoadT<coop_mat16x16<f16, A>>(&a_hi[(sm * MI * 16u + 0u) * BK + t], BK);
            let al0 = coopLoadT<coop_mat16x16<f16, A>>(&a_lo[(sm * MI * 16u + 0u) * BK + t], BK);
            let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&a_hi[(sm * MI * 16u + 16u) * BK + t], BK);
            let al1 = coopLoadT<coop_mat16x16<f16, A>>(&a_lo[(sm * MI * 16u + 16u) * BK + t], BK);
            let bh0 = coopLoadT<coop_mat16x16<f16, B>>(&b_hi[t * TN + sn * NJ * 16u + 0u], TN);
            let bl0 = coopLoadT<coop_mat16x16<f16, B>>(&b_lo[t * TN + sn * NJ * 16u + 0u], TN);
            let bh1 = coopLoadT<coop_mat16x16<f16, B>>(&b_hi[t * TN + sn * NJ * 16u + 16u], TN);
            let bl1 = coopLoadT<coop_mat16x16<f16, B>>(&b_lo[t * TN + sn * NJ * 16u + 16u], TN);
            main_0_0 = coopMultiplyAdd(ah0, bh0, main_0_0);
            main_0_1 = coopMultiplyAdd(ah0, bh1, main_0_1);
            main_1_0 = coopMultiplyAdd(ah1, bh0, main_1_0);
            main_1_1 = coopMultiplyAdd(ah1, bh1, main_1_1);
            corr_0_0 = coopMultiplyAdd(ah0, bl0, corr_0_0);
            corr_0_1 = coopMultiplyAdd(ah0, bl1, corr_0_1);
            corr_1_0 = coopMultiplyAdd(ah1, bl0, corr_1_0);
            corr_1_1 = coopMultiplyAdd(ah1, bl1, corr_1_1);
            corr_0_0 = coopMultiplyAdd(al0, bh0, corr_0_0);
            corr_0_1 = coopMultiplyAdd(al0, bh1, corr_0_1);
            corr_1_0 = coopMultiplyAdd(al1, bh0, corr_1_0);
            corr_1_1 = coopMultiplyAdd(al1, bh1, corr_1_1);
            // </generated coop_mma>
        }
        workgroupBarrier();
    }

    // The block's results, one matrix at a time through workgroup memory.
    let mq = m0 + sm * MI * 16u;
    let kq = n0 + sn * NJ * 16u;
    let at = s * 256u;
    // <generated coop_store>
    coopStoreT(main_0_0, &out_main[at], 16u);
    coopStoreT(corr_0_0, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 0u, kq + 0u, mtot);
    workgroupBarrier();
    coopStoreT(main_0_1, &out_main[at], 16u);
    coopStoreT(corr_0_1, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 0u, kq + 16u, mtot);
    workgroupBarrier();
    coopStoreT(main_1_0, &out_main[at], 16u);
    coopStoreT(corr_1_0, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 16u, kq + 0u, mtot);
    workgroupBarrier();
    coopStoreT(main_1_1, &out_main[at], 16u);
    coopStoreT(corr_1_1, &out_corr[at], 16u);
    workgroupBarrier();
    store_result(s, lane, mq + 16u, kq + 16u, mtot);
    // </generated coop_store>
}
