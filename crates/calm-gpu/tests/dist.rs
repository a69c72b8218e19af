//! Data-parallel EM ([`calm_gpu::dist`]) with ranks as threads: the model of any number of ranks
//! against the single-process trainer's, bit for bit on the CPU engine, within the GPU's
//! tolerance on the GPU; resume across rank counts; cancellation on one rank stops them all.

mod common;

use std::sync::Arc;

use calm_gpu::data::{self, Dataset, ImageSource};
use calm_gpu::dist::{Comm, ShardView, Sharding, ThreadComm};
use calm_gpu::em::InitMethod;
use calm_gpu::prior::PriorOptions;
use calm_gpu::{CalmParams, CancelToken, Checkpoint, Device, Model, Trainer};

/// 700 digits in batches of 150: 5 batches, which neither 2 nor 3 ranks divide, the last short.
fn digits() -> Arc<dyn ImageSource> {
    let d = data::embedded_digits(data::Split::Train);
    let imgs = d.images.slice(ndarray::s![..700, .., .., ..]).to_owned();
    Arc::new(Dataset::new(imgs, None))
}

fn spec_like() -> CalmParams {
    CalmParams::new(8)
        .width(5)
        .pad(1)
        .epochs(3)
        .batch(150)
        .device(Device::Cpu)
}

/// The recommended recipe's choices that read the whole data (patches, revival, whitening) and
/// a learned prior (the sum of squares).
fn recipe_like() -> CalmParams {
    spec_like()
        .init_method(InitMethod::Patches)
        .revive(true)
        .whiten(5)
        .learn_prior(PriorOptions {
            weights: true,
            variance: true,
        })
        .epochs(4)
}

fn plain(params: &CalmParams, data: Arc<dyn ImageSource>) -> Model {
    let mut t = Trainer::new(params, data).unwrap();
    let out = t.run(&mut ()).unwrap();
    t.model(out.stopped).unwrap()
}

