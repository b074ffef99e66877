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

/// Latencies with several annotators at once, each with its own connection and session.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrentBench {
    pub annotators: usize,
    /// Per annotator: label the sample on screen, then move to the next one, `iters` times.
    pub iters: usize,
    pub next_p50_ms: f64,
    pub next_p99_ms: f64,
    pub label_write_p50_ms: f64,
    pub label_write_p99_ms: f64,
}

/// `annotators` threads, each opening the dataset at `location` and labelling from the
/// unlabelled queue (so they contend for the same samples, the worst case for row locks): the
/// label write and the move to the next sample are timed separately; percentiles over all.
pub fn measure_concurrent(location: &Path, annotators: usize, iters: usize) -> Result<ConcurrentBench, StoreError> {
    let barrier = std::sync::Barrier::new(annotators);
    let per_thread: Vec<Result<(Vec<f64>, Vec<f64>), StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..annotators)
            .map(|a| {
                let barrier = &barrier;
                s.spawn(move || {
                    let store = Store::open(location)?;
                    let name = format!("bench-team{a}");
                    let mut session = Session::new(&store, &name, QueueOrder::Unlabelled)?;
                    let (mut next, mut write) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
                    barrier.wait();
                    for i in 0..iters {
                        let Some(id) = session.current_id() else { break };
                        let t = Instant::now();
                        store.put_label(id, &name, Decision::Class(((i + a) % 5) as u8), 0, false)?;
                        write.push(t.elapsed().as_secs_f64() * 1e3);
                        let t = Instant::now();
                        session.skip()?;
                        session.current()?;
                        next.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok((next, write))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    let (mut next, mut write) = (Vec::new(), Vec::new());
    for r in per_thread {
        let (n, w) = r?;
        next.extend(n);
        write.extend(w);
    }
    Ok(ConcurrentBench {
        annotators,
        iters,
        next_p50_ms: percentile(&mut next, 0.50),
        next_p99_ms: percentile(&mut next, 0.99),
        label_write_p50_ms: percentile(&mut write, 0.50),
        label_write_p99_ms: percentile(&mut write, 0.99),
    })
}

/// The `q` quantile (nearest rank) of the values; 0 for none.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(super::percentile(&mut v, 0.99), 99.0);
        assert_eq!(super::percentile(&mut v, 0.5), 50.0);
        assert_eq!(super::percentile(&mut [3.0], 0.99), 3.0);
    }
}
