//! The compute pipelines: one WGSL file per kernel (in `shaders/`), built once per device.
//!
//! Shapes are never baked into the shader text: they travel in the `Params` uniform. Only the
//! tiles of the GEMM kernels are, because WGSL needs them as constants to size private and
//! workgroup arrays: [`super::codegen`] sets them and writes the register blocks.

use crate::error::{CalmError, Result};

/// `shaders/params.wgsl`: the `Params` uniform and the helpers every kernel is prepended with.
pub const PARAMS: &str = include_str!("../../shaders/params.wgsl");
/// `shaders/estep.wgsl`: the staged E-step, a batch's `L` (the convolution plus the bias).
pub const ESTEP: &str = include_str!("../../shaders/estep.wgsl");
/// `shaders/estep_direct.wgsl`: the E-step without workgroup memory ([`Variant::Direct`]).
pub const ESTEP_DIRECT: &str = include_str!("../../shaders/estep_direct.wgsl");
/// `shaders/posterior.wgsl`: a batch's posteriors `G = exp(L - logp)`, `(n, P, KP)`.
pub const POSTERIOR: &str = include_str!("../../shaders/posterior.wgsl");
/// `shaders/mstep_direct.wgsl`: the M-step without workgroup memory ([`Variant::Direct`]).
pub const MSTEP_DIRECT: &str = include_str!("../../shaders/mstep_direct.wgsl");
/// `shaders/logsumexp.wgsl`: `logp[n]`, the log-sum-exp of each image's `L`.
pub const LOGSUMEXP: &str = include_str!("../../shaders/logsumexp.wgsl");
/// `shaders/mstep.wgsl`: the staged M-step, a batch's `T` and `B` as partial sums over chunks.
pub const MSTEP: &str = include_str!("../../shaders/mstep.wgsl");
/// `shaders/reduce_stats.wgsl`: adds a batch's partial sums to the epoch's statistics.
pub const REDUCE_STATS: &str = include_str!("../../shaders/reduce_stats.wgsl");
/// `shaders/update.wgsl`: the end-of-epoch update, `B'` and `theta = T / B'`.
pub const UPDATE: &str = include_str!("../../shaders/update.wgsl");
/// `shaders/summary.wgsl`: the epoch's `LL`, `S` and whether everything is finite.
pub const SUMMARY: &str = include_str!("../../shaders/summary.wgsl");
/// `shaders/features.wgsl`: the log-sum-exp of `L` over each pooling region.
pub const FEATURES: &str = include_str!("../../shaders/features.wgsl");
/// `shaders/tri_mean.wgsl`: triangle features, pass 1: each patch's norm and mean distance.
pub const TRI_MEAN: &str = include_str!("../../shaders/tri_mean.wgsl");
/// `shaders/features_tri.wgsl`: triangle features, pass 2: the encoding summed over each region.
pub const FEATURES_TRI: &str = include_str!("../../shaders/features_tri.wgsl");
/// `shaders/estep_ubo.wgsl`: the E-step reading `theta` from uniform buffers
/// ([`Variant::Uniform`]).
pub const ESTEP_UBO: &str = include_str!("../../shaders/estep_ubo.wgsl");
/// `shaders/mstep_ubo.wgsl`: the M-step reading `G` from uniform buffers ([`Variant::Uniform`]).
pub const MSTEP_UBO: &str = include_str!("../../shaders/mstep_ubo.wgsl");

/// `shaders/estep_coop.wgsl`: the E-step on the tensor cores through cooperative matrices, each
/// operand split into two f16 parts ([`Variant::Coop`]; its CPU twin is [`crate::cpu::coop`]).
/// Not in [`ALL`]: it needs the f16, cooperative-matrix and subgroup capabilities, which only
/// some adapters have (tests/shaders.rs validates it with them).
pub const ESTEP_COOP: &str = include_str!("../../shaders/estep_coop.wgsl");

