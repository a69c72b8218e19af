//! Kernel choices tuned on the user's own adapter (`calm-gpu tune`), and the file that keeps
//! them. The built-in choice ([`Variant::builtin`], [`Tiles::for_shape`]) is what measured
//! fastest on an H100 and on lavapipe; another GPU may want other tiles. `calm-gpu tune` times
//! candidates on the adapter after checking each against the CPU reference, and writes the
//! fastest into a small JSON file. Every engine built later for the same adapter, driver and
//! layer shape runs it, unless `CALM_TILES` or `CALM_KERNELS` is set or the caller chose.
//!
//! An entry carries a hash of the two GEMM kernels' generated WGSL and of the host code that runs
//! them ([`Choice::code_hash`]): an entry made by another build of calm-gpu, whose kernels were
//! not the ones checked, is ignored, and the engine says so ([`Lookup::Stale`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::context::GpuContext;
use super::kernels::{self, Tiles, UBO_FLOATS, Variant, ubo_rows};
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;

/// The file's layout version.
const FORMAT: u32 = 1;

/// WGSL `text` without its comments, indentation and empty lines: what the compiler reads.
pub fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code).trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// One way to run the two GEMM kernels: an implementation and its tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The implementation.
    pub variant: Variant,
    /// Its tiles (only the fields that implementation reads differ from the defaults).
    pub tiles: Tiles,
}

impl Choice {
    /// The choice with the fields its variant does not read set to their defaults, so that two
    /// choices that run the same kernels compare equal: the uniform-buffer kernels read only
    /// `u_rm` and `u_rr`, the staged ones all but those, the direct ones none; `u_tn` follows K
    /// whoever chose ([`Tiles::uniform_tn`]).
    pub fn new(variant: Variant, tiles: Tiles) -> Self {
        let d = Tiles::default();
        let tiles = match variant {
            Variant::Staged => Tiles {
                u_rm: d.u_rm,
                u_rr: d.u_rr,
                u_tn: d.u_tn,
                coop: d.coop,
                ..tiles
            },
            // The tensor-core variant's M-step is the staged one, with its tiles.
            Variant::Coop => Tiles {
                u_rm: d.u_rm,
                u_rr: d.u_rr,
                u_tn: d.u_tn,
                ..tiles
            },
            Variant::Uniform => Tiles {
                u_rm: tiles.u_rm,
                u_rr: tiles.u_rr,
                ..d
            },
            Variant::Direct => d,
        };
        Self { variant, tiles }
    }

    /// `staged:TILES` (TILES in `CALM_TILES`' syntax), `uniform[:u=RMxRR]`, `direct` or
    /// `coop:TILES` (the tensor-core E-step, the staged M-step with TILES).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            CalmError::Invalid(format!(
                "kernel choice `{s}`: {why}; expected staged:TILES (the tile syntax of docs/tuning.md, e.g. staged:e=8x8x16@32,m=4x4x16@20x16p), uniform[:u=RMxRR], direct or coop:TILES"
            ))
        };
        let (name, rest) = match s.trim().split_once(':') {
            Some((n, r)) => (n.trim(), Some(r.trim())),
            None => (s.trim(), None),
        };
        let tiles = |rest: &str| {
            Tiles::parse(rest).map_err(|e| CalmError::Invalid(format!("kernel choice `{s}`: {e}")))
        };
        match (name, rest) {
            ("staged", Some(r)) if r.starts_with("e=") || r.starts_with("m=") => {
                Ok(Self::new(Variant::Staged, tiles(r)?))
            }
            ("staged", _) => Err(bad("the staged kernels need their tiles")),
            ("coop", Some(r)) if r.starts_with("e=") || r.starts_with("m=") => {
                Ok(Self::new(Variant::Coop, tiles(r)?))
            }
            ("coop", _) => Err(bad("the tensor-core kernels need their M-step's tiles")),
            ("uniform", None) => Ok(Self {
                variant: Variant::Uniform,
                tiles: Tiles::default(),
            }),
            ("uniform", Some(r)) if r.starts_with("u=") && !r.contains(',') => {
                Ok(Self::new(Variant::Uniform, tiles(r)?))
            }
            ("direct", None) => Ok(Self {
                variant: Variant::Direct,
                tiles: Tiles::default(),
            }),
            _ => Err(bad("not a kernel choice")),
        }
    }

    /// A hash of what this choice runs for `k` kernels: the two GEMM kernels' WGSL as generated
    /// for its tiles (without comments and indentation, [`code_only`]), [`HOST_LAYOUT`] and the
    /// crate's version (FNV-1a, so that it is the same in every build of the same source).
    /// Comments in the kernels and unrelated edits of the Rust code keep it.
    pub fn code_hash(&self, k: usize) -> String {
        let t = Tiles {
            u_tn: Tiles::uniform_tn(k),
            ..self.tiles
        };
        let (e, m) = match self.variant {
            Variant::Staged => (kernels::ESTEP, kernels::MSTEP),
            Variant::Direct => (kernels::ESTEP_DIRECT, kernels::MSTEP_DIRECT),
            Variant::Uniform => (kernels::ESTEP_UBO, kernels::MSTEP_UBO),
            Variant::Coop => (kernels::ESTEP_COOP, kernels::MSTEP),
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let layout = HOST_LAYOUT.to_string();
        for part in [
            env!("CARGO_PKG_VERSION"),
            &layout,
            &code_only(&super::codegen::source(e, &t)),
            &code_only(&super::codegen::source(m, &t)),
        ] {
            for b in part.bytes().chain([0u8]) {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.variant {
            Variant::Staged => write!(f, "staged:{}", self.tiles),
            Variant::Uniform => write!(f, "uniform:u={}x{}", self.tiles.u_rm, self.tiles.u_rr),
            Variant::Direct => f.write_str("direct"),
            Variant::Coop => write!(f, "coop:{}", self.tiles),
        }
    }
}

/// The adapter an entry was measured on: everything wgpu reports of it but the device type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterKey {
    /// The wgpu backend, lowercase (`vulkan`, `metal`, ...).
    pub backend: String,
    /// The adapter's name.
    pub name: String,
    /// The PCI vendor id (or the backend's equivalent).
    pub vendor: u32,
    /// The PCI device id (or the backend's equivalent).
    pub device: u32,
    /// The driver's name.
    pub driver: String,
    /// The driver's version and other information.
    pub driver_info: String,
}

impl AdapterKey {
    /// The key of the adapter `info` describes.
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        Self {
            backend: format!("{:?}", info.backend).to_lowercase(),
            name: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
        }
    }
}