/// Runs `body` on `ranks` threads, each with its communicator and shard; returns every rank's
/// result in rank order.
fn on_ranks<T: Send>(
    ranks: usize,
    params: &CalmParams,
    data: &Arc<dyn ImageSource>,
    body: impl Fn(Arc<dyn Comm>, Arc<dyn ImageSource>) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(ranks)
            .into_iter()
            .map(|c| {
                let body = &body;
                s.spawn(move || {
                    // (More ranks than batches: no sharding; the trainer says so.)
                    let shard: Arc<dyn ImageSource> =
                        match Sharding::new(data.len(), params.batch, c.rank(), ranks) {
                            Ok(sh) => Arc::new(ShardView::new(data.clone(), sh).unwrap()),
                            Err(_) => data.clone(),
                        };
                    body(Arc::new(c), shard)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn sharded(
    ranks: usize,
    params: &CalmParams,
    data: &Arc<dyn ImageSource>,
    resume: Option<Checkpoint>,
) -> Vec<Model> {
    on_ranks(ranks, params, data, |comm, shard| {
        let mut t = Trainer::sharded(params, shard, data.len(), comm, resume.clone()).unwrap();
        let out = t.run(&mut ()).unwrap();
        t.model(out.stopped).unwrap()
    })
}

fn assert_same(a: &Model, b: &Model, what: &str) {
    assert_eq!(a.theta, b.theta, "{what}: theta");
    assert_eq!(a.counts, b.counts, "{what}: counts");
    assert_eq!(a.prior, b.prior, "{what}: prior");
    assert_eq!(a.whiten, b.whiten, "{what}: whitening");
    assert_eq!(a.meta, b.meta, "{what}: metadata");
}

#[test]
fn any_number_of_ranks_gives_the_single_process_model_bit_for_bit() {
    let data = digits();
    for params in [spec_like(), recipe_like()] {
        let want = plain(&params, data.clone());
        for ranks in [1, 2, 3, 5] {
            for (rank, m) in sharded(ranks, &params, &data, None).iter().enumerate() {
                assert_same(m, &want, &format!("{ranks} ranks, rank {rank}"));
            }
        }
    }
}

#[test]
fn more_ranks_than_batches_is_an_error_on_every_rank() {
    let data = digits();
    let params = spec_like();
    for e in on_ranks(6, &params, &data, |comm, shard| {
        Trainer::sharded(&params, shard, data.len(), comm, None)
            .err()
            .expect("refused")
            .to_string()
    }) {
        assert!(
            e.contains("make 5 batches, fewer than the 6 processes"),
            "{e}"
        );
    }
}

#[test]
fn a_checkpoint_resumes_with_another_number_of_ranks() {
    let data = digits();
    let params = recipe_like();
    let want = plain(&params, data.clone());
    let dir = tempfile::tempdir().unwrap();
    // Two epochs on three ranks, checkpointed after each by rank 0 only.
    let first = params.clone().epochs(2);
    on_ranks(3, &first, &data, |comm, shard| {
        let mut t = Trainer::sharded(&first, shard, data.len(), comm, None)
            .unwrap()
            .checkpoint_every_epoch(dir.path().to_path_buf());
        t.run(&mut ()).unwrap();
    });
    for ranks in [1, 2] {
        let ck = Checkpoint::load(dir.path()).unwrap();
        assert_eq!(ck.records.len(), 2);
        for m in sharded(ranks, &params, &data, Some(ck)) {
            assert_same(&m, &want, &format!("resumed on {ranks} ranks"));
        }
    }
    // And the single-process trainer resumes it too.
    let mut t = Trainer::resume(&params, data, Checkpoint::load(dir.path()).unwrap()).unwrap();
    let out = t.run(&mut ()).unwrap();
    assert_same(
        &t.model(out.stopped).unwrap(),
        &want,
        "resumed on one process",
    );
}

#[test]
fn a_cancellation_on_one_rank_stops_every_rank_after_the_same_epochs() {
    let data = digits();
    let params = spec_like().epochs(5);
    let outcomes = on_ranks(3, &params, &data, |comm, shard| {
        let rank = comm.rank();
        let token = CancelToken::new();
        let mut t = Trainer::sharded(&params, shard, data.len(), comm, None)
            .unwrap()
            .with_cancel(token.clone());
        // Rank 1 is cancelled during epoch 2 (after its first batch of it).
        let mut batches = 0;
        let out = t
            .run(&mut |ev: &calm_gpu::em::Event| {
                if let calm_gpu::em::Event::Progress { .. } = ev {
                    batches += 1;
                    if rank == 1 && batches == 3 {
                        token.cancel();
                    }
                }
            })
            .unwrap();
        (out.interrupted, out.history.len(), t.model(None).unwrap())
    });
    let want = plain(&params.clone().epochs(1), data.clone());
    for (interrupted, epochs, m) in &outcomes {
        assert!(interrupted);
        assert_eq!(*epochs, 1);
        assert_eq!(m.theta, want.theta);
    }
}

#[test]
fn ranks_on_the_gpu_match_the_single_process_gpu_fit() {
    if common::gpu().is_none() {
        return;
    }
    let data = digits();
    let device: Device = common::backend_name().parse().unwrap();
    let params = spec_like().device(device);
    let want = plain(&params, data.clone());
    for ranks in [2, 3] {
        for m in sharded(ranks, &params, &data, None) {
            // tests/gpu_vs_cpu.rs's tolerance for the GPU's f32 sums against another order of
            // the same sums: 2e-4 of the largest weight.
            let scale = want.theta.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = m
                .theta
                .iter()
                .zip(&want.theta)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= 2e-4 * scale, "{ranks} ranks: {worst} of {scale}");
            for (a, b) in m.meta.history.iter().zip(&want.meta.history) {
                assert!(
                    (a.loglik - b.loglik).abs() <= 1e-5 * b.loglik.abs(),
                    "{ranks} ranks: LL {} vs {}",
                    a.loglik,
                    b.loglik
                );
            }
        }
    }
}

/// A rank's shard of an IDX file (plain and gzipped) and of a `.npy` file holds exactly its
/// batches' images, preprocessed as the whole file would be.
#[test]
fn a_shard_of_a_file_holds_its_batches_images() {
    let d = data::embedded_digits(data::Split::Train);
    let n = 1001;
    let px: Vec<u8> = d.images.as_slice().unwrap()[..n * 784]
        .iter()
        .map(|&v| (v * 255.0).round() as u8)
        .collect();
    let mut idx = vec![0, 0, 8, 3];
    for v in [n as u32, 28, 28] {
        idx.extend(v.to_be_bytes());
    }
    idx.extend(&px);
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("plain-idx3-ubyte", idx.clone()),
        ("gz-idx3-ubyte.gz", common::gz(&idx)),
        (
            "digits.npy",
            common::npy_bytes("|u1", false, &[n, 28, 28], &px),
        ),
    ];
    let pre = data::Preprocess::Scale;
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let whole = data::load_with(&path, Some(pre)).unwrap();
        for (rank, size) in [(0, 1), (1, 3), (2, 3)] {
            let sh = Sharding::new(n, 150, rank, size).unwrap();
            let keep = |i: usize| sh.locate(i).0 == rank;
            let (shard, total) = data::open_shard(&path, pre, 0, &keep).unwrap();
            assert_eq!((total, shard.len()), (n, sh.local_len()), "{name}");
            let mut img = vec![0f32; 784];
            for i in 0..shard.len() {
                shard.read_into(i, 1, &mut img).unwrap();
                let g = sh.global(i);
                let want = whole.images.slice(ndarray::s![g, 0, .., ..]);
                assert!(
                    img.iter().zip(want.iter()).all(|(a, b)| a == b),
                    "{name}: rank {rank} of {size}, local {i} (image {g})"
                );
            }
        }
    }
}

/// A deep network (a standardised link, whitening and patches in layer 1, a head) on 1, 2 and 3
/// ranks: every rank ends with the single process's network, byte for byte; a fit of 3 ranks
/// cancelled in layer 2 resumes on 2 ranks, and on one process, to the same bytes.
#[test]
fn a_deep_network_on_any_number_of_ranks_is_the_single_process_network() {
    use calm_gpu::net::{NetEvent, NetParams, NetTrainer};
    let data = digits();
    let base = spec_like()
        .init_method(InitMethod::Patches)
        .revive(true)
        .whiten(5)
        .epochs(2);
    let params = NetParams::new(
        "8x5p2 | tri max4s2p1 norm | 6x3p1 | tri avg2"
            .parse()
            .unwrap(),
        base.clone(),
    );
    let want = params.fit(data.clone()).unwrap().to_bytes().unwrap();
    for ranks in [1, 2, 3] {
        let nets = on_ranks(ranks, &base, &data, |comm, shard| {
            let mut t = NetTrainer::sharded(&params, shard, data.len(), comm, None).unwrap();
            assert!(!t.run(&mut |_| {}).unwrap().interrupted);
            t.into_network().to_bytes().unwrap()
        });
        for (q, bytes) in nets.iter().enumerate() {
            assert!(
                *bytes == want,
                "rank {q} of {ranks}: not the single process's network"
            );
        }
    }
    // Rank 2 of 3 cancelled in layer 2's first epoch; rank 0 keeps the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let outcomes = on_ranks(3, &base, &data, |comm, shard| {
        let rank = comm.rank();
        let token = CancelToken::new();
        let mut t = NetTrainer::sharded(&params, shard, data.len(), comm, None)
            .unwrap()
            .with_cancel(token.clone())
            .checkpoint_every_epoch(dir.path().to_path_buf());
        let mut layer = 0;
        let out = t
            .run(&mut |ev| match ev {
                NetEvent::LayerStart { layer: l, .. } => layer = *l,
                NetEvent::Fit(calm_gpu::em::Event::Progress { .. }) if layer == 2 && rank == 2 => {
                    token.cancel()
                }
                _ => {}
            })
            .unwrap();
        if out.interrupted {
            t.save_checkpoint(dir.path()).unwrap();
        }
        (out.interrupted, t.layers_done())
    });
    assert!(outcomes.iter().all(|&(i, l)| i && l == 1), "{outcomes:?}");
    let nets = on_ranks(2, &base, &data, |comm, shard| {
        let mut t =
            NetTrainer::sharded(&params, shard, data.len(), comm, Some(dir.path())).unwrap();
        assert_eq!(t.layers_done(), 1);
        t.run(&mut |_| {}).unwrap();
        t.into_network().to_bytes().unwrap()
    });
    assert!(nets.iter().all(|b| *b == want), "resumed on 2 ranks");
    let mut t = NetTrainer::resume(&params, data, dir.path()).unwrap();
    t.run(&mut |_| {}).unwrap();
    assert!(
        t.into_network().to_bytes().unwrap() == want,
        "resumed on one process"
    );
}