/// `shaders/norm_estep.wgsl`: contrast-normalised patches, `L` made the normalised patches'.
pub const NORM_ESTEP: &str = include_str!("../../shaders/norm_estep.wgsl");
/// `shaders/norm_shift.wgsl`: contrast-normalised patches, `L` shifted by `log(1 / s)` for the
/// M-step.
pub const NORM_SHIFT: &str = include_str!("../../shaders/norm_shift.wgsl");
/// `shaders/norm_correct.wgsl`: contrast-normalised patches, the M-step's sums corrected.
pub const NORM_CORRECT: &str = include_str!("../../shaders/norm_correct.wgsl");

/// Every kernel with its name, for validation and tests.
pub const ALL: [(&str, &str); 17] = [
    ("estep", ESTEP),
    ("estep_direct", ESTEP_DIRECT),
    ("estep_ubo", ESTEP_UBO),
    ("mstep_ubo", MSTEP_UBO),
    ("posterior", POSTERIOR),
    ("mstep_direct", MSTEP_DIRECT),
    ("logsumexp", LOGSUMEXP),
    ("mstep", MSTEP),
    ("reduce_stats", REDUCE_STATS),
    ("update", UPDATE),
    ("summary", SUMMARY),
    ("features", FEATURES),
    ("tri_mean", TRI_MEAN),
    ("features_tri", FEATURES_TRI),
    ("norm_estep", NORM_ESTEP),
    ("norm_shift", NORM_SHIFT),
    ("norm_correct", NORM_CORRECT),
];

/// Mirrors `struct Params` in `shaders/params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Images in this batch.
    pub n_images: u32,
    /// Index of the batch's first image in the bound data buffer.
    pub x_offset: u32,
    /// Kernels `K`.
    pub k: u32,
    /// `R = C * w * w`.
    pub r: u32,
    /// `P = Ho * Wo`.
    pub positions: u32,
    /// Positions per row, `Wo`.
    pub wo: u32,
    /// Padded image width `W + 2p`.
    pub wp: u32,
    /// Floats per padded image, `C * (H + 2p) * (W + 2p)`.
    pub img_stride: u32,
    /// Index of the batch's first image in the epoch (in `logp_all`).
    pub logp_offset: u32,
    /// M-step: images per reduction chunk (one partial sum each).
    pub imgs_per_chunk: u32,
    /// M-step: chunks in this batch.
    pub n_chunks: u32,
    /// Images in the whole dataset `N`.
    pub n_total: u32,
    /// Features: pooling regions per axis (1: image-wide, SPEC's features).
    pub grid: u32,
    /// Contrast-normalised patches' `eps` ([`crate::Geometry::patch_norm`]); 0: raw patches.
    pub norm_eps: f32,
    /// Padding to 64 bytes.
    pub pad: [u32; 2],
}