/// The layer and image shape an entry was measured for, e.g. `1x28x28 K64 w20 p2`.
pub fn shape_key(g: &Geometry) -> String {
    format!("{}x{}x{} K{} w{} p{}", g.c, g.h, g.w, g.k, g.kw, g.pad)
}

/// One tuned choice.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// The adapter it was measured on.
    pub adapter: AdapterKey,
    /// The layer and image shape, [`shape_key`].
    pub shape: String,
    /// [`Choice`]'s text.
    pub choice: String,
    /// [`Choice::code_hash`] when it was measured.
    pub code: String,
    /// Its median epoch in milliseconds, on `images` random images.
    pub epoch_ms: f64,
    /// Its GFLOP/s by SPEC's count.
    pub gflops: f64,
    /// The built-in choice's text.
    pub builtin: String,
    /// The built-in choice's median epoch in milliseconds; `None` where it did not run.
    pub builtin_epoch_ms: Option<f64>,
    /// Random images each timed epoch ran on.
    pub images: usize,
    /// Seconds since 1970 when it was measured.
    pub measured_at: u64,
}

/// The tuning file: a format version and its entries, as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct TuneFile {
    /// The layout version (this calm-gpu reads and writes only its own).
    pub format: u32,
    /// One entry per adapter and shape.
    pub entries: Vec<Entry>,
}

/// The version of how the engine sizes, binds and dispatches the GEMM kernels: part of every
/// [`Choice::code_hash`], so bump it when that host code changes and tuned choices measured
/// with the old code must be measured again.
pub const HOST_LAYOUT: u32 = 1;

/// The file's entries; none if it does not exist. A file that is not one of ours is an error
/// rather than something to overwrite or to ignore in silence.
pub fn load(path: &Path) -> Result<TuneFile> {
    read(path).map_err(|why| {
        CalmError::Invalid(format!(
            "tuning file {}: {why}; delete it (or use another) and run `calm-gpu tune` again",
            path.display()
        ))
    })
}

/// A tuning file holds one small entry per adapter and shape: 16 MiB is thousands of them.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// [`load`], with the cause alone as the error.
fn read(path: &Path) -> std::result::Result<TuneFile, String> {
    // Only a regular file of a sane size is read: a FIFO named here would block every GPU run
    // on its open, and a huge file would be read whole.
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(TuneFile {
                format: FORMAT,
                entries: Vec::new(),
            });
        }
        Err(e) => return Err(e.to_string()),
        Ok(m) if !m.is_file() => return Err("not a regular file".into()),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(format!(
                "{} bytes, more than a tuning file holds ({MAX_FILE_BYTES})",
                m.len()
            ));
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let file: TuneFile = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if file.format != FORMAT {
        return Err(format!(
            "format {} (this calm-gpu writes {FORMAT})",
            file.format
        ));
    }
    Ok(file)
}

/// Adds `entry` to the file at `path`, replacing the entry for the same adapter and shape;
/// written whole to a temporary file and renamed, so an interrupted write leaves the old file.
pub fn store(path: &Path, entry: Entry) -> Result<()> {
    with_lock(path, || {
        let mut file = load(path)?;
        drop_entry(&mut file, &entry.adapter, &entry.shape);
        file.entries.push(entry);
        save(path, &file)
    })
}

