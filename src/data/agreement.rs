//! Labels -> final labels and statistics: majority vote (a review decision overrides; ties go to
//! review), per-class counts, per-annotator throughput, Cohen's kappa for annotator pairs,
//! Fleiss' kappa overall, and the list of disagreements.
//!
//! Categories for agreement are the five classes plus Unsuitable (6 categories).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::store::{Decision, Label};
use crate::pipeline::score::CLASS_NAMES;

/// Category index 0-4 for classes, 5 for Unsuitable.
fn cat(d: Decision) -> usize {
    d.class().map(usize::from).unwrap_or(5)
}

/// The categories agreement counts in: the five classes and Unsuitable.
pub const CATEGORIES: usize = 6;

/// The final label of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "decision")]
pub enum Final {
    Unlabelled,
    /// Decided (by majority, unanimity, or a review decision).
    Decided(Decision),
    /// Tied votes and no review decision yet.
    NeedsReview,
}

/// Majority vote over non-review labels; the latest review decision overrides.
pub fn final_label(labels: &[&Label]) -> Final {
    if let Some(r) = labels.iter().filter(|l| l.review).max_by_key(|l| l.id) {
        return Final::Decided(r.decision);
    }
    let mut votes = [0usize; CATEGORIES];
    let mut decisions: [Option<Decision>; CATEGORIES] = [None; CATEGORIES];
    for l in labels.iter().filter(|l| !l.review) {
        votes[cat(l.decision)] += 1;
        decisions[cat(l.decision)] = Some(l.decision);
    }
    let max = votes.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return Final::Unlabelled;
    }
    let winners: Vec<usize> = (0..CATEGORIES).filter(|&c| votes[c] == max).collect();
    if winners.len() > 1 {
        return Final::NeedsReview;
    }
    decisions[winners[0]].map(Final::Decided).unwrap_or(Final::Unlabelled)
}

