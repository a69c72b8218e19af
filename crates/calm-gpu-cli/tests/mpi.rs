//! `mpirun -n R calm-gpu train` (the `mpi` feature) against the plain binary: the same model bytes
//! on the CPU engine for R = 1, 2, 3 on data no R divides, the GPU's within its tolerance, a job
//! killed mid-run resumed with another R, SIGTERM to the ranks and to mpirun (a checkpoint,
//! resumed with another R), a rank given a damaged file, and commands other than `train`. Run by `.ci/run`: `cargo test --release --features mpi --test mpi` (needs Open MPI's
//! `mpirun`).
#![cfg(feature = "mpi")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use calm_gpu::model::Model;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_calm-gpu")
}

/// `mpirun` as root in a container, oversubscribed on two cores, waiting ranks yielding, one
/// thread per rank (the plain runs below use one too, so the engines' descriptions match).
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-n", &n.to_string()]);
    envs(&mut c);
    c
}

fn envs(c: &mut Command) {
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_mpi_yield_when_idle", "1")
        .env("RAYON_NUM_THREADS", "1");
}

fn plain() -> Command {
    let mut c = Command::new(bin());
    envs(&mut c);
    c
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// 1,001 of the shipped digits as a gzipped IDX file: in batches of 150, 7 batches (the last of
/// 101), which neither 2 nor 3 ranks divide.
fn digits_idx(dir: &Path) -> PathBuf {
    let d = calm_gpu::data::embedded_digits(calm_gpu::data::Split::Train);
    let n = 1001;
    let mut bytes = vec![0, 0, 8, 3];
    for v in [n as u32, 28, 28] {
        bytes.extend(v.to_be_bytes());
    }
    bytes.extend(
        d.images.as_slice().unwrap()[..n * 784]
            .iter()
            .map(|&v| (v * 255.0).round() as u8),
    );
    let path = dir.join("digits-1001-idx3-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&bytes).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    path
}

fn train_args(data: &Path, out: &Path, extra: &str) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--data"].iter().map(|s| s.to_string()).collect();
    a.push(data.display().to_string());
    a.extend(["--out".to_string(), out.display().to_string(), "-q".into()]);
    a.extend(extra.split_whitespace().map(String::from));
    a
}

/// The same 1,001 digits as an uncompressed uint8 `.npy` (read by offset on each rank).
fn digits_npy(dir: &Path) -> PathBuf {
    let d = calm_gpu::data::embedded_digits(calm_gpu::data::Split::Train);
    let dict = "{'descr': '|u1', 'fortran_order': False, 'shape': (1001, 28, 28), }";
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(
        d.images.as_slice().unwrap()[..1001 * 784]
            .iter()
            .map(|&v| (v * 255.0).round() as u8),
    );
    let path = dir.join("digits-1001.npy");
    std::fs::write(&path, bytes).unwrap();
    path
}

const SPEC: &str = "--backend cpu --kernels 8 --width 5 --pad 1 --epochs 3 --batch 150 --seed 1";
const RECIPE: &str = "--backend cpu --preset recommended --patch-norm off --kernels 12 --epochs 3 --batch 150 --learn-weights --learn-variance --seed 2";

#[test]
fn one_two_and_three_ranks_write_the_plain_binarys_model_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, npy) = (digits_idx(dir.path()), digits_npy(dir.path()));
    for (name, flags, data) in [
        ("spec", SPEC, &idx),
        ("recipe", RECIPE, &idx),
        ("npy", SPEC, &npy),
    ] {
        let want = dir.path().join(format!("{name}-plain.safetensors"));
        run({
            let mut c = plain();
            c.args(train_args(data, &want, flags));
            c
        });
        for n in [1, 2, 3] {
            let got = dir.path().join(format!("{name}-{n}.safetensors"));
            let out = run({
                let mut c = mpirun(n);
                c.arg(bin()).args(train_args(data, &got, flags));
                c
            });
            // Only rank 0 prints.
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(stdout.matches("wrote ").count(), 1, "{stdout}");
            assert!(
                std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(),
                "{name}: {n} ranks wrote another model than the plain binary"
            );
        }
    }
}

/// A deep network (`train --net`, its link standardised, a head) from 1, 2 and 3 ranks: the
/// plain binary's network file, byte for byte.
#[test]
fn a_deep_network_from_any_number_of_ranks_is_the_plain_binarys() {
    let dir = tempfile::tempdir().unwrap();
    let idx = digits_idx(dir.path());
    let args = |out: &Path| {
        let mut a = train_args(
            &idx,
            out,
            "--backend cpu --preset recommended --epochs 2 --batch 150 --seed 4",
        );
        a.extend([
            "--net".into(),
            "8x5p2 | tri max4s2p1 norm | 6x3p1 | tri avg2".into(),
        ]);
        a
    };
    let want = dir.path().join("net-plain.safetensors");
    run({
        let mut c = plain();
        c.args(args(&want));
        c
    });
    for n in [1, 2, 3] {
        let got = dir.path().join(format!("net-{n}.safetensors"));
        let out = run({
            let mut c = mpirun(n);
            c.arg(bin()).args(args(&got));
            c
        });
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.matches("wrote ").count(), 1, "{stdout}");
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(),
            "{n} ranks wrote another network than the plain binary"
        );
    }
}