/// Removes the entry for `adapter` and `shape`, if there is one (the built-in choice won).
/// Returns whether there was one.
pub fn remove(path: &Path, adapter: &AdapterKey, shape: &str) -> Result<bool> {
    // No file, no entry: nothing to lock or create (the location may be read-only).
    if !path.exists() {
        return Ok(false);
    }
    with_lock(path, || {
        let mut file = load(path)?;
        let removed = drop_entry(&mut file, adapter, shape);
        if removed {
            save(path, &file)?;
        }
        Ok(removed)
    })
}

/// Runs `change` (read, modify, rename over `path`) holding an exclusive lock on `path`'s
/// `.lock` file beside it, so that two `calm-gpu tune` runs (two GPUs, or two shapes) that
/// finish together both keep their entries. Readers need no lock: the rename is atomic.
fn with_lock<T>(path: &Path, change: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CalmError::io(dir, e))?;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| CalmError::io(&lock_path, e))?;
    lock.lock().map_err(|e| CalmError::io(&lock_path, e))?;
    // Released when `lock` is closed, also on an error or a panic in `change`.
    change()
}

/// Drops `file`'s entry for `adapter` and `shape`; whether there was one.
fn drop_entry(file: &mut TuneFile, adapter: &AdapterKey, shape: &str) -> bool {
    let before = file.entries.len();
    file.entries
        .retain(|e| !(e.adapter == *adapter && e.shape == shape));
    file.entries.len() != before
}

fn save(path: &Path, file: &TuneFile) -> Result<()> {
    let text = serde_json::to_string_pretty(file).expect("plain data serialises");
    crate::model::write_atomic(path, text.as_bytes(), true)
}

/// What the tuning file holds for an adapter and shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// No file, or no entry for them.
    None,
    /// A choice measured with these kernels, and the file it came from.
    Found(Choice, PathBuf),
    /// An entry made by another build of calm-gpu (other kernels), ignored.
    Stale(PathBuf),
    /// A file that cannot be read or is not one this build understands, and why: ignored by
    /// engines (a file shared with a newer calm-gpu must not stop an older one), refused by
    /// `calm-gpu tune`, which would overwrite it.
    Unreadable(PathBuf, String),
}

/// The tuned choice for `ctx`'s adapter and `g`, if the tuning file has one. Never fails: a
/// file it cannot use is [`Lookup::Unreadable`].
pub fn lookup(ctx: &GpuContext, g: &Geometry, path: &Path) -> Lookup {
    let path = path.to_path_buf();
    let file = match read(&path) {
        Ok(f) => f,
        Err(why) => return Lookup::Unreadable(path, why),
    };
    let key = AdapterKey::of(&ctx.info);
    let shape = shape_key(g);
    let Some(e) = file
        .entries
        .iter()
        .find(|e| e.adapter == key && e.shape == shape)
    else {
        return Lookup::None;
    };
    match Choice::parse(&e.choice) {
        Ok(c) if c.code_hash(g.k) == e.code => Lookup::Found(c, path),
        _ => Lookup::Stale(path),
    }
}

/// The staged tile shapes `calm-gpu tune` tries on a hardware adapter for K up to 64 (the MNIST
/// protocol's shape first), after the built-in choice; docs/perf.md gives each one's prediction.
pub const SHAPES_SMALL_K: &[&str] = &[
    // Next to the built-in (e=8x8x16@32su,m=4x4x16@16u, the fastest on an H200 on
    // 2026-11-29): `g`,
    // which helped both steps alone there, with it (BK 32 with it is at the end: 41 KiB of
    // workgroup memory, beyond lavapipe's 32).
    "e=8x8x16@32sug,m=4x4x16@16ug",
    // Every option that cuts the E-step's memory transactions (`s`, `g`, `c`) with the M-step
    // tile of all 400 columns (below); then the A tiles a float per thread (`g`) and the
    // E-step's results through workgroup memory (`c`) on the built-in shapes, together and
    // alone, so that each one's effect can be read off.
    "e=8x8x16@32sgc,m=8x8x16@50x8sgp",
    "e=8x8x16@32gc,m=4x4x16@16g",
    "e=8x8x16@32g,m=4x4x16@16g",
    "e=8x8x16@32c,m=4x4x16@16",
    "e=8x8x16@32sgc,m=4x4x16@20x16gp",
    // One M-step column tile of all 400 columns and 64 kernels, 8 x 8 blocks (4 FMAs
    // per workgroup-memory load against 2 for 4 x 4): 1.8x faster M-step on lavapipe.
    "e=8x8x16@32s,m=8x8x16@50x8sp",
    "e=8x8x16@32s,m=8x8x16@50x8s",
    "e=8x8x16@32s,m=4x8x16@50x16s",
    "e=8x8x16@32,m=4x4x16@20x16",
    "e=8x8x16@32,m=4x4x16@20x16p",
    "e=8x8x16@32s,m=4x4x16@20x16p",
    "e=8x8x32@32s,m=4x4x32@20x16p",
    "e=8x8x16@32,m=4x4x16@25x16",
    "e=8x8x16@32,m=4x8x16@25x16s",
    "e=8x8x16@32s,m=4x4x16@20x16",
    "e=8x8x16@32s,m=4x4x16@16",
    "e=8x8x16@32su,m=4x4x16@16u",
    "e=8x8x16@32sd,m=4x4x16@16d",
    "e=8x4x16@16,m=4x4x16@16",
    "e=8x8x32@32su,m=4x4x32@16u",
];

