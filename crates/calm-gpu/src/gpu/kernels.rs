//! The compute pipelines: one WGSL file per kernel (in `shaders/`), built once per device.
//!
//! Shapes are never baked into the shader text: they travel in the `Params` uniform. Only the
//! register-tile sizes of the two GEMM kernels are substituted (`{{RM}}` etc.), because WGSL needs
//! them as constants to size private and workgroup arrays.

use crate::error::{CalmError, Result};
use crate::gpu::GpuContext;

const PARAMS: &str = include_str!("../../shaders/params.wgsl");
pub const ESTEP: &str = include_str!("../../shaders/estep.wgsl");
pub const ESTEP_DIRECT: &str = include_str!("../../shaders/estep_direct.wgsl");
pub const POSTERIOR: &str = include_str!("../../shaders/posterior.wgsl");
pub const MSTEP_DIRECT: &str = include_str!("../../shaders/mstep_direct.wgsl");
pub const LOGSUMEXP: &str = include_str!("../../shaders/logsumexp.wgsl");
pub const MSTEP: &str = include_str!("../../shaders/mstep.wgsl");
pub const REDUCE_STATS: &str = include_str!("../../shaders/reduce_stats.wgsl");
pub const UPDATE: &str = include_str!("../../shaders/update.wgsl");
pub const SUMMARY: &str = include_str!("../../shaders/summary.wgsl");
pub const FEATURES: &str = include_str!("../../shaders/features.wgsl");
pub const TRI_MEAN: &str = include_str!("../../shaders/tri_mean.wgsl");
pub const FEATURES_TRI: &str = include_str!("../../shaders/features_tri.wgsl");
pub const ESTEP_UBO: &str = include_str!("../../shaders/estep_ubo.wgsl");
pub const MSTEP_UBO: &str = include_str!("../../shaders/mstep_ubo.wgsl");

/// Every kernel with its name, for validation and tests.
pub const ALL: [(&str, &str); 14] = [
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
];

/// Mirrors `struct Params` in `shaders/params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_images: u32,
    pub x_offset: u32,
    pub k: u32,
    pub r: u32,
    pub positions: u32,
    pub wo: u32,
    pub wp: u32,
    pub img_stride: u32,
    pub logp_offset: u32,
    pub imgs_per_chunk: u32,
    pub n_chunks: u32,
    pub n_total: u32,
    pub grid: u32,
    pub pad: [u32; 3],
}

/// Register-tile shape of the two GEMM kernels. Each workgroup has `wx` threads along the tile's
/// first axis (positions in the E-step, columns `r` in the M-step) and `wy` along kernels; 256
/// in all unless `CALM_TILES` says `@WXxWY` (any count up to 1024 the adapter allows), so that a
/// tile's width can divide R (400 columns for the MNIST protocol: 80-column tiles of 20 x 16
/// threads waste none, 64-column ones compute 448).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// E-step: positions per thread, kernels per thread, reduction slice, threads along
    /// positions, threads along kernels.
    pub e_rm: u32,
    pub e_rn: u32,
    pub e_bk: u32,
    pub e_wx: u32,
    pub e_wy: u32,
    /// M-step: kernels per thread, columns per thread, reduction slice, threads along columns,
    /// threads along kernels.
    pub m_rk: u32,
    pub m_rr: u32,
    pub m_bk: u32,
    pub m_wx: u32,
    pub m_wy: u32,
    /// The BK reduction steps of a stage written out by the host (`u` after WX in `CALM_TILES`)
    /// instead of a loop the driver may or may not unroll: workgroup-memory addresses become
    /// constant offsets, no loop counter or branch per step.
    pub e_unroll: bool,
    pub m_unroll: bool,
    /// Double-buffered tiles (`d` after WX in `CALM_TILES`): two stages in workgroup memory, the
    /// next stored while the current one is read, one barrier per stage instead of two; twice
    /// the tiles' workgroup memory.
    pub e_double: bool,
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
    pub m_gather: bool,
    /// The uniform-buffer kernels (`*_ubo.wgsl`, [`Variant::Uniform`]): positions per thread
    /// (E-step), columns per thread (M-step), kernels per workgroup (both; a multiple of 4).
    /// `u_tn` is set from K by [`Tiles::for_shape`] (the engine sets it whatever the tiles'
    /// origin) and is not part of the `CALM_TILES` string; `u=RMxRR` there sets the others.
    pub u_rm: u32,
    pub u_rr: u32,
    pub u_tn: u32,
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

    /// Tile extents: E-step positions and kernels, M-step columns and kernels.
    pub fn e_tm(&self) -> u32 {
        self.e_wx * self.e_rm
    }
    pub fn e_tn(&self) -> u32 {
        self.e_wy * self.e_rn
    }
    pub fn m_tr(&self) -> u32 {
        self.m_wx * self.m_rr
    }
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
                "tiles `{s}`: expected e=RMxRNxBK[@WX[xWY][s][u][d][g][c]],m=RKxRRxBK[@WX[xWY][s][u][d][g][p]][,u=RMxRR] with RM, RN, RK, RR multiples of 4 up to 64, BK 1 to 64, WX threads along positions or columns and WY along kernels (WX x WY from 32 to 1024; WY = 256 / WX if left out), s for lane-strided blocks, u for written-out steps, d for double-buffered tiles, g for the A tile's transposed layout, (E-step only) c for stores through workgroup memory and (M-step only) p for posteriors computed while loading; u= sets the uniform-buffer kernels' positions and columns per thread, 1 to 8"
            ))
        };
        let mut t = Tiles::default();
        for part in s.split(',') {
            let (name, v) = part.split_once('=').ok_or_else(bad)?;
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
        Ok(())
    }
}

