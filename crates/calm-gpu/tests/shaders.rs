//! Every WGSL kernel parses and validates with naga (the compiler wgpu uses), for the tile
//! shapes calm-gpu picks and the ones `CALM_TILES` may ask for: no GPU needed.

use std::path::Path;

use calm_gpu::gpu::Tiles;
use calm_gpu::gpu::codegen::{kernel_text, set_block, set_const, source};
use calm_gpu::gpu::kernels::{ALL, CoopTiles, ESTEP, ESTEP_UBO, MSTEP, MSTEP_UBO, PARAMS};

/// Set to rewrite the files these snapshot tests compare against (the generated blocks of
/// `shaders/*.wgsl` and `tests/snapshots/`) after a deliberate change of the generator; review
/// the diff before committing it.
const BLESS: &str = "CALM_BLESS";

/// Compares `text` with the file at `path` (relative to the crate), or writes it there when
/// [`BLESS`] is set.
fn snapshot(path: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var_os(BLESS).is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with {BLESS}=1 to write it)", path.display()));
    if want != text {
        let line = want
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(text.lines().count()));
        panic!(
            "{} differs from the generated text from line {} on (run with {BLESS}=1 to update it, then review the diff)",
            path.display(),
            line + 1
        );
    }
}

/// The GEMM kernels and their files.
const GENERATED: [(&str, &str); 4] = [
    ("estep", ESTEP),
    ("mstep", MSTEP),
    ("estep_ubo", ESTEP_UBO),
    ("mstep_ubo", MSTEP_UBO),
];

/// Each `.wgsl` file is a whole kernel: exactly what the generator writes for the default
/// tiles, and valid WGSL as it stands (with the shared `Params` header).
#[test]
fn the_shader_files_are_the_generated_kernels_for_the_default_tiles() {
    for (name, kernel) in GENERATED {
        let text = kernel_text(kernel, &Tiles::default());
        snapshot(&format!("shaders/{name}.wgsl"), &text);
        validate(name, &format!("{PARAMS}\n{kernel}"));
    }
}

/// What the generator writes for the tiles that run the MNIST protocol on an H200 and for the
/// STL-10 protocol's, with the options the built-in tiles leave off (fused posteriors, stores
/// through workgroup memory, the transposed A tile, double buffering) in a third: any change
/// to the generated text shows here first.
#[test]
fn generated_kernels_match_their_snapshots() {
    let choices = [
        ("mnist-h200", Tiles::for_shape(64, 400, 49152)),
        ("stl10-h200", Tiles::for_shape(200, 675, 49152)),
        (
            "options",
            Tiles::parse("e=8x8x16@32sdgc,m=8x8x16@50x8sdgp,u=2x8").unwrap(),
        ),
    ];
    for (label, tiles) in choices {
        for (name, kernel) in GENERATED {
            let text = kernel_text(kernel, &tiles);
            // Where these tiles give the default text (the uniform-buffer kernels for K 64),
            // the file itself is the snapshot, checked above.
            let path = format!("tests/snapshots/{name}-{label}.wgsl");
            if text == kernel {
                assert!(
                    !Path::new(env!("CARGO_MANIFEST_DIR")).join(&path).exists(),
                    "{path}: the same as the file; remove it"
                );
                continue;
            }
            snapshot(&path, &text);
        }
    }
}

#[test]
fn constants_and_blocks_must_exist_to_be_set() {
    let text = "const RM: u32 = 8u;  // note\n// <generated fma>\nold\n// </generated fma>\n";
    assert_eq!(
        set_const(text, "RM", 4),
        "const RM: u32 = 4u;  // note\n// <generated fma>\nold\n// </generated fma>\n"
    );
    assert_eq!(
        set_block(text, "fma", "new\n"),
        "const RM: u32 = 8u;  // note\n// <generated fma>\nnew\n// </generated fma>\n"
    );
    for bad in [
        std::panic::catch_unwind(|| set_const(text, "RN", 4)),
        std::panic::catch_unwind(|| set_block(text, "store", "")),
        std::panic::catch_unwind(|| set_block("// <generated fma>\nopen\n", "fma", "")),
    ] {
        assert!(bad.is_err());
    }
}