/// The same for K above 64 (the STL-10 protocol's K 200).
pub const SHAPES_LARGE_K: &[&str] = &[
    // The built-in for K 200, R 675 (the fastest on an H200 on 2026-11-29) with the steps
    // written out.
    "e=8x8x16@16x25su,m=4x8x16@17x50su",
    "e=8x8x16@16x25,m=8x8x16@10x25",
    "e=8x8x16@16x25,m=8x8x16@10x25p",
    "e=8x8x16@8x25,m=8x8x16@10x25",
    "e=8x8x16@16x25s,m=4x8x16@17x50s",
    "e=8x8x16@32s,m=8x8x16@8s",
    "e=8x8x16@32sgc,m=8x8x16@8sg",
    "e=8x8x16@32c,m=8x8x16@8",
    "e=8x8x16@16x25g,m=8x8x16@10x25gp",
    "e=8x8x16@32sd,m=8x8x16@8sd",
    "e=8x8x16@16,m=8x8x16@16",
];

/// The tensor-core E-step's shapes `calm-gpu tune` times where it runs (`c=` of `CALM_TILES`),
/// beside the default 2x2x16@2x2 (64 x 64 results per workgroup of four subgroups): the stage
/// twice as deep (fewer barriers per product), and blocks of 4 x 2 and 2 x 4 matrices per
/// subgroup (more products per operand loaded), on four and eight subgroups.
pub const COOP_SHAPES: &[&str] = &[
    "2x2x32@2x2",
    "4x2x16@2x2",
    "2x4x16@2x2",
    "4x2x32@2x2",
    "2x4x32@2x2",
    "2x2x32@4x2",
    "4x2x16@2x4",
    "4x2x32@2x4",
];

/// The candidates `calm-gpu tune` times by default for `k` kernels on `ctx`'s adapter: the
/// built-in choice first, then the shapes that fit K and R (docs/perf.md says why each), the
/// uniform-buffer kernels and the direct ones. On a software adapter (llvmpipe), where the
/// staged kernels run several times slower than the uniform-buffer ones, only those and the
/// built-in staged tiles.
pub fn candidates(ctx: &GpuContext, g: &Geometry) -> Result<Vec<Choice>> {
    let k = g.k;
    let staged = |s: &str| {
        Choice::new(
            Variant::Staged,
            Tiles::parse(s).expect("a built-in tile shape parses"),
        )
    };
    let uniform = |rm, rr| {
        Choice::new(
            Variant::Uniform,
            Tiles {
                u_rm: rm,
                u_rr: rr,
                ..Tiles::default()
            },
        )
    };
    let builtin = builtin_choice(ctx, g)?;
    let mut list = vec![builtin];
    let software = ctx.info.device_type == wgpu::DeviceType::Cpu;
    if software {
        // What CALM_KERNELS=staged runs here.
        list.push(Choice::new(
            Variant::Staged,
            Tiles::for_shape(k, g.r(), ctx.limits.max_compute_workgroup_storage_size),
        ));
        list.extend([uniform(4, 4), uniform(8, 4), uniform(4, 8), uniform(2, 4)]);
    } else {
        let shapes = if k <= 64 {
            SHAPES_SMALL_K
        } else {
            SHAPES_LARGE_K
        };
        list.extend(shapes.iter().map(|s| staged(s)));
        if let Some(coop) = ctx.coop {
            // The tensor-core E-step's shapes that fit, beside the built-in staged M-step.
            let with = |c: &str| {
                let t = Tiles::parse(&format!("{},c={c}", builtin.tiles))
                    .expect("a built-in tensor-core shape parses");
                Choice::new(Variant::Coop, t)
            };
            list.push(Choice::new(Variant::Coop, builtin.tiles));
            list.extend(
                COOP_SHAPES
                    .iter()
                    .map(|c| with(c))
                    .filter(|c| coop.fits(&c.tiles.coop, &ctx.limits).is_ok()),
            );
        }
        list.extend([
            uniform(4, 4),
            Choice::new(Variant::Direct, Tiles::default()),
        ]);
    }
    // The same choice twice (the built-in one is also in a list) is timed once.
    let mut seen: Vec<Choice> = Vec::new();
    list.retain(|c| {
        let fresh = !seen.contains(c);
        seen.push(*c);
        fresh
    });
    Ok(list)
}