/// The register block of the two GEMM kernels, written out for `rm` rows along `a` and `rn`
/// columns along `b` (both multiples of 4): `rm * rn / 4` vec4 accumulators `acc_i_q`, the
/// per-stage loads `a_g = a_tile[ab + g * A_GAP]`, `b_q = b_tile[bb + q]` and the FMAs. Writing them out
/// keeps every accumulator in a register: a private array indexed in a loop is placed in local
/// memory by some compilers (the first H100 measurement ran at 1.3% of peak that way).
/// `store(j, acc)` gives the statement that stores accumulator element `acc` of column `j` (the
/// row's variables are set by `row`); `row(i, body)` wraps the stores of row `i`.
pub fn unrolled(
    rm: u32,
    rn: u32,
    row: impl Fn(u32, &str) -> String,
    store: impl Fn(u32, &str) -> String,
) -> (String, String, String) {
    let comp = ["x", "y", "z", "w"];
    let mut decl = String::new();
    let mut fma = String::new();
    for i in 0..rm {
        for q in 0..rn / 4 {
            decl.push_str(&format!("    var acc_{i}_{q} = vec4<f32>(0.0);\n"));
        }
    }
    for g in 0..rm / 4 {
        fma.push_str(&format!(
            "            let a{g} = a_tile[ab + {g}u * A_GAP];\n"
        ));
    }
    for q in 0..rn / 4 {
        fma.push_str(&format!("            let b{q} = b_tile[bb + {q}u];\n"));
    }
    for i in 0..rm {
        for q in 0..rn / 4 {
            fma.push_str(&format!(
                "            acc_{i}_{q} = fma(vec4<f32>(a{}.{}), b{q}, acc_{i}_{q});\n",
                i / 4,
                comp[(i % 4) as usize]
            ));
        }
    }
    (decl, fma, stores(rm, rn, row, store))
}

/// The stores of an `rm` x `rn` block of vec4 accumulators `acc_i_q`: `store(j, acc)` gives
/// the statement for column j of a row, `row(i, body)` wraps row i's statements.
fn stores(
    rm: u32,
    rn: u32,
    row: impl Fn(u32, &str) -> String,
    store: impl Fn(u32, &str) -> String,
) -> String {
    let comp = ["x", "y", "z", "w"];
    let mut st = String::new();
    for i in 0..rm {
        let mut body = String::new();
        for q in 0..rn / 4 {
            for (c, name) in comp.iter().enumerate() {
                body.push_str(&store(q * 4 + c as u32, &format!("acc_{i}_{q}.{name}")));
            }
        }
        st.push_str(&row(i, &body));
    }
    st
}