fn validate(name: &str, text: &str) {
    let module = naga::front::wgsl::parse_str(text)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(text)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
}

#[test]
fn every_kernel_validates() {
    let mut shapes = vec![
        Tiles::default(),
        Tiles::for_shape(64, 400, 49152),
        Tiles::for_shape(200, 675, 49152),
        Tiles::for_shape(200, 675, 16384),
        Tiles::for_shape(200, 300, 49152),
    ];
    shapes.push(Tiles::parse("e=4x4x8@8,m=4x8x4@32").unwrap());
    shapes.push(Tiles::parse("e=8x8x16@32s,m=8x8x16@8s").unwrap());
    shapes.push(Tiles::parse("e=8x8x16@32su,m=4x8x8@16u").unwrap());
    shapes.push(Tiles::parse("e=8x8x16@32sud,m=8x8x16@8d").unwrap());
    shapes.push(Tiles::parse("u=1x3").unwrap());
    shapes.push(Tiles::parse("e=8x8x16@20x16,m=4x4x16@20x16").unwrap());
    shapes.push(Tiles::parse("e=8x4x8@12x20u,m=8x4x8@20x24d").unwrap());
    shapes.push(Tiles::parse("m=4x4x16@20x16p").unwrap());
    shapes.push(Tiles::parse("m=8x8x16@8sudp").unwrap());
    shapes.push(Tiles::parse("e=8x8x16@32sgc,m=8x8x16@50x8sgp").unwrap());
    shapes.push(Tiles::parse("e=8x4x16@16udgc,m=4x4x16@16dgp").unwrap());
    shapes.push(Tiles::parse("e=4x12x16@32x3gc,m=4x4x8@24x12gp").unwrap());
    shapes.push(Tiles::parse("e=8x8x8@32dc,m=4x4x16@16g").unwrap());
    shapes.push(Tiles::for_shape(16, 9, 49152));
    for t in &shapes {
        for (name, kernel) in ALL {
            validate(&format!("{name} {t}"), &source(kernel, t));
        }
    }
}

#[test]
fn tile_strings_round_trip_and_bad_ones_fail() {
    for s in [
        "e=8x8x16@32,m=8x8x16@8",
        "e=8x8x16@32s,m=4x4x16@16s",
        "e=8x8x16@32su,m=4x4x16@16u",
        "e=8x8x16@32sud,m=4x4x16@16d",
        "e=8x8x16@32,m=4x4x16@16,u=2x8",
        "e=8x8x16@20x16,m=4x4x16@20x16",
        "e=4x4x8@24x12s,m=4x8x8@25x16su",
        "e=8x8x16@32s,m=4x4x16@20x16sudp",
        "e=8x8x16@32sudc,m=4x4x16@20x16p",
        "e=8x8x16@32sgc,m=8x8x16@50x8sgp",
    ] {
        let t = Tiles::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(Tiles::parse(&t.to_string()).unwrap(), t);
    }
    assert_eq!(Tiles::parse("u=2x3").unwrap().u_rm, 2);
    assert_eq!(Tiles::parse("u=2x3").unwrap().u_rr, 3);
    assert!(!Tiles::default().to_string().contains("u="));
    assert!(Tiles::parse("e=8x8x16@32s").unwrap().e_strided);
    assert!(!Tiles::parse("e=8x8x16@32s").unwrap().m_strided);
    assert!(Tiles::parse("e=8x8x16@32us").unwrap().e_unroll);
    assert!(!Tiles::parse("e=8x8x16@32s").unwrap().e_unroll);
    assert!(Tiles::parse("m=4x4x16@16p").unwrap().m_fused);
    assert!(!Tiles::parse("m=4x4x16@16sud").unwrap().m_fused);
    assert!(Tiles::parse("e=8x8x16@32c").unwrap().e_coalesced);
    assert!(!Tiles::parse("e=8x8x16@32s").unwrap().e_coalesced);
    let single = Tiles::parse("e=8x8x16@32,m=4x4x16@16").unwrap();
    let g = Tiles::parse("e=8x8x16@32g,m=4x4x16@16g").unwrap();
    assert!(g.e_gather && g.m_gather);
    assert!(!Tiles::parse("e=8x8x16@32g").unwrap().m_gather);
    // The transposed layout: the same tiles in workgroup memory.
    assert_eq!(g.workgroup_bytes(), single.workgroup_bytes());
    // `c` keeps the workgroup memory: the results pass through the A tile.
    assert_eq!(
        Tiles::parse("e=8x8x16@32c").unwrap().workgroup_bytes(),
        Tiles::parse("e=8x8x16@32").unwrap().workgroup_bytes()
    );
    let d = Tiles::parse("e=8x8x16@32d,m=4x4x16@16d").unwrap();
    // Two stages of A and B tiles; the E-step's table of patch starts is not doubled.
    let (e1, m1) = single.workgroup_bytes();
    let (e2, m2) = d.workgroup_bytes();
    assert_eq!(e2 - e1, e1 - single.e_tm() * 4);
    assert_eq!(m2, 2 * m1);
    for bad in [
        "e=8x8",
        "e=7x8x16",
        "x=8x8x16",
        "e=8x8x16@12",
        "e=8x8x0",
        "e=8x8x16@s",
        "e=8x8x16@32x",
        "e=8x8x16@32x0",
        "e=8x8x16@4x4",
        "e=8x8x16@64x32",
        "m=8x4x16@3x64",
        "e=8x8x16@32p",
        "m=4x4x16@16pp",
        "m=4x4x16@16c",
        "e=8x8x16@32cc",
        "e=8x8x16@32gg",
        // 20 thread rows of results do not fit an A tile of 8 rows (16 when double-buffered).
        "e=8x4x8@16x20c",
        "e=8x4x8@16x20dc",
        "e=8x8x16@70000x70000",
        "e=8x8x16@16777217x256",
        "u=0x4",
        "u=4x9",
        "u=4",
        "u=4x4x4",
    ] {
        assert!(Tiles::parse(bad).is_err(), "{bad}");
    }
}