/// A candidate whose warm-up epoch (pipeline compilation included) takes [`SLOW_WARMUP`] times
/// the reference's (the built-in choice's), and over [`SLOW_WARMUP_FLOOR_S`], is not timed
/// further: it cannot win, and on a large problem its timed epochs would cost minutes of a
/// lent GPU (the direct kernels on the STL-10 shape). The floor keeps small runs, where
/// compilation is most of a warm-up, from cutting anything.
pub const SLOW_WARMUP: f64 = 5.0;
/// Seconds below which a warm-up never cuts a candidate ([`SLOW_WARMUP`]).
pub const SLOW_WARMUP_FLOOR_S: f64 = 2.0;

/// The warm-up seconds beyond which a candidate is not timed, given the reference's.
pub fn warmup_limit(reference_warmup_s: f64) -> f64 {
    (reference_warmup_s * SLOW_WARMUP).max(SLOW_WARMUP_FLOOR_S)
}

/// A tuned choice must beat the built-in one by this fraction of its epoch to be kept: two
/// timings of the same kernels differ by a few percent on a busy machine (docs/perf.md), and a
/// kept choice outlives later changes to the built-in rule.
pub const MARGIN: f64 = 0.03;

/// A candidate's timed epochs, in seconds: the median and the range, leaving out the fastest
/// and the slowest epoch when there are 4 or more (one stray epoch, a clock change or another
/// process, does not decide).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median seconds of the timed epochs.
    pub median: f64,
    /// Seconds of the fastest epoch kept.
    pub low: f64,
    /// Seconds of the slowest epoch kept.
    pub high: f64,
}

impl Timing {
    /// The median and range of `epochs` (seconds of each timed epoch); `None` if empty.
    pub fn of(epochs: &[f64]) -> Option<Timing> {
        let mut v = epochs.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let median = *v.get(v.len() / 2)?;
        let trim = usize::from(v.len() >= 4);
        Some(Timing {
            median,
            low: v[trim],
            high: v[v.len() - 1 - trim],
        })
    }
}

/// Which of the timed candidates to keep: the fastest by median that beats the built-in
/// choice's (`builtin`; `None` if the built-in did not run) by [`MARGIN`] and whose range of
/// epochs lies below the built-in's ([`Timing`]), so that the difference is not the run's
/// noise (short epochs on a busy machine spread by more than the margin). `timed` holds each
/// candidate that passed the check. `Err` says why the built-in choice stays.
pub fn pick(
    builtin: Option<Timing>,
    timed: &[(Choice, Timing)],
) -> std::result::Result<(Choice, Timing), String> {
    let mut by_median = timed.to_vec();
    by_median.sort_by(|a, b| a.1.median.total_cmp(&b.1.median));
    let Some(&fastest) = by_median.first() else {
        return Err("no candidate ran".into());
    };
    let Some(b) = builtin else {
        return Ok(fastest);
    };
    let within_margin = |t: &Timing| t.median > b.median * (1.0 - MARGIN);
    if within_margin(&fastest.1) {
        return Err(format!("nothing beat it by {:.0}% or more", MARGIN * 100.0));
    }
    // The fastest whose win is beyond the noise; a slower one may be where the fastest's is not.
    if let Some(&kept) = by_median
        .iter()
        .take_while(|(_, t)| !within_margin(t))
        .find(|(_, t)| t.high < b.low)
    {
        return Ok(kept);
    }
    let ms = |s: f64| s * 1e3;
    Err(format!(
        "{} was faster by its median, but its epochs ({:.2}-{:.2} ms) overlap the built-in's \
         ({:.2}-{:.2} ms), as do those of any other faster by the margin: within the noise of \
         this run; try more images or epochs",
        fastest.0,
        ms(fastest.1.low),
        ms(fastest.1.high),
        ms(b.low),
        ms(b.high)
    ))
}

/// Why a timed candidate's first epoch (LL `ll` over `n` images) disagrees with the reference
/// run's (`reference`: the built-in choice's, or the first that was timed), if it does. Both
/// start from the same theta on the same images, so they agree to f32 rounding: allowed 1e-4 of
/// |LL| plus 1e-3 nats per image, far below what a wrong tile gives (order 1 per image).
pub fn ll_disagrees(reference: Option<f64>, ll: f64, n: usize) -> Option<String> {
    if !ll.is_finite() {
        return Some(format!("FAILED: the first epoch's LL is {ll}"));
    }
    let lb = reference?;
    let allowed = 1e-4 * lb.abs() + 1e-3 * n as f64;
    ((ll - lb).abs() > allowed).then(|| {
        format!(
            "FAILED: the first epoch's LL {ll:.6e} differs from the reference run's {lb:.6e} by more than {allowed:.1e}"
        )
    })
}

/// The kernels an engine runs and who chose them.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The implementation of the GEMM kernels.
    pub variant: Variant,
    /// Their tiles.
    pub tiles: Tiles,
    /// What the tuning file said (consulted only when the caller chose nothing).
    pub tuned: Lookup,
    /// Who chose when the caller did ("chosen by the caller" unless it says).
    pub chosen_by: Option<String>,
}