/// The E-step's epilogue with [`Tiles::e_coalesced`]: the tile's results leave through the A
/// tile, in rounds of as many kernels per thread as its `NBUF * BK` rows of TM floats hold for
/// all WY thread rows. In a round each thread puts the RM values of each of its kernels as RM / 4
/// vec4s (the same places along the tile as its A reads), then the workgroup writes the rows
/// out, thread `lid` taking elements `lid`, `lid + NT`, ...: neighbouring threads on
/// neighbouring positions. `row_base`, no longer read once the last stage is done, holds each
/// position's start in `l` (`n K P + p`, or `0xffffffff` past the batch).
fn coalesced_store(tiles: &Tiles) -> String {
    let comp = ["x", "y", "z", "w"];
    let bufs = if tiles.e_double { 2 } else { 1 };
    let per_round = (bufs * tiles.e_bk / tiles.e_wy).clamp(1, tiles.e_rn);
    let mut s = String::from(concat!(
        "    // The results leave through workgroup memory (Tiles::e_coalesced, kernels::coalesced_store).\n",
        "    for (var i = lid; i < TM; i += NT) {\n",
        "        let m = m0 + i;\n",
        "        var b = 0xffffffffu;\n",
        "        if (m < mtot) {\n",
        "            let n = m / prm.positions;\n",
        "            b = n * prm.k * prm.positions + (m - n * prm.positions);\n",
        "        }\n",
        "        row_base[i] = b;\n",
        "    }\n",
    ));
    let mut j0 = 0;
    while j0 < tiles.e_rn {
        let j1 = (j0 + per_round).min(tiles.e_rn);
        s.push_str("    {\n");
        if j0 > 0 {
            s.push_str("        workgroupBarrier();\n");
        }
        for j in j0..j1 {
            let (q, c) = (j / 4, comp[(j % 4) as usize]);
            for g in 0..tiles.e_rm / 4 {
                let v: Vec<String> = (0..4)
                    .map(|i| format!("acc_{}_{q}.{c}", 4 * g + i))
                    .collect();
                s.push_str(&format!(
                    "        a_tile[({}u * WGY + ty) * TM4 + tx * A_STEP + {g}u * A_GAP] = vec4<f32>({});\n",
                    j - j0,
                    v.join(", ")
                ));
            }
        }
        s.push_str(&format!(
            concat!(
                "        workgroupBarrier();\n",
                "        for (var f = lid; f < {rows}u * WGY * TM; f += NT) {{\n",
                "            let row = f / TM;\n",
                "            let ml = f - row * TM;\n",
                "            let jj = row / WGY;\n",
                "            let k = n0 + (row - jj * WGY) * RN + {j0}u + jj;\n",
                "            let b = row_base[ml];\n",
                // Position ml = q * P_STEP + part * P_GAP lies in vec4 q, component part.
                "            let part = (ml / P_GAP) % 4u;\n",
                "            if (b != 0xffffffffu && k < prm.k) {{\n",
                "                l[b + k * prm.positions] = a_tile[row * TM4 + (ml - part * P_GAP) / P_STEP][part] + bias[k];\n",
                "            }}\n",
                "        }}\n",
                "    }}\n",
            ),
            rows = j1 - j0,
            j0 = j0,
        ));
        j0 = j1;
    }
    s
}

/// One tile of a GEMM kernel's stage, as [`prefetch`] loads it: the registers `reg0, reg1, ...`
/// that hold each thread's share, the workgroup array `tile`, its `elements` vec4s, the load
/// calls for the first and for the next stage, and each element's place in the tile (`{E}`
/// stands for the element index in the last three).
pub struct StageTile<'a> {
    pub reg: &'a str,
    pub tile: &'a str,
    pub elements: u32,
    pub first: &'a str,
    pub next: &'a str,
    pub slot: &'a str,
}

/// The software pipeline of the two GEMM kernels: each thread's share of a stage's tiles, held in
/// named registers; the workgroup's `nt` threads share each tile's elements. Returns the
/// declarations with the first loads, the stores into workgroup memory, and the next loads.
pub fn prefetch(nt: u32, tiles: &[StageTile]) -> (String, String, String) {
    let (mut init, mut store, mut next) = (String::new(), String::new(), String::new());
    for st in tiles {
        let (reg, tile, elements) = (st.reg, st.tile, st.elements);
        for t in 0..elements.div_ceil(nt) {
            let e = format!("lid + {}u", nt * t);
            let full = nt * (t + 1) <= elements;
            // The last, partial share loads a valid element (the last one) where it has none,
            // so that no load reads past its tables; the store below is skipped for it.
            let le = if full {
                e.clone()
            } else {
                format!("min(lid + {}u, {}u)", nt * t, elements - 1)
            };
            init.push_str(&format!(
                "    var {reg}{t} = {};\n",
                st.first.replace("{E}", &le)
            ));
            let put = format!(
                "{tile}[{tile}_w + {}] = {reg}{t};",
                st.slot.replace("{E}", &format!("({e})"))
            );
            if full {
                store.push_str(&format!("        {put}\n"));
            } else {
                store.push_str(&format!("        if ({e} < {elements}u) {{ {put} }}\n"));
            }
            next.push_str(&format!(
                "            {reg}{t} = {};\n",
                st.next.replace("{E}", &le)
            ));
        }
    }
    (init, store, next)
}

