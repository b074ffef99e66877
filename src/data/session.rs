//! The headless labelling engine used by the GUI's Annotate tab and by tests: one annotator
//! working through a queue. Queue orders: unlabelled first, random, by RFNet uncertainty
//! (entropy or margin: active learning), grouped by RFNet's predicted class, disagreements only
//! (review). Actions: label (1-5), Unsuitable, skip, multi-level undo/redo, back/forward;
//! auto-advance; lead time recorded from the moment a sample is shown; `upcoming(n)` lets the GUI
//! prefetch the next images. The grid view works on pages: consecutive runs of the same queue
//! (`page`, `label_in_page`, `skip_in_page`, `turn_page`), labelled with the same functions.

use std::collections::HashSet;
use std::time::Instant;

use serde::Serialize;

use super::store::{Decision, Label, Sample, Store, StoreError};

// The queue orders are the store's (it owns their SQL); sessions and their callers name them here.
pub use super::store::QueueOrder;

/// One undoable action.
#[derive(Clone, Debug)]
struct Done {
    label: Label,
    replaced: Option<Label>,
    /// This session's decision on the sample before this label (a relabel), restored by undo.
    before: Option<Decision>,
}

pub struct Session<'a> {
    store: &'a Store,
    pub annotator: String,
    pub order: QueueOrder,
    /// Samples shown in this session, in order (back/forward move through it).
    history: Vec<i64>,
    /// Position in `history` of the current sample.
    pos: usize,
    shown_at: Instant,
    skipped: HashSet<i64>,
    undo: Vec<Done>,
    redo: Vec<(i64, Decision, i64, bool)>,
    started: Instant,
    /// The samples this session labelled, one entry each with its current decision, most
    /// recently decided last (a relabel moves its sample to the end).
    recent: Vec<(i64, Decision)>,
}

/// One page of the grid view: consecutive samples of this session's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Zero-based page number in this session.
    pub number: usize,
    pub ids: Vec<i64>,
    /// Index in `ids` of the current sample (the focused cell); None when the queue is finished.
    pub focus: Option<usize>,
}

/// Session counters for the UI.
#[derive(Clone, Debug, Serialize)]
pub struct Counters {
    pub labelled: usize,
    pub skipped: usize,
    pub labels_per_hour: f64,
    pub remaining_unlabelled: i64,
}

impl<'a> Session<'a> {
    pub fn new(store: &'a Store, annotator: &str, order: QueueOrder) -> Result<Self, StoreError> {
        super::store::validate_annotator(annotator)?;
        let mut s = Self {
            store,
            annotator: annotator.to_string(),
            order,
            history: Vec::new(),
            pos: 0,
            shown_at: Instant::now(),
            skipped: HashSet::new(),
            undo: Vec::new(),
            redo: Vec::new(),
            started: Instant::now(),
            recent: Vec::new(),
        };
        if let Some(id) = s.find_next(&HashSet::new())? {
            s.history.push(id);
            s.shown_at = Instant::now();
        }
        Ok(s)
    }

    /// The next sample in queue order that is not excluded (already seen or skipped in this
    /// session, or labelled by this annotator).
    fn find_next(&self, exclude: &HashSet<i64>) -> Result<Option<i64>, StoreError> {
        if self.order == QueueOrder::Random {
            return self.find_random(exclude);
        }
        // Walk the index in pages, skipping excluded ids (a handful at most in practice).
        let mut after = 0i64;
        let mut offset = 0i64;
        loop {
            let ids = self.store.queue_page(self.order, &self.annotator, after, offset)?;
            if ids.is_empty() {
                return Ok(None);
            }
            if let Some(id) = ids.iter().find(|id| !exclude.contains(id)) {
                return Ok(Some(*id));
            }
            after = *ids.last().unwrap_or(&after);
            offset += ids.len() as i64;
        }
    }

    fn find_random(&self, exclude: &HashSet<i64>) -> Result<Option<i64>, StoreError> {
        let Some(max) = self.store.max_sample_id()? else { return Ok(None) };
        for _ in 0..8 {
            let start = rand::random_range(1..=max.max(1));
            let ids = self.store.unlabelled_from(start, &self.annotator)?;
            if let Some(id) = ids.into_iter().find(|id| !exclude.contains(id)) {
                return Ok(Some(id));
            }
        }
        // Fall back to a scan from the start (few unlabelled samples left).
        let ids = self.store.unlabelled_from(0, &self.annotator)?;
        Ok(ids.into_iter().find(|id| !exclude.contains(id)))
    }