/// Shapes made in code are held to the same rules as parsed ones (`Tiles::check`): the M-step's
/// B sum needs a thread count that is a multiple of its kernel vec4s.
#[test]
fn tiles_made_in_code_are_checked() {
    assert!(Tiles::default().check().is_ok());
    let bad = Tiles {
        m_wx: 2,
        m_wy: 128,
        m_rk: 16,
        ..Tiles::default()
    };
    assert!(bad.check().is_err());
    let bad = Tiles {
        e_wx: 4,
        e_wy: 4,
        ..Tiles::default()
    };
    assert!(bad.check().is_err());
}

/// Where a stage's elements do not divide among the threads, the last share's loads are clamped
/// to the last element (the loads run before the guarded store, with naga's bounds checks off):
/// `m=4x4x4@20x16` has 4 x 20 = 80 vec4s of patches per stage for 320 threads. The default
/// E-step's tiles divide evenly and need no clamp.
#[test]
fn partial_prefetch_loads_are_clamped() {
    let t = Tiles::parse("e=8x8x16@32,m=4x4x4@20x16").unwrap();
    let text = source(calm_gpu::gpu::kernels::MSTEP, &t);
    assert!(
        text.contains("load_x(n, p0, min(lid + 0u, 79u), c0)"),
        "{text}"
    );
    let full = source(calm_gpu::gpu::kernels::ESTEP, &Tiles::default());
    assert!(!full.contains("min(lid"), "a full share needs no clamp");
}

/// What the tensor-core E-step needs of an adapter: f16, cooperative matrices and subgroups
/// (wgpu's SHADER_F16, EXPERIMENTAL_COOPERATIVE_MATRIX and SUBGROUP).
fn coop_capabilities() -> naga::valid::Capabilities {
    use naga::valid::Capabilities as C;
    C::SHADER_FLOAT16 | C::COOPERATIVE_MATRIX | C::SUBGROUP
}

fn coop_module(subgroup: u32, tiles: &CoopTiles) -> (naga::Module, naga::valid::ModuleInfo) {
    let text = calm_gpu::gpu::codegen::coop_estep_source(subgroup, tiles);
    let module = naga::front::wgsl::parse_str(&text)
        .unwrap_or_else(|e| panic!("estep_coop SG {subgroup}: {}", e.emit_to_string(&text)));
    let info =
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), coop_capabilities())
            .validate(&module)
            .unwrap_or_else(|e| panic!("estep_coop SG {subgroup}: {:?}", e.into_inner()));
    (module, info)
}