/// A GEMM kernel's text with its generated blocks: the register block from [`unrolled`]
/// (declarations, FMAs, stores) and the software pipeline from [`prefetch`].
fn fill(
    kernel: &str,
    (decl, fma, store): (String, String, String),
    (init, stage, next): (String, String, String),
) -> String {
    kernel
        .replace("{{ACC_DECL}}", &decl)
        .replace("{{FMA}}", &fma)
        .replace("{{STORE}}", &store)
        .replace("{{PF_INIT}}", &init)
        .replace("{{PF_STORE}}", &stage)
        .replace("{{PF_NEXT}}", &next)
}

/// The reduction steps of a GEMM kernel's stage, the text between `{{KK_BEGIN}}` and
/// `{{KK_END}}` (which uses `kk`): a loop over `kk < BK`, or with `unroll` the text written out
/// `bk` times, each copy in its own block with `kk` a constant.
fn steps(kernel: &str, bk: u32, unroll: bool) -> String {
    let Some((head, rest)) = kernel.split_once("{{KK_BEGIN}}") else {
        return kernel.to_string();
    };
    let (body, tail) = rest
        .split_once("{{KK_END}}")
        .expect("a GEMM kernel closes {{KK_BEGIN}} with {{KK_END}}");
    let steps = if unroll {
        (0..bk)
            .map(|i| format!("{{ let kk = {i}u;{body}}}\n"))
            .collect::<String>()
    } else {
        format!("for (var kk = 0u; kk < BK; kk++) {{{body}}}")
    };
    format!("{head}{steps}{tail}")
}

/// The staged M-step's posteriors read from the `G` buffer that `posterior.wgsl` wrote
/// (binding 1, `(n_images, P, KP)`): one vec4 of the G tile, element e = (kk, four kernels from
/// k0) of image n, positions from p0; zero beyond K and P. `g_slot(e)` is its place in the tile.
const MSTEP_G_BUFFER: &str = r#"
@group(0) @binding(1) var<storage, read> gpost: array<vec4<f32>>;

fn g_slot(e: u32) -> u32 {
    return e;
}

fn load_g(n: u32, p0: u32, e: u32, k0: u32) -> vec4<f32> {
    let kp = kpad();
    let kk = e / TK4;
    let kq = e - kk * TK4;
    let p = p0 + kk;
    let k = k0 + kq * 4u;
    var v = vec4<f32>(0.0);
    if (p < prm.positions && k < kp) {
        v = gpost[((n * prm.positions + p) * kp + k) / 4u];
    }
    return v;
}
"#;

/// The staged M-step's posteriors computed while loading ([`Tiles::m_fused`]): `exp(L - logp)`
/// from `L` (binding 1, `(n_images, K, P)`) and the batch's `logp` (binding 6), the same
/// expression as `posterior.wgsl`. Element e runs along positions first (kk = e % BK), so
/// neighbouring threads read neighbouring floats of `L`; `g_slot` puts it at (kk, kq) in the
/// tile. Zero beyond K and P.
const MSTEP_G_FUSED: &str = r#"
@group(0) @binding(1) var<storage, read> l: array<f32>;
@group(0) @binding(6) var<storage, read> logp_all: array<f32>;

fn g_slot(e: u32) -> u32 {
    return (e % BK) * TK4 + e / BK;
}

fn load_g(n: u32, p0: u32, e: u32, k0: u32) -> vec4<f32> {
    let kk = e % BK;
    let kq = e / BK;
    let p = p0 + kk;
    let k = k0 + kq * 4u;
    var v = vec4<f32>(0.0);
    if (p < prm.positions) {
        let lp = logp_all[prm.logp_offset + n];
        let b = (n * prm.k + k) * prm.positions + p;
        let ps = prm.positions;
        if (k < prm.k) { v.x = exp(l[b] - lp); }
        if (k + 1u < prm.k) { v.y = exp(l[b + ps] - lp); }
        if (k + 2u < prm.k) { v.z = exp(l[b + 2u * ps] - lp); }
        if (k + 3u < prm.k) { v.w = exp(l[b + 3u * ps] - lp); }
    }
    return v;
}
"#;

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