/// Cohen's kappa of two raters over the items both rated: (po - pe) / (1 - pe).
/// Returns None with fewer than one shared item; 1.0 when pe == 1 and they agree fully.
pub fn cohen_kappa(pairs: &[(usize, usize)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let mut a = [0f64; CATEGORIES];
    let mut b = [0f64; CATEGORIES];
    let mut agree = 0f64;
    for &(x, y) in pairs {
        a[x] += 1.0;
        b[y] += 1.0;
        if x == y {
            agree += 1.0;
        }
    }
    let po = agree / n;
    let pe: f64 = (0..CATEGORIES).map(|k| (a[k] / n) * (b[k] / n)).sum();
    if (1.0 - pe).abs() < 1e-12 {
        return Some(if (po - 1.0).abs() < 1e-12 { 1.0 } else { 0.0 });
    }
    Some((po - pe) / (1.0 - pe))
}

/// Fleiss' kappa over items with at least two ratings (the standard formula, with per-item
/// rater counts allowed to differ): P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)),
/// P_bar = mean P_i, p_j = share of all ratings in category j, P_e = sum p_j^2.
pub fn fleiss_kappa(items: &[Vec<usize>]) -> Option<f64> {
    let items: Vec<&Vec<usize>> = items.iter().filter(|i| i.len() >= 2).collect();
    if items.is_empty() {
        return None;
    }
    let mut totals = [0f64; CATEGORIES];
    let mut all = 0f64;
    let mut p_sum = 0f64;
    for item in &items {
        let mut counts = [0f64; CATEGORIES];
        for &c in item.iter() {
            counts[c] += 1.0;
            totals[c] += 1.0;
        }
        let n = item.len() as f64;
        all += n;
        p_sum += (counts.iter().map(|c| c * c).sum::<f64>() - n) / (n * (n - 1.0));
    }
    let p_bar = p_sum / items.len() as f64;
    let pe: f64 = totals.iter().map(|t| (t / all).powi(2)).sum();
    if (1.0 - pe).abs() < 1e-12 {
        return Some(if (p_bar - 1.0).abs() < 1e-12 { 1.0 } else { 0.0 });
    }
    Some((p_bar - pe) / (1.0 - pe))
}

#[derive(Clone, Debug, Serialize)]
pub struct AnnotatorStats {
    pub annotator: String,
    pub labels: usize,
    /// Labels per hour of active labelling time (sum of lead times).
    pub labels_per_hour: f64,
    pub mean_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PairKappa {
    pub a: String,
    pub b: String,
    pub shared: usize,
    pub kappa: Option<f64>,
    /// Where the two disagree: `confusion[i][j]` counts the shared samples `a` put in category `i`
    /// and `b` in category `j` (categories 0-4 are the classes, 5 is Unsuitable).
    pub confusion: [[usize; CATEGORIES]; CATEGORIES],
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub samples: usize,
    pub labelled: usize,
    pub unlabelled: usize,
    pub needs_review: usize,
    /// Final-label counts per class name, plus "Unsuitable".
    pub classes: BTreeMap<String, usize>,
    pub annotators: Vec<AnnotatorStats>,
    pub cohen: Vec<PairKappa>,
    pub fleiss: Option<f64>,
    /// Sample ids whose (non-review) labels disagree.
    pub disagreements: Vec<i64>,
    /// Each annotator's accuracy on the gold samples they labelled (filled by the caller from
    /// `Store::gold`; empty without gold samples).
    pub gold: Vec<GoldAccuracy>,
}

/// One annotator's labels on gold samples against the known answers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GoldAccuracy {
    pub annotator: String,
    pub gold_labels: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// Accuracy on gold per annotator (ordinary labels only; review decisions are not tested).
pub fn gold_accuracy(labels: &[Label], gold: &[(i64, Decision)]) -> Vec<GoldAccuracy> {
    let answers: BTreeMap<i64, Decision> = gold.iter().copied().collect();
    let mut by: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for l in labels.iter().filter(|l| !l.review) {
        if let Some(answer) = answers.get(&l.sample_id) {
            let e = by.entry(l.annotator.as_str()).or_default();
            e.0 += 1;
            e.1 += (l.decision == *answer) as usize;
        }
    }
    by.into_iter()
        .map(|(a, (n, ok))| GoldAccuracy {
            annotator: a.to_string(),
            gold_labels: n,
            correct: ok,
            accuracy: ok as f64 / n as f64,
        })
        .collect()
}

/// Compute statistics from all labels of a dataset of `sample_count` samples.
pub fn stats(sample_count: usize, labels: &[Label]) -> Stats {
    let mut by_sample: BTreeMap<i64, Vec<&Label>> = BTreeMap::new();
    for l in labels {
        by_sample.entry(l.sample_id).or_default().push(l);
    }
    let mut classes: BTreeMap<String, usize> = CLASS_NAMES.iter().map(|c| (c.to_string(), 0)).collect();
    classes.insert("Unsuitable".into(), 0);
    let mut needs_review = 0;
    let mut labelled = 0;
    let mut disagreements = Vec::new();
    let mut fleiss_items = Vec::new();
    for (&sid, ls) in &by_sample {
        match final_label(ls) {
            Final::Decided(d) => {
                labelled += 1;
                *classes.entry(d.name().to_string()).or_default() += 1;
            }
            Final::NeedsReview => needs_review += 1,
            Final::Unlabelled => {}
        }
        let cats: Vec<usize> = ls.iter().filter(|l| !l.review).map(|l| cat(l.decision)).collect();
        if cats.iter().collect::<BTreeSet<_>>().len() > 1 {
            disagreements.push(sid);
        }
        fleiss_items.push(cats);
    }
    // Per annotator.
    let mut per: BTreeMap<&str, (usize, i64)> = BTreeMap::new();
    for l in labels.iter().filter(|l| !l.review) {
        let e = per.entry(&l.annotator).or_default();
        e.0 += 1;
        e.1 += l.lead_ms;
    }
    let annotators = per
        .iter()
        .map(|(a, (n, ms))| AnnotatorStats {
            annotator: a.to_string(),
            labels: *n,
            labels_per_hour: if *ms > 0 { *n as f64 / (*ms as f64 / 3.6e6) } else { 0.0 },
            mean_seconds: *ms as f64 / 1000.0 / (*n).max(1) as f64,
        })
        .collect();
    // Cohen's kappa for every pair of annotators on shared samples.
    let names: Vec<&str> = per.keys().copied().collect();
    let mut cohen = Vec::new();
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            let pairs: Vec<(usize, usize)> = by_sample
                .values()
                .filter_map(|ls| {
                    let a = ls.iter().find(|l| !l.review && l.annotator == names[i])?;
                    let b = ls.iter().find(|l| !l.review && l.annotator == names[j])?;
                    Some((cat(a.decision), cat(b.decision)))
                })
                .collect();
            let mut confusion = [[0; CATEGORIES]; CATEGORIES];
            for &(x, y) in &pairs {
                confusion[x][y] += 1;
            }
            cohen.push(PairKappa {
                a: names[i].to_string(),
                b: names[j].to_string(),
                shared: pairs.len(),
                kappa: cohen_kappa(&pairs),
                confusion,
            });
        }
    }
    Stats {
        samples: sample_count,
        labelled,
        unlabelled: sample_count.saturating_sub(by_sample.len()),
        needs_review,
        classes,
        annotators,
        cohen,
        fleiss: fleiss_kappa(&fleiss_items),
        disagreements,
        gold: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohen_kappa_hand_computed() {
        // 10 items, two raters, categories 0/1:
        //        B=0 B=1
        // A=0     4   1
        // A=1     2   3
        // po = 0.7; pA0 = 0.5, pB0 = 0.6 -> pe = 0.5*0.6 + 0.5*0.4 = 0.5 -> kappa = 0.4
        let mut pairs = vec![(0, 0); 4];
        pairs.push((0, 1));
        pairs.extend([(1, 0); 2]);
        pairs.extend([(1, 1); 3]);
        let k = cohen_kappa(&pairs).expect("kappa");
        assert!((k - 0.4).abs() < 1e-12, "{k}");
        assert_eq!(cohen_kappa(&[(2, 2), (2, 2)]), Some(1.0));
        assert_eq!(cohen_kappa(&[]), None);
    }

    #[test]
    fn fleiss_kappa_hand_computed() {
        // 4 items, 3 raters, categories 0/1:
        // item1: 0,0,0  P=1 ; item2: 0,0,1 P=1/3 ; item3: 1,1,1 P=1 ; item4: 0,1,1 P=1/3
        // P_bar = (1 + 1/3 + 1 + 1/3)/4 = 2/3 ; p0 = 6/12, p1 = 6/12 -> Pe = 0.5
        // kappa = (2/3 - 1/2) / (1/2) = 1/3
        let items = vec![vec![0, 0, 0], vec![0, 0, 1], vec![1, 1, 1], vec![0, 1, 1]];
        let k = fleiss_kappa(&items).expect("kappa");
        assert!((k - 1.0 / 3.0).abs() < 1e-12, "{k}");
    }

    fn label(id: i64, sample: i64, who: &str, d: Decision, review: bool) -> Label {
        Label {
            id,
            sample_id: sample,
            annotator: who.into(),
            decision: d,
            created_at: String::new(),
            lead_ms: 1000,
            review,
        }
    }

    #[test]
    fn majority_ties_and_review() {
        let a = label(1, 1, "a", Decision::Class(0), false);
        let b = label(2, 1, "b", Decision::Class(3), false);
        assert_eq!(final_label(&[&a, &b]), Final::NeedsReview);
        let c = label(3, 1, "c", Decision::Class(3), false);
        assert_eq!(final_label(&[&a, &b, &c]), Final::Decided(Decision::Class(3)));
        let r = label(4, 1, "lead", Decision::Class(0), true);
        assert_eq!(final_label(&[&a, &b, &c, &r]), Final::Decided(Decision::Class(0)));
        assert_eq!(final_label(&[]), Final::Unlabelled);
    }
}