#[test]
fn ranks_on_lavapipe_match_the_plain_gpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits_idx(dir.path());
    let flags = "--backend vulkan --kernels 8 --width 5 --pad 1 --epochs 2 --batch 150 --seed 1";
    let want = dir.path().join("plain.safetensors");
    run({
        let mut c = plain();
        c.args(train_args(&data, &want, flags));
        c
    });
    let want = Model::load(&want).unwrap();
    let scale = want.theta.iter().fold(0f32, |a, v| a.max(v.abs()));
    for n in [1, 2, 3] {
        let got = dir.path().join(format!("gpu-{n}.safetensors"));
        run({
            let mut c = mpirun(n);
            c.arg(bin()).args(train_args(&data, &got, flags));
            c
        });
        let got = Model::load(&got).unwrap();
        let worst = got
            .theta
            .iter()
            .zip(&want.theta)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // tests/gpu_vs_cpu.rs's tolerance: the GPU's f32 sums in another order.
        assert!(worst <= 2e-4 * scale, "{n} ranks: {worst} of {scale}");
    }
}

/// SIGKILL to every process of session `sid` (read from /proc), mpirun and its ranks together,
/// then waits until none is left (a rank that is still dying holds its output lock).
fn kill_session(sid: u32) {
    let t0 = Instant::now();
    while signal_session(sid) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job's processes outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every live process (zombies, already dead and holding nothing, left out) as
/// `(pid, parent, session)`, read from /proc.
fn processes() -> Vec<(i32, u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: state, ppid, pgrp, session.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(&state), Some(Ok(ppid)), Some(Ok(sid))) = (
            f.first(),
            f.get(1).map(|v| v.parse()),
            f.get(3).map(|v| v.parse()),
        ) && state != "Z"
        {
            out.push((pid, ppid, sid));
        }
    }
    out
}

/// SIGKILL to every live process of session `sid`; how many there were.
fn signal_session(sid: u32) -> usize {
    let job: Vec<i32> = processes()
        .into_iter()
        .filter(|p| p.2 == sid)
        .map(|p| p.0)
        .collect();
    for &pid in &job {
        // SAFETY: kill(2) on a process of the job this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    job.len()
}

/// The epochs a checkpoint holds, once it can be read.
fn checkpoint_epochs(dir: &Path) -> usize {
    calm_gpu::Checkpoint::load(dir).map_or(0, |c| c.records.len())
}

#[test]
fn a_job_killed_mid_run_resumes_with_another_number_of_ranks() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let data = digits_idx(dir.path());
    let flags = "--backend cpu --kernels 16 --width 7 --pad 0 --epochs 8 --batch 150 --seed 4 --init-method patches --revive";
    let want = dir.path().join("plain.safetensors");
    run({
        let mut c = plain();
        c.args(train_args(&data, &want, flags));
        c
    });
    for (first, then) in [(3, 2), (2, 1)] {
        let ck = dir.path().join(format!("ck-{first}-{then}"));
        let out = dir.path().join(format!("model-{first}-{then}.safetensors"));
        let mut args = train_args(&data, &out, flags);
        args.extend(["--checkpoint-dir".into(), ck.display().to_string()]);
        // The whole job in its own session (Open MPI gives each rank its own process group),
        // every process of it killed with SIGKILL once two epochs are kept.
        let mut job = mpirun(first);
        job.arg(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches nothing of the parent's.
        unsafe {
            job.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = job.spawn().unwrap();
        let t0 = Instant::now();
        while checkpoint_epochs(&ck) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
            assert!(child.try_wait().unwrap().is_none(), "the job ended early");
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_session(child.id());
        child.wait().unwrap();
        let kept = checkpoint_epochs(&ck);
        assert!((2..8).contains(&kept), "killed after {kept} epochs");
        assert!(!out.exists());
        let resume = ["train", "--resume", &ck.display().to_string(), "-q"];
        run(if then == 1 {
            let mut c = plain();
            c.args(resume);
            c
        } else {
            let mut c = mpirun(then);
            c.arg(bin()).args(resume);
            c
        });
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap(),
            "killed on {first} ranks after {kept} epochs, resumed on {then}: another model"
        );
    }
}

/// The live processes whose parent is `ppid` (the ranks mpirun started).
fn children(ppid: u32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| p.1 == ppid)
        .map(|p| p.0)
        .collect()
}