/// A uniform-buffer kernel's generated blocks: `rm` rows of `tn / 4` vec4 accumulators
/// `acc_i_q`, one step's loads and FMAs (`load(i)` gives row i's patch value, `tile` the
/// uniform array read at `base + q`), and the stores (`store(i, j, acc)` the statement for row i,
/// kernel j).
fn ubo_blocks(
    kernel: &str,
    rm: u32,
    tn: u32,
    load: impl Fn(u32) -> String,
    tile: (&str, &str),
    row: impl Fn(u32, &str) -> String,
    store: impl Fn(u32, &str) -> String,
) -> String {
    let (mut decl, mut fma) = (String::new(), String::new());
    for i in 0..rm {
        fma.push_str(&format!("        let a{i} = vec4<f32>({});\n", load(i)));
    }
    for q in 0..tn / 4 {
        fma.push_str(&format!(
            "        let t{q} = {}[{} + {q}u];\n",
            tile.0, tile.1
        ));
        for i in 0..rm {
            decl.push_str(&format!("    var acc_{i}_{q} = vec4<f32>(0.0);\n"));
            fma.push_str(&format!(
                "        acc_{i}_{q} = fma(a{i}, t{q}, acc_{i}_{q});\n"
            ));
        }
    }
    kernel
        .replace("{{ACC_DECL}}", &decl)
        .replace("{{FMA}}", &fma)
        .replace("{{STORE}}", &stores(rm, tn, row, store))
        .replace("{{RM}}", &rm.to_string())
        .replace("{{RR}}", &rm.to_string())
        .replace("{{TN}}", &tn.to_string())
        .replace("{{MT}}", &UBO_M_THREADS.to_string())
}

