//! The generated parts of the GEMM kernels. Each `.wgsl` file in `shaders/` is a whole kernel
//! as it runs with [`Tiles::default`]: its tile constants (`const RM: u32 = 8u;`) and its
//! generated blocks (between `// <generated NAME>` and `// </generated NAME>`) hold that
//! choice's values. For other tiles this module sets the constants, writes the blocks again
//! (the register block's accumulators, FMAs and stores, written out so that every accumulator
//! stays in a register; the software pipeline's loads), writes out the `// <steps>` loop where
//! the tiles ask for it, and for [`Tiles::m_fused`] swaps in the fused posterior loads.
//! tests/shaders.rs checks that the files are this module's output for the default tiles and
//! keeps a snapshot of its output for the built-in tiles of the MNIST protocol.

use super::kernels::{
    CoopTiles, ESTEP, ESTEP_COOP, ESTEP_UBO, MSTEP, MSTEP_UBO, PARAMS, Tiles, UBO_M_THREADS,
};

/// The register block of the two GEMM kernels, written out for `rm` rows along `a` and `rn`
/// columns along `b` (both multiples of 4): `rm * rn / 4` vec4 accumulators `acc_i_q`, the
/// per-stage loads `a_g = a_tile[ab + g * A_GAP]`, `b_q = b_tile[bb + q]` and the FMAs. Writing
/// them out keeps every accumulator in a register: a private array indexed in a loop is placed
/// in local memory by some compilers (the first H100 measurement ran at 1.3% of peak that way).
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
    /// Prefix of the registers' names (`reg0`, `reg1`, ...).
    pub reg: &'a str,
    /// The workgroup array the tile is stored into.
    pub tile: &'a str,
    /// The tile's size in vec4s.
    pub elements: u32,
    /// The WGSL expression that loads element `{E}` for the first stage.
    pub first: &'a str,
    /// The WGSL expression that loads element `{E}` for the next stage.
    pub next: &'a str,
    /// Element `{E}`'s place in the tile, added to the array's `{tile}_w` offset.
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
    let text = set_block(kernel, "acc_decl", &decl);
    let text = set_block(&text, "fma", &fma);
    let text = set_block(&text, "store", &store);
    let text = set_block(&text, "pf_init", &init);
    let text = set_block(&text, "pf_store", &stage);
    set_block(&text, "pf_next", &next)
}

/// The reduction steps of a GEMM kernel's stage: the file's loop over `kk < BK` (its opening
/// line marked `// <steps>`, its closing one `// </steps>`), or with `unroll` its body written
/// out `bk` times, each copy in its own block with `kk` a constant.
fn steps(kernel: &str, bk: u32, unroll: bool) -> String {
    if !unroll {
        return kernel.to_string();
    }
    let lines: Vec<&str> = kernel.split_inclusive('\n').collect();
    let open = lines
        .iter()
        .position(|l| l.contains("// <steps>"))
        .expect("a GEMM kernel marks its loop over kk with // <steps>");
    let close = lines[open..]
        .iter()
        .position(|l| l.contains("// </steps>"))
        .expect("a GEMM kernel closes its loop over kk with // </steps>")
        + open;
    let indent: String = lines[open]
        .chars()
        .take_while(|c| c.is_whitespace())
        .collect();
    let body: String = lines[open + 1..close].concat();
    let mut out: String = lines[..open].concat();
    for i in 0..bk {
        out.push_str(&format!("{indent}{{ let kk = {i}u;\n{body}{indent}}}\n"));
    }
    out.push_str(&lines[close + 1..].concat());
    out
}

/// `text` with every `const NAME: u32 = ...u;` set to `value` (each tile constant is declared
/// once, with the default tiles' value in the file).
pub fn set_const(text: &str, name: &str, value: u32) -> String {
    let head = format!("const {name}: u32 = ");
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.split_inclusive('\n') {
        match line
            .strip_prefix(head.as_str())
            .and_then(|rest| rest.split_once("u;"))
        {
            Some((digits, tail)) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                out.push_str(&format!("{head}{value}u;{tail}"));
                found = true;
            }
            _ => out.push_str(line),
        }
    }
    assert!(found, "the kernel declares no tile constant {name}");
    out
}