/// SIGTERM, the signal of a job's time limit and of `scancel`, two ways. Sent to every rank (as
/// Slurm delivers it to a job's tasks): the ranks stop together after the current batch, rank 0
/// keeps the checkpoint and says how to resume. Sent to mpirun alone: Open MPI passes it to the
/// ranks one at a time and SIGKILLs each 1 s later (`odls_base_sigkill_timeout`,
/// docs/scaling.md), so the stop is graceful only if it is quick; either way the job ends
/// non-zero without a model, its last checkpoint intact. Each stopped job, resumed on 3 ranks,
/// writes the uninterrupted model's bytes.
#[test]
fn sigterm_stops_the_job_and_it_resumes_on_other_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits_idx(dir.path());
    // Enough epochs (about 13 ms each on 2 ranks here) that the signal lands mid-run, not after
    // the last one (then the job, done, writes its model).
    let flags = "--backend cpu --kernels 16 --width 7 --pad 0 --epochs 150 --batch 150 --seed 5 --init-method patches";
    let want = dir.path().join("plain.safetensors");
    run({
        let mut c = plain();
        c.args(train_args(&data, &want, flags));
        c
    });
    for to_ranks in [true, false] {
        let tag = if to_ranks { "ranks" } else { "mpirun" };
        let ck = dir.path().join(format!("ck-{tag}"));
        let out = dir.path().join(format!("model-{tag}.safetensors"));
        let mut args = train_args(&data, &out, flags);
        args.extend(["--checkpoint-dir".into(), ck.display().to_string()]);
        let err_path = dir.path().join(format!("stderr-{tag}.txt"));
        let mut job = mpirun(2);
        job.arg(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap());
        let mut child = job.spawn().unwrap();
        let t0 = Instant::now();
        while checkpoint_epochs(&ck) < 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{tag}: no checkpoint"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "{tag}: the job ended early"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let targets = match to_ranks {
            true => children(child.id()),
            false => vec![child.id() as i32],
        };
        assert!(!targets.is_empty(), "{tag}: no rank found");
        for pid in targets {
            // SAFETY: kill(2) on a process of the job this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "{tag}: the job did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = std::fs::read_to_string(&err_path).unwrap();
        assert!(
            !status.success(),
            "{tag}: the job ended well after SIGTERM: {err}"
        );
        if to_ranks {
            assert!(
                err.contains("interrupted during epoch") && err.contains("train --resume"),
                "{tag}: {err}"
            );
        }
        let kept = checkpoint_epochs(&ck);
        assert!(
            (1..150).contains(&kept),
            "{tag}: stopped after {kept} epochs"
        );
        assert!(
            !out.exists(),
            "{tag}: a model was written by an interrupted job"
        );
        let mut c = mpirun(3);
        c.arg(bin())
            .args(["train", "--resume", &ck.display().to_string(), "-q"]);
        run(c);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap(),
            "SIGTERM to {tag} on 2 ranks after {kept} epochs, resumed on 3: another model"
        );
    }
}

#[test]
fn a_rank_given_a_damaged_file_ends_the_job_naming_it_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = digits_idx(dir.path());
    let bytes = std::fs::read(&data).unwrap();
    let damaged = dir.path().join("damaged-idx3-ubyte.gz");
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let ck = dir.path().join("ck");
    let out = dir.path().join("model.safetensors");
    let flags = format!("{SPEC} --checkpoint-dir {}", ck.display());
    // A first job leaves a checkpoint of its 3 epochs.
    run({
        let mut c = mpirun(2);
        c.arg(bin()).args(train_args(&data, &out, &flags));
        c
    });
    let before = std::fs::read(ck.join("checkpoint.safetensors")).unwrap();
    // Rank 1 of a new job reads the damaged copy (Open MPI's `prog : prog` form).
    let mut args = train_args(&data, &out, &format!("{flags} --force"));
    let mut c = mpirun(1);
    c.arg(bin()).args(&args).arg(":").args(["-n", "1", bin()]);
    args[2] = damaged.display().to_string();
    c.args(&args);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let line = err
        .lines()
        .find(|l| l.starts_with("error: rank 1 of 2: "))
        .unwrap_or_else(|| panic!("no error line naming rank 1: {err}"));
    assert!(line.contains("damaged-idx3-ubyte.gz"), "{line}");
    assert_eq!(
        std::fs::read(ck.join("checkpoint.safetensors")).unwrap(),
        before,
        "the checkpoint changed"
    );
}

#[test]
fn other_commands_refuse_to_run_on_several_ranks() {
    let mut c = mpirun(2);
    c.args([bin(), "info", "--help"]);
    let o = c.output().unwrap();
    // --help is answered before any rank joins the job.
    assert!(o.status.success());
    let mut c = mpirun(2);
    c.args([bin(), "devices"]);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("only `train` runs over MPI; run the other commands as one process"),
        "{err}"
    );
    // One rank is one process: every command works.
    let mut c = mpirun(1);
    c.args([bin(), "devices"]);
    run(c);
}