/// The full WGSL text of a kernel: the shared `Params` header, then the kernel with its tile
/// constants substituted and, for the GEMM kernels, the register block written out.
pub fn source(kernel: &str, tiles: &Tiles) -> String {
    if kernel == ESTEP_UBO {
        let body = ubo_blocks(
            kernel,
            tiles.u_rm,
            tiles.u_tn,
            |i| format!("x[base[{i}] + o]"),
            ("theta_w", "tb"),
            |i, body| {
                format!(
                    "    {{\n        let m = m0 + {i}u;\n        if (m < mtot) {{\n            let n = m / prm.positions;\n            let lb = n * prm.k * prm.positions + (m - n * prm.positions);\n{body}        }}\n    }}\n"
                )
            },
            |j, acc| {
                format!(
                    "            {{ let k = n0 + {j}u; if (k < prm.k) {{ let li = lb + k * prm.positions; if (win.first == 1u) {{ l[li] = {acc} + bias[k]; }} else {{ l[li] = l[li] + {acc}; }} }} }}\n"
                )
            },
        );
        return format!("{PARAMS}\n{body}");
    }
    if kernel == MSTEP_UBO {
        let body = ubo_blocks(
            kernel,
            tiles.u_rr,
            tiles.u_tn,
            |j| format!("select(x[xb + o[{j}]], 1.0, ones[{j}])"),
            ("g_w", "gb"),
            |j, body| {
                format!(
                    "    {{\n        let r = c0 + {j}u;\n        if (r < r1) {{\n{body}        }}\n    }}\n"
                )
            },
            |i, acc| {
                format!(
                    "            {{ let k = k0 + {i}u; if (k < prm.k) {{ let pi = pbase + k * r1 + r; if (win.first == 1u) {{ partials[pi] = {acc}; }} else {{ partials[pi] = partials[pi] + {acc}; }} }} }}\n"
                )
            },
        );
        return format!("{PARAMS}\n{body}");
    }
    let kernel = if kernel == ESTEP {
        let (d, f, s) = unrolled(
            tiles.e_rm,
            tiles.e_rn,
            |i, body| {
                format!(
                    "    {{\n        let m = m0 + (tx * A_STEP + {}u * A_GAP) * P_STEP + {}u * P_GAP;\n        if (m < mtot) {{\n            let n = m / prm.positions;\n            let lb = n * prm.k * prm.positions + (m - n * prm.positions);\n            let k = n0 + ty * RN;\n{body}        }}\n    }}\n",
                    i / 4,
                    i % 4
                )
            },
            |j, acc| {
                format!(
                    "            if (k + {j}u < prm.k) {{ l[lb + (k + {j}u) * prm.positions] = {acc} + bias[k + {j}u]; }}\n"
                )
            },
        );
        let s = if tiles.e_coalesced {
            coalesced_store(tiles)
        } else {
            s
        };
        let (pi, ps, pn) = prefetch(
            tiles.threads().0,
            &[
                StageTile {
                    reg: "pa",
                    tile: "a_tile",
                    elements: tiles.e_bk * tiles.e_tm() / 4,
                    first: "load_a(0u, {E})",
                    next: "load_a(r0 + BK, {E})",
                    slot: "{E}",
                },
                StageTile {
                    reg: "pb",
                    tile: "b_tile",
                    elements: tiles.e_bk * tiles.e_tn() / 4,
                    first: "load_b(0u, {E}, n0)",
                    next: "load_b(r0 + BK, {E}, n0)",
                    slot: "{E}",
                },
            ],
        );
        fill(kernel, (d, f, s), (pi, ps, pn))
    } else if kernel == MSTEP {
        let (d, f, s) = unrolled(
            tiles.m_rr,
            tiles.m_rk,
            |i, body| {
                format!(
                    "    {{\n        let r = c0 + (tx * A_STEP + {}u * A_GAP) * P_STEP + {}u * P_GAP;\n        if (r < prm.r) {{\n            let k = k0 + ty * RN;\n{body}        }}\n    }}\n",
                    i / 4,
                    i % 4
                )
            },
            |j, acc| {
                format!(
                    "            if (k + {j}u < prm.k) {{ partials[pbase + (k + {j}u) * r1 + r] = {acc}; }}\n"
                )
            },
        );
        let (pi, ps, pn) = prefetch(
            tiles.threads().1,
            &[
                StageTile {
                    reg: "pg",
                    tile: "b_tile",
                    elements: tiles.m_bk * tiles.m_tk() / 4,
                    first: "load_g(n, p0, {E}, k0)",
                    next: "load_g(n, p0, {E}, k0)",
                    slot: "g_slot({E})",
                },
                StageTile {
                    reg: "px",
                    tile: "a_tile",
                    elements: tiles.m_bk * tiles.m_tr() / 4,
                    first: "load_x(n, p0, {E}, c0)",
                    next: "load_x(n, p0, {E}, c0)",
                    slot: "{E}",
                },
            ],
        );
        let g_source = if tiles.m_fused {
            MSTEP_G_FUSED
        } else {
            MSTEP_G_BUFFER
        };
        fill(
            &kernel.replace("{{G_SOURCE}}", g_source),
            (d, f, s),
            (pi, ps, pn),
        )
    } else {
        kernel.to_string()
    };
    // The E-step's tile settings or the M-step's (any other kernel uses none of them). `rm` is
    // the register block along the A tile: RM positions (E) or RR columns (M).
    let (rm, bk, wx, wy, strided, unroll, double, transposed) = if kernel.contains("{{RM}}") {
        (
            tiles.e_rm,
            tiles.e_bk,
            tiles.e_wx,
            tiles.e_wy,
            tiles.e_strided,
            tiles.e_unroll,
            tiles.e_double,
            tiles.e_gather,
        )
    } else {
        (
            tiles.m_rr,
            tiles.m_bk,
            tiles.m_wx,
            tiles.m_wy,
            tiles.m_strided,
            tiles.m_unroll,
            tiles.m_double,
            tiles.m_gather,
        )
    };
    // Where a thread's groups of 4 lie along the A tile (see estep.wgsl).
    let (a_step, a_gap) = if strided { (1, wx) } else { (rm / 4, 1) };
    let body = steps(&kernel, bk, unroll)
        .replace("{{RM}}", &tiles.e_rm.to_string())
        .replace("{{RN}}", &tiles.e_rn.to_string())
        .replace("{{RK}}", &tiles.m_rk.to_string())
        .replace("{{RR}}", &tiles.m_rr.to_string())
        .replace("{{BK}}", &bk.to_string())
        .replace("{{WGX}}", &wx.to_string())
        .replace("{{WGY}}", &wy.to_string())
        .replace("{{A_STEP}}", &a_step.to_string())
        .replace("{{A_GAP}}", &a_gap.to_string())
        .replace("{{NBUF}}", if double { "2" } else { "1" })
        .replace("{{P_STEP}}", if transposed { "1" } else { "4" })
        .replace(
            "{{P_GAP}}",
            &if transposed { wx * rm / 4 } else { 1 }.to_string(),
        );
    format!("{PARAMS}\n{body}")
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
}