/// `text` with the lines between each `// <generated NAME>` and the next
/// `// </generated NAME>` replaced by `body` (the markers stay: the output reads as the file).
pub fn set_block(text: &str, name: &str, body: &str) -> String {
    let (open, close) = (
        format!("// <generated {name}>"),
        format!("// </generated {name}>"),
    );
    let mut out = String::with_capacity(text.len() + body.len());
    let mut inside = false;
    let mut found = false;
    for line in text.split_inclusive('\n') {
        if inside {
            if line.trim_start().starts_with(&close) {
                out.push_str(line);
                inside = false;
            }
            continue;
        }
        out.push_str(line);
        if line.trim_start().starts_with(&open) {
            out.push_str(body);
            inside = true;
            found = true;
        }
    }
    assert!(
        found && !inside,
        "the kernel has no complete generated block {name}"
    );
    out
}

/// The staged M-step's posteriors computed while loading ([`Tiles::m_fused`]): `exp(L - logp)`
/// from `L` (binding 1, `(n_images, K, P)`) and the batch's `logp` (binding 6), the same
/// expression as `posterior.wgsl`. Element e runs along positions first (kk = e % BK), so
/// neighbouring threads read neighbouring floats of `L`; `g_slot` puts it at (kk, kq) in the
/// tile. Zero beyond K and P.
pub const G_FUSED: &str = r#"
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
    let text = set_block(kernel, "acc_decl", &decl);
    let text = set_block(&text, "fma", &fma);
    set_block(&text, "store", &stores(rm, tn, row, store))
}

/// The full WGSL text of a kernel: the shared `Params` header, then [`kernel_text`].
pub fn source(kernel: &str, tiles: &Tiles) -> String {
    let text = kernel_text(kernel, tiles);
    // A kernel's `enable` directives (estep_coop.wgsl's f16 and cooperative matrices) must come
    // before every declaration, so before the shared part.
    let (enables, rest): (Vec<&str>, Vec<&str>) = text
        .lines()
        .partition(|line| line.trim_start().starts_with("enable "));
    if enables.is_empty() {
        return format!("{PARAMS}\n{text}");
    }
    format!("{}\n{PARAMS}\n{}\n", enables.join("\n"), rest.join("\n"))
}

/// The tensor-core E-step (`estep_coop.wgsl`) for an adapter whose subgroups have `subgroup`
/// invocations and the shape `tiles`, with the shared part.
pub fn coop_estep_source(subgroup: u32, tiles: &CoopTiles) -> String {
    source(&coop_text(subgroup, tiles), &Tiles::default())
}

/// The tensor-core E-step's own text: its constants and its three generated blocks (the
/// accumulators, a 16-step slice's loads and multiply-adds, the stores) for `tiles`. The file
/// holds the text for `CoopTiles::default()` and subgroups of 32 (tests/shaders.rs checks it).
pub fn coop_text(subgroup: u32, tiles: &CoopTiles) -> String {
    let mut text = ESTEP_COOP.to_string();
    for (name, v) in [
        ("SG", subgroup),
        ("WM", tiles.wm),
        ("WN", tiles.wn),
        ("MI", tiles.mi),
        ("NJ", tiles.nj),
        ("BK", tiles.bk),
    ] {
        text = set_const(&text, name, v);
    }
    let (mut acc, mut mma, mut store) = (String::new(), String::new(), String::new());
    let ij: Vec<(u32, u32)> = (0..tiles.mi)
        .flat_map(|i| (0..tiles.nj).map(move |j| (i, j)))
        .collect();
    for &(i, j) in &ij {
        acc.push_str(&format!(
            "    var main_{i}_{j} = coop_mat16x16<f32, C>();\n    var corr_{i}_{j} = coop_mat16x16<f32, C>();\n"
        ));
    }
    for i in 0..tiles.mi {
        for half in ["hi", "lo"] {
            mma.push_str(&format!(
                "            let a{}{i} = coopLoadT<coop_mat16x16<f16, A>>(&a_{half}[(sm * MI * 16u + {}u) * BK + t], BK);\n",
                &half[..1],
                16 * i
            ));
        }
    }
    for j in 0..tiles.nj {
        for half in ["hi", "lo"] {
            mma.push_str(&format!(
                "            let b{}{j} = coopLoadT<coop_mat16x16<f16, B>>(&b_{half}[t * TN + sn * NJ * 16u + {}u], TN);\n",
                &half[..1],
                16 * j
            ));
        }
    }
    for &(i, j) in &ij {
        mma.push_str(&format!(
            "            main_{i}_{j} = coopMultiplyAdd(ah{i}, bh{j}, main_{i}_{j});\n"
        ));
    }
    for (a, b) in [("h", "l"), ("l", "h")] {
        for &(i, j) in &ij {
            mma.push_str(&format!(
                "            corr_{i}_{j} = coopMultiplyAdd(a{a}{i}, b{b}{j}, corr_{i}_{j});\n"
            ));
        }
    }
    for (n, &(i, j)) in ij.iter().enumerate() {
        if n > 0 {
            store.push_str("    workgroupBarrier();\n");
        }
        store.push_str(&format!(
            "    coopStoreT(main_{i}_{j}, &out_main[at], 16u);\n    coopStoreT(corr_{i}_{j}, &out_corr[at], 16u);\n    workgroupBarrier();\n    store_result(s, lane, mq + {}u, kq + {}u, mtot);\n",
            16 * i,
            16 * j
        ));
    }
    let text = set_block(&text, "coop_acc", &acc);
    let text = set_block(&text, "coop_mma", &mma);
    set_block(&text, "coop_store", &store)
}