/// The kernels for `g` on `ctx`'s adapter: the caller's `tiles` and `variant` where given,
/// else the entry of `tune_file` for this adapter and shape, else the built-in rule; checked
/// against the adapter's limits.
pub fn choose(
    ctx: &GpuContext,
    g: &Geometry,
    tiles: Option<Tiles>,
    variant: Option<Variant>,
    tune_file: Option<&Path>,
    chosen_by: Option<String>,
) -> Result<Chosen> {
    let chosen_by = (tiles.is_some() || variant.is_some())
        .then(|| chosen_by.unwrap_or_else(|| "chosen by the caller".into()));
    let tuned = match (tune_file, &chosen_by) {
        (Some(path), None) => lookup(ctx, g, path),
        _ => Lookup::None,
    };
    let tuned_choice = match &tuned {
        Lookup::Found(c, _) => Some(*c),
        _ => None,
    };
    let tiles = tiles_for(ctx, tiles.or(tuned_choice.map(|c| c.tiles)), g)?;
    let variant = match variant.or(tuned_choice.map(|c| c.variant)) {
        Some(v) => resolve_variant(ctx, g, &tiles, v, true)?,
        None => resolve_variant(ctx, g, &tiles, Variant::builtin(&ctx.info), false)?,
    };
    if variant.mstep() == Variant::Staged {
        staged_tiles_fit(ctx, &tiles)?;
    }
    Ok(Chosen {
        variant,
        tiles,
        tuned,
        chosen_by,
    })
}

fn tiles_for(ctx: &GpuContext, opt: Option<Tiles>, g: &Geometry) -> Result<Tiles> {
    let k = g.k;
    let tiles = match opt {
        Some(t) => t,
        None => Tiles::for_shape(k, g.r(), ctx.limits.max_compute_workgroup_storage_size),
    };
    // The uniform-buffer kernels' tile of kernels follows K, whoever chose the rest.
    let tiles = Tiles {
        u_tn: Tiles::uniform_tn(k),
        ..tiles
    };
    tiles
        .check()
        .map_err(|why| CalmError::Invalid(format!("tiles {tiles}: {why}")))?;
    Ok(tiles)
}

/// The variant an engine runs when `wanted` is asked for (`asked`: by the caller, CALM_KERNELS
/// or the tuning file) or is the adapter's default. The uniform-buffer kernels need 64 KiB
/// uniform bindings, and a row of theta and of G and the offset table to fit one (K up to about
/// 2,000, R up to 16,384): asked for where they do not fit, an error. Chosen by default only
/// where a window holds 64 rows or more (K up to 248): below that, the windows (a bind group and
/// a dispatch each) grow too many; else the staged kernels.
fn resolve_variant(
    ctx: &GpuContext,
    g: &Geometry,
    tiles: &Tiles,
    wanted: Variant,
    asked: bool,
) -> Result<Variant> {
    if wanted == Variant::Coop && ctx.coop.is_none() {
        return Err(CalmError::Gpu(format!(
            "the tensor-core kernels (coop) do not run on {}: {}; choose staged",
            ctx.info.name,
            ctx.coop_missing()
        )));
    }
    if wanted != Variant::Uniform {
        return Ok(wanted);
    }
    let rows_u = ubo_rows(g.kpad(), tiles.u_tn);
    let fits = rows_u > 0
        && g.r() <= UBO_FLOATS
        && ctx.limits.max_uniform_buffer_binding_size >= UBO_FLOATS as u64 * 4;
    if asked && !fits {
        return Err(CalmError::Invalid(format!(
            "the uniform-buffer kernels need 64 KiB uniform bindings ({} allows {} bytes), K <= 2,000 and R <= {UBO_FLOATS}; K={} and R={} (choose the staged kernels)",
            ctx.info.name,
            ctx.limits.max_uniform_buffer_binding_size,
            g.k,
            g.r()
        )));
    }
    Ok(if !fits || (!asked && rows_u < 64) {
        Variant::Staged
    } else {
        Variant::Uniform
    })
}

/// The kernels an engine for `g` runs on `ctx`'s adapter when nobody chose (no options, no
/// `CALM_TILES` or `CALM_KERNELS`, no tuning file): what `calm-gpu tune` measures against.
pub fn builtin_choice(ctx: &GpuContext, g: &Geometry) -> Result<Choice> {
    let tiles = Tiles {
        u_tn: Tiles::uniform_tn(g.k),
        ..Tiles::for_shape(g.k, g.r(), ctx.limits.max_compute_workgroup_storage_size)
    };
    let variant = resolve_variant(ctx, g, &tiles, Variant::builtin(&ctx.info), false)?;
    Ok(Choice::new(variant, tiles))
}