impl Variant {
    /// `staged`, `direct` or `uniform` (the CLI's `CALM_KERNELS`).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "staged" => Ok(Variant::Staged),
            "direct" => Ok(Variant::Direct),
            "uniform" => Ok(Variant::Uniform),
            other => Err(format!("`{other}`: expected staged, direct or uniform")),
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
        }
    }
}

pub struct Pipelines {
    pub variant: Variant,
    pub estep: wgpu::ComputePipeline,
    pub posterior: wgpu::ComputePipeline,
    pub logsumexp: wgpu::ComputePipeline,
    pub mstep: wgpu::ComputePipeline,
    pub reduce_stats: wgpu::ComputePipeline,
    pub update: wgpu::ComputePipeline,
    pub summary: wgpu::ComputePipeline,
    pub features: wgpu::ComputePipeline,
    pub tri_mean: wgpu::ComputePipeline,
    pub features_tri: wgpu::ComputePipeline,
}

/// Builds kernel `name` from `text`. naga's runtime checks (index clamping, loop bounding) are
/// left out of the two GEMM kernels unless `checks` ([`super::GpuConfig::checks`]): both guard
/// every tile edge explicitly, `validate` and the GPU-vs-CPU tests check them on every shape
/// class, and the checks (loop bounding above all) keep drivers from unrolling the register
/// block.
fn build(
    device: &wgpu::Device,
    name: &str,
    text: &str,
    checks: bool,
) -> Result<wgpu::ComputePipeline> {
    // A driver that fails to compile a pipeline reports an internal error; caught here, it is
    // this kernel's error (one line, and `calm-gpu tune` moves on to the next candidate)
    // instead of wgpu's uncaptured-error panic.
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(text.into()),
    };
    let module = if matches!(name, "estep" | "mstep" | "estep_ubo" | "mstep_ubo") && !checks {
        // SAFETY: these two kernels index only within bounds they check explicitly (tile edges
        // against K, R, P and the batch; offset tables padded by a tile; the last, partial share
        // of a stage's loads clamped by `prefetch`), and every loop has a uniform,
        // finite trip count; `validate` and tests/gpu_vs_cpu.rs run them on every shape class.
        unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
    } else {
        device.create_shader_module(desc)
    };
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        // Every kernel writes its workgroup memory before reading it.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(CalmError::Gpu(format!(
            "shader {name} failed to build: {e}"
        )));
    }
    if let Some(e) = pollster::block_on(internal.pop()) {
        return Err(CalmError::Gpu(format!(
            "the driver failed to build shader {name}: {e}"
        )));
    }
    Ok(pipeline)
}

impl Pipelines {
    /// The ten kernels for `tiles` and `variant`, from `ctx`'s pipelines where it has them.
    pub fn new(ctx: &GpuContext, tiles: &Tiles, variant: Variant) -> Result<Self> {
        let checks = if ctx.gemm_checks { " checked" } else { "" };
        let b = |name: &str, kernel| {
            let text = source(kernel, tiles);
            ctx.pipeline((format!("{name}{checks}"), text.clone()), |device| {
                build(device, name, &text, ctx.gemm_checks)
            })
        };
        let (estep, mstep) = match variant {
            Variant::Staged => (b("estep", ESTEP)?, b("mstep", MSTEP)?),
            Variant::Direct => (
                b("estep_direct", ESTEP_DIRECT)?,
                b("mstep_direct", MSTEP_DIRECT)?,
            ),
            Variant::Uniform => (b("estep_ubo", ESTEP_UBO)?, b("mstep_ubo", MSTEP_UBO)?),
        };
        Ok(Self {
            variant,
            estep,
            posterior: b("posterior", POSTERIOR)?,
            logsumexp: b("logsumexp", LOGSUMEXP)?,
            mstep,
            reduce_stats: b("reduce_stats", REDUCE_STATS)?,
            update: b("update", UPDATE)?,
            summary: b("summary", SUMMARY)?,
            features: b("features", FEATURES)?,
            tri_mean: b("tri_mean", TRI_MEAN)?,
            features_tri: b("features_tri", FEATURES_TRI)?,
        })
    }
}
