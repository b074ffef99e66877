//! `rfstudio bench dataset`: a synthetic dataset of N sample rows (no image files), then timings
//! of opening it, fetching the next sample in every queue order, and writing a label.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::session::{QueueOrder, Session};
use super::store::{Decision, Store, StoreError, SyntheticSample, uncertainty};

#[derive(Clone, Debug, Serialize)]
pub struct DatasetBench {
    pub samples: i64,
    pub labels: i64,
    pub build_s: f64,
    pub open_ms: f64,
    /// Mean milliseconds to move to the next sample, per queue order.
    pub next_ms: std::collections::BTreeMap<String, f64>,
    /// The slowest of the per-order means.
    pub next_ms_max: f64,
    pub label_write_ms: f64,
}

/// Fill `dir` with `n` synthetic samples; ~10% get 1-3 labels (some disagreeing).
pub fn build(dir: &Path, n: i64, progress: &mut dyn FnMut(i64, i64)) -> Result<(i64, f64), StoreError> {
    let start = Instant::now();
    let store = Store::init(dir)?;
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let samples = (1..=n).map(|i| {
        let raw: [f64; 5] = [rnd() + 0.05, rnd(), rnd(), rnd(), rnd()];
        let sum: f64 = raw.iter().sum();
        let p = raw.map(|x| (x / sum) as f32);
        let (entropy, margin) = uncertainty(&p);
        SyntheticSample {
            product_id: format!("p{}", i / 8),
            image_path: format!("blobs/00/{i:016x}.png"),
            image_hash: format!("{i:064x}"),
            title: "合成样本".to_string(),
            prompt: "synthetic".to_string(),
            probs: p,
            entropy,
            margin,
        }
    });
    store.bulk_insert_samples(samples, &mut |done| progress(done, n))?;
    let labels = (1..=n).filter(|id| id % 10 == 0).flat_map(|id| {
        let k = 1 + (id / 10) % 3;
        (0..k).map(move |a| {
            let class = if a == 2 && id % 7 == 0 { (id % 5 + 1) % 5 } else { id % 5 };
            (id, format!("annotator{a}"), class)
        })
    });
    let labels = store.bulk_insert_labels(labels)?;
    store.optimize()?;
    Ok((labels, start.elapsed().as_secs_f64()))
}

/// Time the operations the annotation workstation depends on.
pub fn measure(dir: &Path, samples: i64, labels: i64, build_s: f64, iters: usize) -> Result<DatasetBench, StoreError> {
    let t = Instant::now();
    let store = Store::open(dir)?;
    store.sample_count()?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut next_ms = std::collections::BTreeMap::new();
    for order in QueueOrder::ALL {
        let mut session = Session::new(&store, "bench", order)?;
        let t = Instant::now();
        for _ in 0..iters {
            session.skip()?;
            session.current()?;
        }
        let name = format!("{order:?}").to_lowercase();
        next_ms.insert(name, t.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    let mut session = Session::new(&store, "bench-writer", QueueOrder::Unlabelled)?;
    let t = Instant::now();
    for i in 0..iters {
        session.label(Decision::Class((i % 5) as u8))?;
    }
    let label_write_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let next_ms_max = next_ms.values().copied().fold(0.0, f64::max);
    Ok(DatasetBench {
        samples,
        labels,
        build_s,
        open_ms,
        next_ms,
        next_ms_max,
        label_write_ms,
    })
}