/// Whether the adapter runs the staged kernels with `tiles`: their workgroup memory and thread
/// counts against its limits (the other variants use neither).
fn staged_tiles_fit(ctx: &GpuContext, tiles: &Tiles) -> Result<()> {
    let (e, m) = tiles.workgroup_bytes();
    let l = &ctx.limits;
    let max = l.max_compute_workgroup_storage_size;
    if e.max(m) > max {
        return Err(CalmError::Gpu(format!(
            "tiles {tiles} need {} bytes of workgroup memory; {} allows {max}",
            e.max(m),
            ctx.info.name
        )));
    }
    for (wx, wy) in [(tiles.e_wx, tiles.e_wy), (tiles.m_wx, tiles.m_wy)] {
        if wx as u64 * wy as u64 > l.max_compute_invocations_per_workgroup as u64
            || wx > l.max_compute_workgroup_size_x
            || wy > l.max_compute_workgroup_size_y
        {
            return Err(CalmError::Gpu(format!(
                "tiles {tiles} need workgroups of {wx} x {wy} threads; {} allows {} x {}, {} in all",
                ctx.info.name,
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_invocations_per_workgroup
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hardware lists are only run on a GPU (lavapipe gets its own list), where a shape that
    /// does not parse would stop the sweep: each parses, keeps the tiles' rules, fits the H100's
    /// 48 KiB of workgroup memory and 1,024 threads, and appears once.
    #[test]
    fn every_hardware_shape_parses_and_fits_an_h100() {
        for list in [SHAPES_SMALL_K, SHAPES_LARGE_K] {
            for (i, s) in list.iter().enumerate() {
                let t = Tiles::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
                let (e, m) = t.workgroup_bytes();
                assert!(e.max(m) <= 49_152, "{s}: {e} and {m} bytes");
                let (te, tm) = t.threads();
                assert!(te.max(tm) <= 1024, "{s}");
                assert!(!list[..i].contains(s), "{s} twice");
            }
        }
    }

    #[test]
    fn first_epochs_must_agree_to_rounding() {
        // 1,000 images, LL -1.2e5: allowed 12 + 1 nats.
        assert_eq!(ll_disagrees(Some(-1.2e5), -1.2e5 + 12.9, 1000), None);
        assert!(ll_disagrees(Some(-1.2e5), -1.2e5 + 13.1, 1000).is_some());
        assert!(ll_disagrees(Some(-1.2e5), -1.2e5 - 13.1, 1000).is_some());
        // LL near zero: the per-image floor.
        assert_eq!(ll_disagrees(Some(0.5), 0.9, 1000), None);
        assert!(ll_disagrees(Some(0.5), 2.0, 1000).is_some());
        // Not finite: a failure with or without a reference.
        assert!(ll_disagrees(None, f64::NAN, 10).is_some());
        assert!(ll_disagrees(Some(1.0), f64::INFINITY, 10).is_some());
        assert_eq!(ll_disagrees(None, -5.0, 10), None);
    }

    #[test]
    fn a_choice_is_kept_only_where_it_beats_the_built_in_by_the_margin_and_the_noise() {
        let c = |s| Choice::parse(s).unwrap();
        let (u, d, s) = (
            c("uniform:u=4x4"),
            c("direct"),
            c("staged:e=8x8x16@32,m=4x4x16@16"),
        );
        let t = |e: &[f64]| Timing::of(e).unwrap();
        assert_eq!(
            t(&[3.0, 1.0, 2.0]),
            Timing {
                median: 2.0,
                low: 1.0,
                high: 3.0
            }
        );
        // From 4 epochs on, one stray epoch on each side is left out of the range.
        assert_eq!(
            t(&[3.0, 1.0, 2.0, 9.0, 0.1]),
            Timing {
                median: 2.0,
                low: 1.0,
                high: 3.0
            }
        );
        assert_eq!(Timing::of(&[]), None);
        let one = t(&[1.0]);
        // The built-in is among the timed ones: 1.0 s; 0.98 is within the margin, 0.96 is not.
        let within = pick(Some(one), &[(u, one), (d, t(&[0.98]))]).unwrap_err();
        assert!(within.contains("by 3%"), "{within}");
        assert_eq!(
            pick(Some(one), &[(u, one), (d, t(&[0.98])), (s, t(&[0.96]))]),
            Ok((s, t(&[0.96])))
        );
        assert!(pick(Some(one), &[(u, one)]).is_err());
        // Faster by the median, but a slow epoch reaches the built-in's fastest: noise.
        let b = t(&[1.0, 0.95, 1.05]);
        let noisy = pick(Some(b), &[(u, b), (s, t(&[0.8, 0.85, 0.95]))]).unwrap_err();
        assert!(noisy.contains("within the noise"), "{noisy}");
        assert_eq!(
            pick(Some(b), &[(u, b), (s, t(&[0.8, 0.85, 0.94]))]),
            Ok((s, t(&[0.8, 0.85, 0.94])))
        );
        // Five epochs: one slow epoch of the candidate does not decide.
        let b5 = t(&[1.0, 0.99, 1.01, 1.0, 0.98]);
        let c5 = t(&[0.9, 0.91, 0.89, 1.2, 0.9]);
        assert_eq!(pick(Some(b5), &[(u, b5), (s, c5)]), Ok((s, c5)));
        // The fastest by median is noise; a slower one beats the built-in beyond it: kept.
        let clear = t(&[0.93, 0.93, 0.94]);
        assert_eq!(
            pick(Some(b), &[(u, b), (s, t(&[0.8, 0.85, 0.95])), (d, clear)]),
            Ok((d, clear))
        );
        // Nothing passed; or the built-in did not run, so the fastest that did is kept.
        assert!(pick(Some(one), &[]).is_err());
        assert_eq!(
            pick(None, &[(d, t(&[2.0])), (s, t(&[1.5]))]),
            Ok((s, t(&[1.5])))
        );
    }

    /// A FIFO or an oversized file named as the tuning file is refused without being opened
    /// (a FIFO's open would block every GPU run) or read whole.
    #[cfg(unix)]
    #[test]
    fn only_a_regular_file_of_sane_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("tuned.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path and mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // In a thread, so that a regression fails here instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || tx.send(load(&f).map(|_| ()).map_err(|e| e.to_string())));
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO as the tuning file blocked")
            .unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let e = load(&big).unwrap_err().to_string();
        assert!(e.contains("more than a tuning file holds"), "{e}");
    }

    #[test]
    fn only_a_long_and_much_slower_warm_up_is_cut() {
        assert_eq!(warmup_limit(1.0), 5.0);
        // Small runs: compilation dominates, nothing under the floor is cut.
        assert_eq!(warmup_limit(0.01), SLOW_WARMUP_FLOOR_S);
    }

    #[test]
    fn tune_runs_that_store_at_once_keep_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tuned.json");
        let adapter = AdapterKey {
            backend: "vulkan".into(),
            name: "test".into(),
            vendor: 1,
            device: 2,
            driver: "d".into(),
            driver_info: "i".into(),
        };
        let (threads, each) = (8, 5);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (path, adapter) = (&path, &adapter);
                s.spawn(move || {
                    for i in 0..each {
                        let entry = Entry {
                            adapter: adapter.clone(),
                            shape: format!("shape {t} {i}"),
                            choice: "direct".into(),
                            code: "0".into(),
                            epoch_ms: 1.0,
                            gflops: 1.0,
                            builtin: "uniform:u=4x4".into(),
                            builtin_epoch_ms: None,
                            images: 1,
                            measured_at: 0,
                        };
                        store(path, entry).unwrap();
                    }
                    // And one removed again, beside the others' stores.
                    assert!(remove(path, adapter, &format!("shape {t} 0")).unwrap());
                });
            }
        });
        let file = load(&path).unwrap();
        let mut shapes: Vec<_> = file.entries.iter().map(|e| e.shape.clone()).collect();
        shapes.sort();
        let mut want: Vec<_> = (0..threads)
            .flat_map(|t| (1..each).map(move |i| format!("shape {t} {i}")))
            .collect();
        want.sort();
        assert_eq!(shapes, want);
    }

    #[test]
    fn choices_round_trip_and_bad_ones_are_refused() {
        for s in [
            "staged:e=8x8x16@32,m=4x4x16@20x16p",
            "staged:e=8x8x16@32sd,m=4x4x16@16d",
            "uniform:u=8x4",
            "direct",
        ] {
            let c = Choice::parse(s).unwrap();
            assert_eq!(c.to_string(), s);
            assert_eq!(Choice::parse(&c.to_string()).unwrap(), c);
        }
        assert_eq!(
            Choice::parse("uniform").unwrap().to_string(),
            "uniform:u=4x4"
        );
        for s in [
            "staged",
            "staged:",
            "staged:u=4x4",
            "uniform:e=8x8x16@32",
            "uniform:u=9x4",
            "direct:e=8x8x16@32",
            "fast",
            "",
        ] {
            assert!(Choice::parse(s).is_err(), "{s} parsed");
        }
    }

    #[test]
    fn code_hash_follows_the_generated_kernels() {
        let a = Choice::parse("staged:e=8x8x16@32,m=4x4x16@20x16").unwrap();
        let b = Choice::parse("staged:e=8x8x16@32,m=4x4x16@20x16p").unwrap();
        assert_eq!(a.code_hash(64), a.code_hash(64));
        assert_ne!(a.code_hash(64), b.code_hash(64));
        // The uniform kernels' block of kernels follows K, so their code does too.
        let u = Choice::parse("uniform:u=4x4").unwrap();
        assert_ne!(u.code_hash(64), u.code_hash(200));
        assert_eq!(a.code_hash(64).len(), 16);
        // What is hashed ignores comments and indentation, and nothing else.
        assert_eq!(
            code_only("let a = 1u; // why\n\n    let b = a;\n"),
            code_only("let a = 1u;\n// a note\nlet b = a;  // more")
        );
        assert_ne!(code_only("let a = 1u;"), code_only("let a = 2u;"));
    }
}