/// Register-tile shape of the two GEMM kernels. Each workgroup has `wx` threads along the tile's
/// first axis (positions in the E-step, columns `r` in the M-step) and `wy` along kernels; 256
/// in all unless `CALM_TILES` says `@WXxWY` (any count up to 1024 the adapter allows), so that a
/// tile's width can divide R (400 columns for the MNIST protocol: 80-column tiles of 20 x 16
/// threads waste none, 64-column ones compute 448).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// E-step: positions per thread (`RM`).
    pub e_rm: u32,
    /// E-step: kernels per thread (`RN`).
    pub e_rn: u32,
    /// E-step: the reduction slice `BK`, rows of `R` per stage.
    pub e_bk: u32,
    /// E-step: threads along positions (`WX`).
    pub e_wx: u32,
    /// E-step: threads along kernels (`WY`).
    pub e_wy: u32,
    /// M-step: kernels per thread (`RK`).
    pub m_rk: u32,
    /// M-step: columns per thread (`RR`).
    pub m_rr: u32,
    /// M-step: the reduction slice `BK`, positions per stage.
    pub m_bk: u32,
    /// M-step: threads along columns (`WX`).
    pub m_wx: u32,
    /// M-step: threads along kernels (`WY`).
    pub m_wy: u32,
    /// The BK reduction steps of a stage written out by the host (`u` after WX in `CALM_TILES`)
    /// instead of a loop the driver may or may not unroll: workgroup-memory addresses become
    /// constant offsets, no loop counter or branch per step.
    pub e_unroll: bool,
    /// [`Tiles::e_unroll`] for the M-step.
    pub m_unroll: bool,
    /// Double-buffered tiles (`d` after WX in `CALM_TILES`): two stages in workgroup memory, the
    /// next stored while the current one is read, one barrier per stage instead of two; twice
    /// the tiles' workgroup memory.
    pub e_double: bool,
    /// [`Tiles::e_double`] for the M-step.
    pub m_double: bool,
    /// The staged M-step computes the posteriors `exp(L - logp)` while loading its G tiles
    /// (`p` after the M-step's WX in `CALM_TILES`) instead of reading them from the `G` buffer
    /// that `posterior.wgsl` writes: that pass (one read of `L`, one write of `G` per batch,
    /// memory-bound) is skipped, for an `exp` per element per column tile.
    pub m_fused: bool,
    /// Lane-strided register blocks (`s` after WX in `CALM_TILES`): a thread's RM positions (E)
    /// or RR columns (M) are RM / 4 groups of 4 that lie WX groups apart instead of side by
    /// side, so that neighbouring threads read neighbouring vec4s of the A tile (no 2-way bank
    /// conflict when RM is 8) and write neighbouring outputs.
    pub e_strided: bool,
    /// [`Tiles::e_strided`] for the M-step.
    pub m_strided: bool,
    /// The E-step writes its tile of `L` through workgroup memory (`c` after the E-step's WX in
    /// `CALM_TILES`): after the last stage, the results are put into the A tile a few kernels
    /// at a time and written out with neighbouring threads on neighbouring positions, so that a
    /// warp's store fills whole 32-byte sectors. Without it each thread writes its RM positions
    /// of a kernel itself, and a warp's 32 stores land RM (or 4, strided) floats apart: one
    /// sector per float, 8 times the bytes the L2 cache has to take for 8 x 8 blocks.
    pub e_coalesced: bool,
    /// The A tile (patch values) in a transposed layout (`g` after WX in `CALM_TILES`): each of
    /// its vec4s holds four positions (E) or columns (M) a quarter of the tile apart instead of
    /// four neighbours, so that in each of the four loads behind a vec4 neighbouring threads
    /// read neighbouring positions or columns: a warp's gather reads runs of the image, and its
    /// reads of `row_base` (E) or `off` (M) are consecutive, about a quarter of the memory
    /// transactions for the same loads. Each thread's register block then covers positions or
    /// columns a quarter of the tile apart, and its stores follow (`P_STEP`, `P_GAP` in the
    /// shaders).
    pub e_gather: bool,
    /// [`Tiles::e_gather`] for the M-step.
    pub m_gather: bool,
    /// The uniform-buffer kernels (`*_ubo.wgsl`, [`Variant::Uniform`]): E-step positions per
    /// thread (`u=RMxRR` in `CALM_TILES` sets this and `u_rr`).
    pub u_rm: u32,
    /// Uniform-buffer M-step: columns per thread.
    pub u_rr: u32,
    /// Uniform-buffer kernels: kernels per workgroup (both steps; a multiple of 4), set from K by
    /// [`Tiles::for_shape`] whatever the tiles' origin, and not part of the `CALM_TILES` string.
    pub u_tn: u32,
    /// The tensor-core E-step's shape ([`Variant::Coop`]; `c=` in `CALM_TILES`).
    pub coop: CoopTiles,
}

/// The shape of the tensor-core E-step (`estep_coop.wgsl`): a workgroup of `wm x wn` subgroups,
/// each a block of `mi x nj` 16x16 result matrices (positions x kernels), `bk` reduction steps
/// staged per barrier. `c=MIxNJxBK@WMxWN` in `CALM_TILES`; the default `2x2x16@2x2` is 64 x 64
/// results per workgroup of four subgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopTiles {
    /// Subgroups along positions.
    pub wm: u32,
    /// Subgroups along kernels.
    pub wn: u32,
    /// Matrices per subgroup along positions.
    pub mi: u32,
    /// Matrices per subgroup along kernels.
    pub nj: u32,
    /// Reduction steps per stage, a multiple of 16.
    pub bk: u32,
}