/// The tensor-core E-step's shapes the tests and `calm-gpu tune` use.
fn coop_shapes() -> Vec<CoopTiles> {
    let mut list = vec![CoopTiles::default()];
    list.extend(calm_gpu::gpu::tune::COOP_SHAPES.iter().map(|s| {
        Tiles::parse(&format!("e=8x4x16,m=4x4x16,c={s}"))
            .unwrap()
            .coop
    }));
    list
}

/// The file is the generator's text for the default shape and subgroups of 32.
#[test]
fn the_tensor_core_file_is_its_generated_default() {
    let text = calm_gpu::gpu::codegen::coop_text(32, &CoopTiles::default());
    snapshot("shaders/estep_coop.wgsl", &text);
}

/// The tensor-core E-step validates for the subgroup sizes of real GPUs (NVIDIA's 32, AMD's 64,
/// Intel's 16) and every shape tune tries, and naga writes it as SPIR-V, what wgpu hands Vulkan,
/// with its cooperative-matrix instructions in it; its workgroup memory is what the host checks
/// against the adapter's limit. Without the capabilities it is refused: an adapter that lacks
/// them never gets it.
#[test]
fn the_tensor_core_estep_validates_and_becomes_spirv() {
    for tiles in coop_shapes() {
        for sg in [16, 32, 64] {
            let (module, info) = coop_module(sg, &tiles);
            let words = naga::back::spv::write_vec(
                &module,
                &info,
                &naga::back::spv::Options {
                    lang_version: (1, 6),
                    ..Default::default()
                },
                None,
            )
            .unwrap_or_else(|e| panic!("estep_coop c={tiles} SG {sg} to SPIR-V: {e}"));
            // The instructions after the 5-word header, each `word count << 16 | opcode`:
            // OpCooperativeMatrixMulAddKHR (4459), three per matrix of a subgroup's block,
            // written once in the loop body.
            let mut muladds = 0;
            let mut at = 5;
            while at < words.len() {
                muladds += (words[at] & 0xffff == 4459) as usize;
                at += (words[at] >> 16).max(1) as usize;
            }
            let want = 3 * (tiles.mi * tiles.nj) as usize;
            assert_eq!(
                muladds, want,
                "c={tiles} SG {sg}: cooperative multiply-adds in the SPIR-V"
            );
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).unwrap();
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(_, v)| v.space == naga::AddressSpace::WorkGroup)
                .map(|(_, v)| layouter[v.ty].size)
                .sum();
            assert_eq!(bytes, tiles.workgroup_bytes(), "c={tiles}");
        }
    }
    let text = calm_gpu::gpu::codegen::coop_estep_source(32, &CoopTiles::default());
    let module = naga::front::wgsl::parse_str(&text).unwrap();
    assert!(
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default()
        )
        .validate(&module)
        .is_err(),
        "the tensor-core kernel validated without f16 and cooperative matrices"
    );
}

/// `c=` in a tile string round-trips, is left out of the string when it is the default, and
/// shapes outside the rules are refused.
#[test]
fn tensor_core_tiles_parse_and_are_checked() {
    let t = Tiles::parse("e=8x8x16@32su,m=4x4x16@16u,c=4x2x32@2x4").unwrap();
    assert_eq!(
        t.coop,
        CoopTiles {
            wm: 2,
            wn: 4,
            mi: 4,
            nj: 2,
            bk: 32
        }
    );
    assert_eq!(t.to_string(), "e=8x8x16@32su,m=4x4x16@16u,c=4x2x32@2x4");
    assert_eq!(Tiles::parse(&t.to_string()).unwrap(), t);
    assert!(!Tiles::default().to_string().contains("c="));
    for bad in [
        "c=4x4x16@2x2",
        "c=2x2x24@2x2",
        "c=2x2x16@5x1",
        "c=2x2x16",
        "c=2x2@2x2",
    ] {
        assert!(
            Tiles::parse(&format!("e=8x8x16,m=4x4x16,{bad}")).is_err(),
            "{bad} was taken"
        );
    }
}