    fn excluded(&self) -> HashSet<i64> {
        self.history.iter().chain(self.skipped.iter()).copied().collect()
    }

    /// The sample on screen (None when the queue is exhausted).
    pub fn current(&self) -> Result<Option<Sample>, StoreError> {
        match self.history.get(self.pos) {
            Some(&id) => Ok(Some(self.store.sample(id)?)),
            None => Ok(None),
        }
    }

    pub fn current_id(&self) -> Option<i64> {
        self.history.get(self.pos).copied()
    }

    /// This annotator's existing label on the current sample, if any.
    pub fn current_label(&self) -> Result<Option<Label>, StoreError> {
        match self.current_id() {
            Some(id) => self.label_of(id),
            None => Ok(None),
        }
    }

    /// This annotator's existing label on a sample (a review label in review order), if any.
    pub fn label_of(&self, sample_id: i64) -> Result<Option<Label>, StoreError> {
        let review = self.order == QueueOrder::Review;
        Ok(self
            .store
            .labels_of(sample_id)?
            .into_iter()
            .find(|l| l.annotator == self.annotator && l.review == review))
    }

    /// Whether this session skipped a sample (and it has not been revisited since).
    pub fn is_skipped(&self, sample_id: i64) -> bool {
        self.skipped.contains(&sample_id)
    }

    /// The next `n` samples after the current one (for prefetching images).
    pub fn upcoming(&self, n: usize) -> Result<Vec<i64>, StoreError> {
        self.upcoming_from(self.pos + 1, n)
    }

    /// `n` samples of the queue from position `from` of this session's history on: the ones
    /// already in it, then the queue's next ones (nothing is added to the history).
    fn upcoming_from(&self, from: usize, n: usize) -> Result<Vec<i64>, StoreError> {
        let mut out: Vec<i64> = self.history.iter().skip(from).copied().take(n).collect();
        let mut exclude = self.excluded();
        while out.len() < n {
            match self.find_next(&exclude)? {
                Some(id) => {
                    exclude.insert(id);
                    out.push(id);
                }
                None => break,
            }
        }
        Ok(out)
    }

    fn advance(&mut self) -> Result<(), StoreError> {
        if self.pos + 1 < self.history.len() {
            self.pos += 1;
        } else if let Some(id) = self.find_next(&self.excluded())? {
            self.history.push(id);
            self.pos = self.history.len() - 1;
        } else {
            self.pos = self.history.len();
        }
        self.shown_at = Instant::now();
        Ok(())
    }

    /// Label the current sample and auto-advance. Returns the label written.
    pub fn label(&mut self, decision: Decision) -> Result<Option<Label>, StoreError> {
        let label = self.label_here(decision)?;
        if label.is_some() {
            self.advance()?;
        }
        Ok(label)
    }

    /// Label the current sample without moving on: the store write, the recent decisions and the
    /// undo stack, shared by the single view and the grid.
    fn label_here(&mut self, decision: Decision) -> Result<Option<Label>, StoreError> {
        let Some(id) = self.current_id() else { return Ok(None) };
        let lead_ms = self.shown_at.elapsed().as_millis() as i64;
        let review = self.order == QueueOrder::Review;
        let (label, replaced) = self.store.put_label(id, &self.annotator, decision, lead_ms, review)?;
        let before = self.record(id, Some(decision));
        self.undo.push(Done {
            label: label.clone(),
            replaced,
            before,
        });
        self.redo.clear();
        Ok(Some(label))
    }

    /// Set (or with `None` remove) this session's decision on a sample; returns the previous one.
    /// One entry per sample, so a relabel neither counts twice nor lists the sample twice.
    fn record(&mut self, sample: i64, decision: Option<Decision>) -> Option<Decision> {
        let before = self.recent.iter().position(|(s, _)| *s == sample).map(|i| self.recent.remove(i).1);
        if let Some(d) = decision {
            self.recent.push((sample, d));
        }
        before
    }

    /// Samples labelled in this session (each once, however often it was relabelled).
    pub fn labelled(&self) -> usize {
        self.recent.len()
    }

    /// Change the queue order without ending the session: counters, recent decisions, undo and
    /// the samples already seen stay; the next sample comes from the new order.
    pub fn set_order(&mut self, order: QueueOrder) -> Result<(), StoreError> {
        if order == self.order {
            return Ok(());
        }
        self.order = order;
        self.history.truncate(self.pos.min(self.history.len()));
        self.pos = self.history.len();
        self.advance()
    }