impl Default for CoopTiles {
    fn default() -> Self {
        Self {
            wm: 2,
            wn: 2,
            mi: 2,
            nj: 2,
            bk: 16,
        }
    }
}

impl CoopTiles {
    /// Positions per workgroup, `TM = WM MI 16`.
    pub fn tm(&self) -> u32 {
        self.wm * self.mi * 16
    }

    /// Kernels per workgroup, `TN = WN NJ 16`.
    pub fn tn(&self) -> u32 {
        self.wn * self.nj * 16
    }

    /// Subgroups per workgroup.
    pub fn subgroups(&self) -> u32 {
        self.wm * self.wn
    }

    /// Workgroup memory: the f16 halves of the A and theta tiles, the tile's patch starts, and
    /// two 16x16 f32 results per subgroup.
    pub fn workgroup_bytes(&self) -> u32 {
        2 * 2 * self.tm() * self.bk
            + 2 * 2 * self.bk * self.tn()
            + 4 * self.tm()
            + 2 * 4 * 256 * self.subgroups()
    }

    /// Its rules: 1 to 4 subgroups and 1 to 4 matrices along each axis, at most 8 matrices per
    /// subgroup (two f32 accumulators each: 16 of 8 registers a lane on a 32-wide subgroup), BK
    /// 16 to 64 in steps of 16.
    pub fn check(&self) -> std::result::Result<(), String> {
        let in_range = |v: u32| (1..=4).contains(&v);
        if ![self.wm, self.wn, self.mi, self.nj]
            .into_iter()
            .all(in_range)
        {
            return Err(format!(
                "tensor-core tiles {self}: 1 to 4 subgroups and matrices along each axis are allowed"
            ));
        }
        if self.mi * self.nj > 8 {
            return Err(format!(
                "tensor-core tiles {self}: at most 8 matrices per subgroup are allowed"
            ));
        }
        if !(16..=64).contains(&self.bk) || !self.bk.is_multiple_of(16) {
            return Err(format!(
                "tensor-core tiles {self}: BK 16, 32, 48 or 64 is allowed"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for CoopTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{}@{}x{}",
            self.mi, self.nj, self.bk, self.wm, self.wn
        )
    }
}

impl Default for Tiles {
    /// 128 x 64 E-step tiles and 64 x 64 M-step tiles of 16 stages: 12 KiB of workgroup memory
    /// each, inside WebGPU's portable 16 KiB. The fastest measured on an H100 for the MNIST
    /// protocol (docs/perf.md).
    fn default() -> Self {
        Self {
            e_rm: 8,
            e_rn: 4,
            e_bk: 16,
            e_wx: 16,
            e_wy: 16,
            m_rk: 4,
            m_rr: 4,
            m_bk: 16,
            m_wx: 16,
            m_wy: 16,
            e_strided: false,
            m_strided: false,
            e_coalesced: false,
            e_gather: false,
            m_gather: false,
            e_unroll: false,
            m_unroll: false,
            e_double: false,
            m_double: false,
            m_fused: false,
            u_rm: 4,
            u_rr: 4,
            u_tn: 64,
            coop: CoopTiles::default(),
        }
    }
}

impl Tiles {
    /// Tiles for `k` kernels of `r = C w w` weights on an adapter allowing `wg_bytes` of
    /// workgroup memory, as `calm-gpu tune` measured fastest on an H200 through Vulkan
    /// (docs/perf.md, 2026-11-29): in the E-step 8 x 8 register blocks with 32 x 8 threads
    /// (256 positions x 64 kernels per tile), lane-strided (`s`), and for K up to 64 with the
    /// steps written out (`u`: MNIST E-step 19.6 ms against 25.8 without either); in the M-step
    /// 4 x 4 blocks on a 64 x 64 tile for small K (`u`), 8 x 8 blocks on a 256-kernel x 64-column
    /// tile from K = 128 (`s`). The STL-10 protocol's layer (K 200, R 675) gets the tiles that fit
    /// it: 16 x 25 threads over all 200 kernels in the E-step, 17 x 50 threads of 4 x 8 blocks
    /// (200 kernels x 136 columns) in the M-step (epoch 160.9 ms against 195.9). Where the
    /// adapter allows only WebGPU's portable 16 KiB, the 12 KiB default.
    pub fn for_shape(k: usize, r: usize, wg_bytes: u32) -> Self {
        let mut t = Self {
            u_tn: Self::uniform_tn(k),
            ..Self::default()
        };
        if (k, r) == (200, 675) {
            let stl = Self {
                e_rm: 8,
                e_rn: 8,
                e_bk: 16,
                e_wx: 16,
                e_wy: 25,
                e_strided: true,
                m_rk: 4,
                m_rr: 8,
                m_bk: 16,
                m_wx: 17,
                m_wy: 50,
                m_strided: true,
                ..t
            };
            let (e, m) = stl.workgroup_bytes();
            if e.max(m) <= wg_bytes {
                return stl;
            }
        }
        let e_big = Self {
            e_rm: 8,
            e_rn: 8,
            e_bk: 16,
            e_wx: 32,
            e_wy: 8,
            e_strided: true,
            e_unroll: k <= 64,
            ..t
        };
        if e_big.workgroup_bytes().0 <= wg_bytes {
            t = e_big;
        }
        if k <= 64 {
            t.m_unroll = true;
        }
        let m_big = Self {
            m_rk: 8,
            m_rr: 8,
            m_bk: 16,
            m_wx: 8,
            m_wy: 32,
            m_strided: true,
            ..t
        };
        if k >= 128 && m_big.workgroup_bytes().1 <= wg_bytes {
            t = m_big;
        }
        t
    }

    /// The uniform-buffer kernels' kernels per workgroup for K kernels: all of them (rounded up
    /// to 8) up to 64; beyond, the fewest blocks of at most 64, as equal as multiples of 4 allow
    /// (K 200: 4 blocks of 52, 208 kernels computed, where blocks of 64 would compute 256).
    pub fn uniform_tn(k: usize) -> u32 {
        let kp = k.div_ceil(8) * 8;
        let blocks = kp.div_ceil(64);
        (kp.div_ceil(blocks).div_ceil(4) * 4) as u32
    }

    /// E-step positions per tile, `e_wx * e_rm`.
    pub fn e_tm(&self) -> u32 {
        self.e_wx * self.e_rm
    }
    /// E-step kernels per tile, `e_wy * e_rn`.
    pub fn e_tn(&self) -> u32 {
        self.e_wy * self.e_rn
    }
    /// M-step columns per tile, `m_wx * m_rr`.
    pub fn m_tr(&self) -> u32 {
        self.m_wx * self.m_rr
    }
    /// M-step kernels per tile, `m_wy * m_rk`.
    pub fn m_tk(&self) -> u32 {
        self.m_wy * self.m_rk
    }

    /// Threads per workgroup of the E-step and of the M-step.
    pub fn threads(&self) -> (u32, u32) {
        (self.e_wx * self.e_wy, self.m_wx * self.m_wy)
    }

    /// Workgroup memory the two GEMM kernels need, in bytes.
    pub fn workgroup_bytes(&self) -> (u32, u32) {
        let bufs = |double: bool| if double { 2 } else { 1 };
        let e = bufs(self.e_double) * self.e_bk * (self.e_tm() + self.e_tn()) * 4 + self.e_tm() * 4;
        let m = bufs(self.m_double) * self.m_bk * (self.m_tk() + self.m_tr()) * 4;
        (e, m)
    }

    /// Parses `e=RMxRNxBK[@WX[xWY][s][u][d][g][c]],m=RKxRRxBK[@WX[xWY][s][u][d][g][p]][,u=RMxRR]` (the
    /// `CALM_TILES` variable, for tuning); `WX` threads along the tile's first axis and `WY`
    /// along kernels (`256 / WX` if left out), `s` asks for lane-strided register blocks, `u`
    /// for the steps written out, `d` for double-buffered tiles, `g` for the A tile's transposed
    /// layout ([`Tiles::e_gather`]), `c` (E-step) for stores through
    /// workgroup memory ([`Tiles::e_coalesced`]), `p` (M-step) for the posteriors computed
    /// while loading ([`Tiles::m_fused`]); `u=` sets the uniform-buffer
    /// kernels' positions and columns per thread. Parts left out keep their defaults. Whether
    /// the adapter allows the thread counts and workgroup memory is checked when the engine is
    /// built.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            CalmError::Invalid(format!(
                "tiles `{s}`: expected e=RMxRNxBK[@WX[xWY][s][u][d][g][c]],m=RKxRRxBK[@WX[xWY][s][u][d][g][p]][,u=RMxRR][,c=MIxNJxBK@WMxWN] with RM, RN, RK, RR multiples of 4 up to 64, BK 1 to 64, WX threads along positions or columns and WY along kernels (WX x WY from 32 to 1024; WY = 256 / WX if left out), s for lane-strided blocks, u for written-out steps, d for double-buffered tiles, g for the A tile's transposed layout, (E-step only) c for stores through workgroup memory and (M-step only) p for posteriors computed while loading; u= sets the uniform-buffer kernels' positions and columns per thread, 1 to 8; c=MIxNJxBK@WMxWN the tensor-core E-step's matrices per subgroup, reduction steps per stage and subgroups"
            ))
        };
        let mut t = Tiles::default();
        for part in s.split(',') {
            let (name, v) = part.split_once('=').ok_or_else(bad)?;
            if name.trim() == "c" {
                // The tensor-core E-step: MIxNJxBK@WMxWN.
                let (v, w) = v.split_once('@').ok_or_else(bad)?;
                let nums = |v: &str| -> Result<Vec<u32>> {
                    v.split('x')
                        .map(|n| n.trim().parse().map_err(|_| bad()))
                        .collect()
                };
                match (&nums(v)?[..], &nums(w)?[..]) {
                    (&[mi, nj, bk], &[wm, wn]) => t.coop = CoopTiles { wm, wn, mi, nj, bk },
                    _ => return Err(bad()),
                }
                continue;
            }
            if name.trim() == "u" {
                // The uniform-buffer kernels: positions (E) and columns (M) per thread, 1 to 8.
                let nums: Vec<u32> = v
                    .split('x')
                    .map(|n| n.trim().parse().map_err(|_| bad()))
                    .collect::<Result<_>>()?;
                match nums[..] {
                    [rm, rr] if (1..=8).contains(&rm) && (1..=8).contains(&rr) => {
                        (t.u_rm, t.u_rr) = (rm, rr);
                    }
                    _ => return Err(bad()),
                }
                continue;
            }
            // WX, an optional xWY, then the flags: s (lane-strided), u (steps written out),
            // d (double-buffered), p (M-step: posteriors computed while loading), each at most
            // once.
            let number = |s: &str| -> Result<(u32, usize)> {
                let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
                Ok((s[..end].parse::<u32>().map_err(|_| bad())?, end))
            };
            let (v, wx, wy, flags) = match v.split_once('@') {
                Some((v, spec)) => {
                    let spec = spec.trim();
                    let (wx, end) = number(spec)?;
                    let rest = &spec[end..];
                    let (wy, flags) = match rest.strip_prefix('x') {
                        Some(r) => {
                            let (wy, end) = number(r)?;
                            (Some(wy), &r[end..])
                        }
                        None => (None, rest),
                    };
                    (v, wx, wy, flags)
                }
                None => (v, 16, None, ""),
            };
            let wy = match wy {
                Some(wy) => wy,
                None if wx > 0 && 256 % wx == 0 => 256 / wx,
                None => return Err(bad()),
            };
            let (strided, unroll, double, fused, coalesced, gather) = (
                flags.contains('s'),
                flags.contains('u'),
                flags.contains('d'),
                flags.contains('p'),
                flags.contains('c'),
                flags.contains('g'),
            );
            if flags.len()
                != strided as usize
                    + unroll as usize
                    + double as usize
                    + fused as usize
                    + coalesced as usize
                    + gather as usize
                || (fused && name.trim() != "m")
                || (coalesced && name.trim() != "e")
            {
                return Err(bad());
            }
            let nums: Vec<u32> = v
                .split('x')
                .map(|n| n.trim().parse().map_err(|_| bad()))
                .collect::<Result<_>>()?;
            if nums.len() != 3 {
                return Err(bad());
            }
            match name.trim() {
                "e" => {
                    (t.e_rm, t.e_rn, t.e_bk) = (nums[0], nums[1], nums[2]);
                    (t.e_wx, t.e_wy) = (wx, wy);
                    (t.e_strided, t.e_unroll, t.e_double) = (strided, unroll, double);
                    (t.e_coalesced, t.e_gather) = (coalesced, gather);
                }
                "m" => {
                    (t.m_rk, t.m_rr, t.m_bk) = (nums[0], nums[1], nums[2]);
                    (t.m_wx, t.m_wy) = (wx, wy);
                    (t.m_strided, t.m_unroll, t.m_double) = (strided, unroll, double);
                    (t.m_fused, t.m_gather) = (fused, gather);
                }
                _ => return Err(bad()),
            }
        }
        t.check()
            .map_err(|why| CalmError::Invalid(format!("tiles `{s}`: {why}")))?;
        Ok(t)
    }

    /// The rules every shape of the staged kernels keeps, whoever made it (`parse`, or code
    /// filling the fields): register blocks of multiples of 4 up to 64, BK 1 to 64, 32 to 1,024
    /// threads, and (M-step) a thread count that is a multiple of the kernels' vec4s, TK / 4, as
    /// the sum of B needs (each thread adds the same four kernels at every step). Whether the
    /// adapter allows the threads and the workgroup memory is the engine's check.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.coop.check()?;
        let parts = [
            (
                "E-step", self.e_rm, self.e_rn, self.e_bk, self.e_wx, self.e_wy,
            ),
            (
                "M-step", self.m_rk, self.m_rr, self.m_bk, self.m_wx, self.m_wy,
            ),
        ];
        for (name, a, b, bk, wx, wy) in parts {
            if a == 0 || b == 0 || a > 64 || b > 64 || a % 4 != 0 || b % 4 != 0 {
                return Err(format!(
                    "{name} register blocks of {a} x {b}: multiples of 4 up to 64 are allowed"
                ));
            }
            if !(1..=64).contains(&bk) {
                return Err(format!("{name} BK {bk}: 1 to 64 is allowed"));
            }
            let nt = wx as u64 * wy as u64;
            if wx == 0 || wy == 0 || !(32..=1024).contains(&nt) {
                return Err(format!(
                    "{name} workgroups of {wx} x {wy} threads: 32 to 1,024 in all are allowed"
                ));
            }
        }
        let e_bufs = if self.e_double { 2 } else { 1 };
        if self.e_coalesced && self.e_wy > e_bufs * self.e_bk {
            return Err(format!(
                "E-step stores through workgroup memory (c) with {} threads along kernels and BK {}: the A tile holds a row of results per thread row, so WY must be at most BK{}",
                self.e_wy,
                self.e_bk,
                if self.e_double {
                    " x 2 (double-buffered)"
                } else {
                    ""
                }
            ));
        }
        if !(self.m_wx as u64 * 4).is_multiple_of(self.m_rk as u64) {
            return Err(format!(
                "M-step threads {} x {} with {} kernels each: the thread count must be a multiple of the tile's {} kernel vec4s (4 WX a multiple of RK)",
                self.m_wx,
                self.m_wy,
                self.m_rk,
                self.m_tk() / 4
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s =
            |strided: bool, unroll: bool, double: bool, gather: bool, last: bool, flag: &str| {
                format!(
                    "{}{}{}{}{}",
                    if strided { "s" } else { "" },
                    if unroll { "u" } else { "" },
                    if double { "d" } else { "" },
                    if gather { "g" } else { "" },
                    if last { flag } else { "" }
                )
            };
        // `@WX` where the threads are 256 (WY = 256 / WX), else `@WXxWY`.
        let threads = |wx: u32, wy: u32| {
            if wx as u64 * wy as u64 == 256 {
                format!("{wx}")
            } else {
                format!("{wx}x{wy}")
            }
        };
        write!(
            f,
            "e={}x{}x{}@{}{},m={}x{}x{}@{}{}",
            self.e_rm,
            self.e_rn,
            self.e_bk,
            threads(self.e_wx, self.e_wy),
            s(
                self.e_strided,
                self.e_unroll,
                self.e_double,
                self.e_gather,
                self.e_coalesced,
                "c"
            ),
            self.m_rk,
            self.m_rr,
            self.m_bk,
            threads(self.m_wx, self.m_wy),
            s(
                self.m_strided,
                self.m_unroll,
                self.m_double,
                self.m_gather,
                self.m_fused,
                "p"
            )
        )?;
        let d = Self::default();
        if (self.u_rm, self.u_rr) != (d.u_rm, d.u_rr) {
            write!(f, ",u={}x{}", self.u_rm, self.u_rr)?;
        }
        if self.coop != d.coop {
            write!(f, ",c={}", self.coop)?;
        }
        Ok(())
    }
}

/// The uniform-buffer kernels' windows hold at most this many floats (64 KiB, the binding
/// limit of uniform buffers on lavapipe and WebGPU's default).
pub const UBO_FLOATS: usize = 16384;

/// Threads per workgroup of the uniform-buffer M-step: one 8-lane register of llvmpipe's on
/// AVX2 machines, so that the R + 1 columns are cut into small blocks.
pub const UBO_M_THREADS: u32 = 8;

/// Rows of `KP` floats in one window of a uniform-buffer kernel: as many as fit with the last
/// row's tile of `tn` kernels still inside the binding, a multiple of 8 so that every window
/// starts on a 256-byte boundary (the strictest uniform offset alignment).
pub fn ubo_rows(kp: usize, tn: u32) -> usize {
    (UBO_FLOATS.saturating_sub(tn as usize) / kp) / 8 * 8
}

/// Which implementation of the two GEMM kernels to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Tiles staged through workgroup memory (`estep.wgsl`, `mstep.wgsl`): for real GPUs.
    Staged,
    /// Register blocks read straight from device memory (`*_direct.wgsl`), no workgroup memory
    /// or barriers: for adapters where those are slow (it was the faster one on lavapipe before
    /// the staged kernels were pipelined).
    Direct,
    /// The shared operand (theta in the E-step, the posteriors in the M-step) read from
    /// uniform buffers, 64 KiB windows of it, a dispatch per window (`*_ubo.wgsl`): for
    /// llvmpipe, where a load from a storage buffer or workgroup memory inside a loop costs a
    /// loop over the lanes and a uniform-buffer load does not (docs/perf.md).
    Uniform,
    /// The E-step on the tensor cores (`estep_coop.wgsl`: cooperative 16x16 f16 matrices, each
    /// operand split in two, f32 accumulators) and the staged M-step: for adapters that offer
    /// 16x16x16 f16 x f16 -> f32 cooperative matrices and one subgroup size
    /// ([`super::GpuContext::coop`]).
    Coop,
}

