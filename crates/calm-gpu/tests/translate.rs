//! Every kernel, in every variant the engine can build, translated by naga to HLSL (what wgpu
//! hands DX12) and to MSL (what it hands Metal), with only the capabilities those back ends
//! have: a kernel that DX12 or Metal would reject fails here, on any machine, no GPU needed.
//! CI runs the GPU tests themselves only on Linux's Vulkan and GL devices.

use calm_gpu::gpu::Tiles;
use calm_gpu::gpu::codegen::source;
use calm_gpu::gpu::kernels::ALL;
use calm_gpu::gpu::tune::{SHAPES_LARGE_K, SHAPES_SMALL_K};
use naga::back::{hlsl, msl};

#[derive(Clone, Copy, Debug)]
enum Lang {
    Hlsl,
    Msl,
}

/// `text` (WGSL) translated to `lang`, or why not: a parse error, a validation error against
/// the back end's capabilities, or the writer's.
fn translate(lang: Lang, text: &str) -> Result<String, String> {
    let module = naga::front::wgsl::parse_str(text).map_err(|e| e.emit_to_string(text))?;
    let caps = match lang {
        Lang::Hlsl => hlsl::supported_capabilities(),
        Lang::Msl => msl::supported_capabilities(),
    };
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| format!("{lang:?} validation: {:?}", e.into_inner()))?;
    match lang {
        Lang::Hlsl => {
            // Shader model 5.1: what wgpu's DX12 back end compiles with FXC, the oldest it
            // uses; DXC's 6.x accepts all of it too.
            let options = hlsl::Options {
                shader_model: hlsl::ShaderModel::V5_1,
                ..Default::default()
            };
            let mut out = String::new();
            hlsl::Writer::new(&mut out, &options, &hlsl::PipelineOptions::default())
                .write(&module, &info, None)
                .map_err(|e| format!("HLSL: {e}"))?;
            Ok(out)
        }
        Lang::Msl => {
            // MSL 2.0 (macOS 10.13): below every version wgpu's Metal back end asks for.
            let options = msl::Options {
                lang_version: (2, 0),
                ..Default::default()
            };
            msl::write_string(&module, &info, &options, &msl::PipelineOptions::default())
                .map(|(text, _)| text)
                .map_err(|e| format!("MSL: {e}"))
        }
    }
}

/// The tiles the engine can be asked to run: the defaults, the built-in rules for the two
/// protocols' shapes and the portable 16 KiB limit, every candidate `calm-gpu tune` times, and
/// the uniform-buffer kernels' blocks.
fn every_choice() -> Vec<Tiles> {
    let mut tiles = vec![
        Tiles::default(),
        Tiles::for_shape(64, 400, 49152),
        Tiles::for_shape(200, 675, 49152),
        Tiles::for_shape(128, 400, 49152),
        Tiles::for_shape(64, 400, 16384),
        Tiles::for_shape(16, 9, 49152),
    ];
    for s in SHAPES_SMALL_K.iter().chain(SHAPES_LARGE_K) {
        tiles.push(Tiles::parse(s).unwrap());
    }
    for u in ["u=1x1", "u=8x2", "u=2x8", "u=4x4"] {
        tiles.push(Tiles::parse(u).unwrap());
    }
    tiles.push(Tiles {
        u_tn: 8,
        ..Tiles::default()
    });
    tiles
}

#[test]
fn every_kernel_translates_to_hlsl_and_msl() {
    let mut translated = 0;
    for t in every_choice() {
        for (name, kernel) in ALL {
            let text = source(kernel, &t);
            for lang in [Lang::Hlsl, Lang::Msl] {
                let out = translate(lang, &text)
                    .unwrap_or_else(|e| panic!("{name} with tiles {t} does not translate: {e}"));
                assert!(
                    out.contains("main"),
                    "{name} {lang:?}: no entry point written"
                );
                translated += 1;
            }
        }
    }
    assert!(translated >= 2 * 14 * 30, "{translated} translations");
}

/// The test above can fail: a kernel that each back end cannot express is refused, with the
/// reason, while it translates for the other one.
#[test]
fn a_kernel_a_back_end_cannot_express_fails_there() {
    let header = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n";
    // Metal has no 64-bit floats.
    let doubles = format!(
        "{header}@compute @workgroup_size(64)\nfn main(@builtin(global_invocation_id) id: vec3<u32>) {{\n    let x = f64(id.x) * 0.5lf;\n    out[id.x] = f32(x);\n}}\n"
    );
    // DX12 has no subgroup barrier.
    let subgroup = format!(
        "{header}@compute @workgroup_size(64)\nfn main(@builtin(global_invocation_id) id: vec3<u32>) {{\n    out[id.x] = 1.0;\n    subgroupBarrier();\n}}\n"
    );
    // (Refused by validation against Metal's capabilities, before the writer.)
    let msl = translate(Lang::Msl, &doubles).unwrap_err();
    assert!(msl.starts_with("Msl validation"), "{msl}");
    translate(Lang::Hlsl, &doubles).expect("HLSL has doubles");
    let hlsl = translate(Lang::Hlsl, &subgroup).unwrap_err();
    assert!(hlsl.contains("SUBGROUP_BARRIER"), "{hlsl}");
    translate(Lang::Msl, &subgroup).expect("MSL has subgroup barriers");
}