/// A kernel's own text for `tiles`: the file with its tile constants set ([`set_const`]) and,
/// for the four GEMM kernels, its generated blocks written for them ([`set_block`]). The files
/// hold the text for [`Tiles::default`], so for those tiles this is the file itself
/// (tests/shaders.rs checks it).
pub fn kernel_text(kernel: &str, tiles: &Tiles) -> String {
    match kernel {
        k if k == ESTEP_UBO => estep_ubo(k, tiles),
        k if k == MSTEP_UBO => mstep_ubo(k, tiles),
        k if k == ESTEP || k == MSTEP => staged(k, tiles, k == ESTEP),
        k => k.to_string(),
    }
}

/// The uniform-buffer E-step for `tiles.u_rm` positions per thread, `tiles.u_tn` kernels.
fn estep_ubo(kernel: &str, tiles: &Tiles) -> String {
    let text = set_const(kernel, "RM", tiles.u_rm);
    let text = set_const(&text, "TN", tiles.u_tn);
    ubo_blocks(
        &text,
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
    )
}

/// The uniform-buffer M-step for `tiles.u_rr` columns per thread, `tiles.u_tn` kernels.
fn mstep_ubo(kernel: &str, tiles: &Tiles) -> String {
    let text = set_const(kernel, "RR", tiles.u_rr);
    let text = set_const(&text, "MT", UBO_M_THREADS);
    let text = set_const(&text, "TK", tiles.u_tn);
    ubo_blocks(
        &text,
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
    )
}

/// The staged E-step (`e`) or M-step: the register block and the software pipeline written for
/// the tiles ([`staged_blocks`]), the steps written out where asked, the tile constants set.
fn staged(kernel: &str, tiles: &Tiles, e: bool) -> String {
    let text = staged_blocks(kernel, tiles, e);
    // The E-step's tile settings or the M-step's. `rm` is the register block along the A
    // tile: RM positions (E) or RR columns (M).
    let (rm, bk, wx, wy, strided, unroll, double, transposed) = if e {
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
    let mut text = steps(&text, bk, unroll);
    let consts = if e {
        [("RM", tiles.e_rm), ("RN", tiles.e_rn)]
    } else {
        [("RK", tiles.m_rk), ("RR", tiles.m_rr)]
    };
    for (name, value) in consts.into_iter().chain([
        ("BK", bk),
        ("WGX", wx),
        ("WGY", wy),
        ("A_STEP", a_step),
        ("A_GAP", a_gap),
        ("NBUF", if double { 2 } else { 1 }),
        ("P_STEP", if transposed { 1 } else { 4 }),
        ("P_GAP", if transposed { wx * rm / 4 } else { 1 }),
    ]) {
        text = set_const(&text, name, value);
    }
    text
}

/// The staged kernel's generated blocks for `tiles`: E-step (`e`) or M-step.
fn staged_blocks(kernel: &str, tiles: &Tiles, e: bool) -> String {
    if e {
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
    } else {
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
        // The file reads the posteriors from the G buffer; fused, they are computed here.
        let kernel = if tiles.m_fused {
            set_block(kernel, "g_source", G_FUSED)
        } else {
            kernel.to_string()
        };
        fill(&kernel, (d, f, s), (pi, ps, pn))
    }
}