impl Variant {
    /// `staged`, `direct`, `uniform` or `coop` (the CLI's `CALM_KERNELS`).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "staged" => Ok(Variant::Staged),
            "direct" => Ok(Variant::Direct),
            "uniform" => Ok(Variant::Uniform),
            "coop" => Ok(Variant::Coop),
            other => Err(format!(
                "`{other}`: expected staged, direct, uniform or coop"
            )),
        }
    }

    /// The family of its M-step: the tensor-core variant runs the staged one.
    pub fn mstep(self) -> Self {
        match self {
            Variant::Coop => Variant::Staged,
            v => v,
        }
    }

    /// The adapter's default: staged on GPUs; the uniform-buffer kernels on CPU adapters
    /// (llvmpipe through Vulkan or GL), where they run the MNIST-protocol epoch 6.4x faster
    /// than the staged ones on a Zen 3 (docs/perf.md).
    pub fn builtin(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu {
            Variant::Uniform
        } else {
            Variant::Staged
        }
    }

    /// Batch positions one E-step workgroup covers with `tiles`.
    pub fn estep_positions(self, tiles: &Tiles) -> usize {
        match self {
            Variant::Staged => tiles.e_tm() as usize,
            Variant::Direct => 8 * 64,
            Variant::Uniform => 64 * tiles.u_rm as usize,
            Variant::Coop => tiles.coop.tm() as usize,
        }
    }
}