    /// Samples skipped in this session that still lack this annotator's label.
    pub fn skipped_unlabelled(&self) -> Result<Vec<i64>, StoreError> {
        let mut out = Vec::new();
        for &id in &self.skipped {
            if !self.has_label(id)? {
                out.push(id);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Put the skipped samples that are still unlabelled back in the queue, the first on screen.
    /// The sample that was on screen comes right after them: the queue never hands out a sample
    /// already in the history again, so one left behind would be lost to this session.
    pub fn revisit_skipped(&mut self) -> Result<usize, StoreError> {
        let ids = self.skipped_unlabelled()?;
        if ids.is_empty() {
            return Ok(0);
        }
        self.skipped.clear();
        // They go in before the sample on screen (or at the end, when the queue is finished).
        let current = self.current_id();
        self.history.retain(|h| !ids.contains(h));
        let at = current
            .and_then(|c| self.history.iter().position(|&h| h == c))
            .unwrap_or(self.history.len());
        self.history.splice(at..at, ids.iter().copied());
        self.pos = at;
        self.shown_at = Instant::now();
        Ok(ids.len())
    }

    /// Skip the current sample for this session.
    pub fn skip(&mut self) -> Result<(), StoreError> {
        if self.skip_here() {
            self.advance()?;
        }
        Ok(())
    }

    /// Mark the current sample skipped without moving on; false when there is none.
    fn skip_here(&mut self) -> bool {
        match self.current_id() {
            Some(id) => {
                self.skipped.insert(id);
                true
            }
            None => false,
        }
    }

    /// Undo the last label of this session (multi-level): the label is removed (the one it
    /// replaced, if any, comes back) and its sample becomes current again.
    pub fn undo(&mut self) -> Result<bool, StoreError> {
        let Some(done) = self.undo.pop() else { return Ok(false) };
        self.store.remove_label(done.label.id, done.replaced.as_ref())?;
        self.record(done.label.sample_id, done.before);
        self.redo.push((
            done.label.sample_id,
            done.label.decision,
            done.label.lead_ms,
            done.label.review,
        ));
        if let Some(p) = self.history.iter().position(|&h| h == done.label.sample_id) {
            self.pos = p;
        }
        self.shown_at = Instant::now();
        Ok(true)
    }

    /// Redo the last undone label.
    pub fn redo(&mut self) -> Result<bool, StoreError> {
        let Some((sample, decision, lead_ms, review)) = self.redo.pop() else { return Ok(false) };
        let (label, replaced) = self.store.put_label(sample, &self.annotator, decision, lead_ms, review)?;
        let before = self.record(sample, Some(decision));
        self.undo.push(Done { label, replaced, before });
        if self.current_id() == Some(sample) {
            self.advance()?;
        }
        Ok(true)
    }

    /// Go back to the previous sample of this session.
    pub fn back(&mut self) -> bool {
        if self.pos > 0 {
            self.pos -= 1;
            self.shown_at = Instant::now();
            true
        } else {
            false
        }
    }

    /// Go forward (to a sample already seen, or the next in the queue).
    pub fn forward(&mut self) -> Result<(), StoreError> {
        self.advance()
    }

    /// Jump to a sample seen earlier in this session (the side list of recent decisions).
    pub fn goto(&mut self, sample_id: i64) -> bool {
        match self.history.iter().position(|&h| h == sample_id) {
            Some(p) => {
                self.pos = p;
                self.shown_at = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Where the grid page of `size` samples holding the current position starts in the history.
    fn page_start(&self, size: usize) -> usize {
        (self.pos / size) * size
    }

    /// Extend the history from the queue up to `end` samples (as far as the queue goes).
    fn fill_to(&mut self, end: usize) -> Result<(), StoreError> {
        let mut exclude = self.excluded();
        while self.history.len() < end {
            match self.find_next(&exclude)? {
                Some(id) => {
                    exclude.insert(id);
                    self.history.push(id);
                }
                None => break,
            }
        }
        Ok(())
    }

    /// The grid page of `size` samples (at least one) holding the current sample: page k is
    /// positions k*size..(k+1)*size of this session's history, taken from the queue as needed.
    pub fn page(&mut self, size: usize) -> Result<Page, StoreError> {
        let size = size.max(1);
        let start = self.page_start(size);
        self.fill_to(start + size)?;
        let end = (start + size).min(self.history.len());
        Ok(Page {
            number: start / size,
            ids: self.history[start..end].to_vec(),
            focus: (self.pos < end).then(|| self.pos - start),
        })
    }

    /// The samples of the page after the current one, for prefetching (nothing is taken from
    /// the queue for good).
    pub fn next_page(&self, size: usize) -> Result<Vec<i64>, StoreError> {
        let size = size.max(1);
        self.upcoming_from(self.page_start(size) + size, size)
    }

    /// Whether a sample still needs a decision from this session: no label by this annotator
    /// and not skipped.
    pub fn is_open(&self, sample_id: i64) -> Result<bool, StoreError> {
        Ok(!self.skipped.contains(&sample_id) && self.label_of(sample_id)?.is_none())
    }

    /// Grid: label a sample of this session (any cell of the page, labelled before or not) with
    /// the same bookkeeping as `label`, then focus the page's next open cell; once every cell
    /// has a decision, the next page. None when the sample is not part of this session.
    pub fn label_in_page(&mut self, sample_id: i64, decision: Decision, size: usize) -> Result<Option<Label>, StoreError> {
        if !self.goto(sample_id) {
            return Ok(None);
        }
        let label = self.label_here(decision)?;
        self.focus_next_open(size)?;
        Ok(label)
    }

    /// Grid: skip a sample of this session, then move on as `label_in_page` does.
    pub fn skip_in_page(&mut self, sample_id: i64, size: usize) -> Result<bool, StoreError> {
        if !self.goto(sample_id) || !self.skip_here() {
            return Ok(false);
        }
        self.focus_next_open(size)?;
        Ok(true)
    }

    /// Focus the page's next open cell after the current one (wrapping to the page's start);
    /// with none left, the next page's first open cell.
    fn focus_next_open(&mut self, size: usize) -> Result<(), StoreError> {
        let size = size.max(1);
        let start = self.page_start(size);
        self.fill_to(start + size)?;
        let end = (start + size).min(self.history.len());
        let here = self.pos.min(end);
        for p in (here + 1..end).chain(start..here) {
            if self.is_open(self.history[p])? {
                self.pos = p;
                self.shown_at = Instant::now();
                return Ok(());
            }
        }
        self.fill_to(start + size + 1)?;
        self.pos = (start + size).min(self.history.len());
        self.focus_first_open(size)
    }

    /// Focus the first open cell of the page holding the current position (its first cell when
    /// all are decided).
    fn focus_first_open(&mut self, size: usize) -> Result<(), StoreError> {
        let start = self.page_start(size);
        self.fill_to(start + size)?;
        let end = (start + size).min(self.history.len());
        for p in start..end {
            if self.is_open(self.history[p])? {
                self.pos = p;
                break;
            }
        }
        self.shown_at = Instant::now();
        Ok(())
    }

    /// Grid: go to the next (`forward`) or the previous page and focus its first open cell.
    /// False when there is no such page (the first page, or the queue has nothing after this
    /// one).
    pub fn turn_page(&mut self, size: usize, forward: bool) -> Result<bool, StoreError> {
        let size = size.max(1);
        let start = self.page_start(size);
        let target = if forward {
            start + size
        } else if start >= size {
            start - size
        } else {
            return Ok(false);
        };
        self.fill_to(target + 1)?;
        if target >= self.history.len() {
            return Ok(false);
        }
        self.pos = target;
        self.focus_first_open(size)?;
        Ok(true)
    }

    /// Grid: change the queue order from the current page on (its cells come from the new
    /// order); the session goes on as with `set_order`.
    pub fn set_order_in_page(&mut self, order: QueueOrder, size: usize) -> Result<(), StoreError> {
        if order == self.order {
            return Ok(());
        }
        self.pos = self.page_start(size.max(1));
        self.set_order(order)
    }

    /// The last `n` decisions of this session, newest first.
    pub fn recent(&self, n: usize) -> Vec<(i64, Decision)> {
        self.recent.iter().rev().take(n).copied().collect()
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        let remaining = self.store.unlabelled_count()?;
        let hours = self.started.elapsed().as_secs_f64() / 3600.0;
        let labelled = self.labelled();
        Ok(Counters {
            labelled,
            skipped: self.skipped_unlabelled()?.len(),
            labels_per_hour: if hours > 0.0 { labelled as f64 / hours } else { 0.0 },
            remaining_unlabelled: remaining,
        })
    }

    /// Whether a given sample already has a label by this annotator (for scripted labelling).
    pub fn has_label(&self, sample_id: i64) -> Result<bool, StoreError> {
        self.store.has_label_by(sample_id, &self.annotator)
    }
}
