//! The Fine-tune tab's training monitor, as TensorBoard and W&B users know it: one plot per
//! metric with the x axes (and the hover cursor) linked across plots, debiased EMA smoothing with
//! the raw curve faint behind it, a log-scale y axis, several runs overlaid in their own colours,
//! step or relative wall-clock time on x, and the process/GPU memory sampled during training.
//! The series are computed here from `train::run_folder::RunData`; nothing here reads files.

use egui::{Color32, RichText};
use egui_plot::{ColorConflictHandling, GridMark, HoverPosition, Legend, Line, Plot, PlotPoints};

use crate::tr;
use crate::train::run_folder::{RunData, RunKind};

/// How the curves are drawn (the controls above the plots).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonitorView {
    /// EMA weight, 0 (raw) ..= 0.99.
    pub smoothing: f64,
    /// log10 of the positive values on y, ticks labelled with the real values.
    pub log_y: bool,
    pub x_axis: XAxis,
}

impl Default for MonitorView {
    fn default() -> Self {
        // TensorBoard's default smoothing.
        Self { smoothing: 0.6, log_y: false, x_axis: XAxis::Step }
    }
}

/// What the x axes show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    Step,
    /// Seconds since the run started (from the `time` recorded with each step).
    WallTime,
}

/// The largest smoothing weight the slider offers.
pub const MAX_SMOOTHING: f64 = 0.99;

/// A series drawn in the last frame (what a test or a screenshot check can look at: the plot's
/// title, the legend name and the number of points drawn).
#[derive(Clone, Debug, PartialEq)]
pub struct PlottedSeries {
    pub plot: String,
    pub name: String,
    pub points: usize,
}

/// TensorBoard's smoothing: an exponential moving average with weight `weight` whose zero
/// start is debiased (divided by 1 - weight^n), so the first points are not pulled to 0.
/// Non-finite values pass through unsmoothed and leave the average as it was.
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let w = weight.clamp(0.0, MAX_SMOOTHING);
    let mut last = 0.0;
    let mut n = 0i32;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            last = last * w + (1.0 - w) * v;
            n += 1;
            let debias = 1.0 - w.powi(n);
            if debias > 0.0 { last / debias } else { v }
        })
        .collect()
}

/// The points with their y replaced by log10(y), and how many points had y <= 0 (or not
/// finite) and were dropped: a log axis cannot show them.
pub fn log10_points(points: &[[f64; 2]]) -> (Vec<[f64; 2]>, usize) {
    let kept: Vec<[f64; 2]> = points
        .iter()
        .filter(|p| p[1] > 0.0 && p[1].is_finite())
        .map(|p| [p[0], p[1].log10()])
        .collect();
    let dropped = points.len() - kept.len();
    (kept, dropped)
}

/// A log-axis tick (a log10 value) written as the real value it stands for.
pub fn log_tick_label(log10: f64) -> String {
    let v = 10f64.powf(log10);
    if v == 0.0 || !v.is_finite() {
        return String::new();
    }
    if (1e-3..1e4).contains(&v.abs()) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// Seconds since the run started at each recorded step, `None` when any step lacks its `time`
/// (runs written before it was recorded). An RFFT run starts at its first step's end less that
/// step's duration; an RFNet run (no durations recorded) at its first step's end.
pub fn wall_times(run: &RunData) -> Option<Vec<(usize, f64)>> {
    match run.entry.kind {
        RunKind::Rfft => {
            let first = run.rfft_steps.first()?;
            let t0 = first.time? - first.step_time_s.max(0.0);
            run.rfft_steps.iter().map(|s| Some((s.step, s.time? - t0))).collect()
        }
        RunKind::Rfnet => {
            let t0 = run.rfnet_steps.first()?.time?;
            run.rfnet_steps.iter().map(|s| Some((s.step, s.time? - t0))).collect()
        }
    }
}

/// Why the wall-clock axis is not available for `run`, if it is not.
pub fn wall_time_unavailable(run: &RunData) -> Option<&'static str> {
    if run.points() == 0 {
        Some(tr!("finetune.wall_no_steps"))
    } else if wall_times(run).is_none() {
        Some(tr!("finetune.wall_no_times"))
    } else {
        None
    }
}

/// Map `[step, y]` points onto the x axis: unchanged for steps; for wall time, each step's
/// seconds since the start (step 0, before the first step, is 0; an eval step between recorded
/// steps takes the time of the last step before it). `None` when the run has no times.
pub fn on_x_axis(points: Vec<[f64; 2]>, times: Option<&[(usize, f64)]>, axis: XAxis) -> Option<Vec<[f64; 2]>> {
    match axis {
        XAxis::Step => Some(points),
        XAxis::WallTime => {
            let times = times?;
            Some(
                points
                    .into_iter()
                    .map(|[step, y]| {
                        let i = times.partition_point(|(s, _)| (*s as f64) <= step);
                        let t = if i == 0 { 0.0 } else { times[i - 1].1 };
                        [t, y]
                    })
                    .collect(),
            )
        }
    }
}

/// The colour of the i-th run on the plots (the selected run is 0).
pub fn run_colour(i: usize) -> Color32 {
    const PALETTE: [Color32; 8] = [
        Color32::from_rgb(31, 119, 180),
        Color32::from_rgb(255, 127, 14),
        Color32::from_rgb(44, 160, 44),
        Color32::from_rgb(214, 39, 40),
        Color32::from_rgb(148, 103, 189),
        Color32::from_rgb(140, 86, 75),
        Color32::from_rgb(227, 119, 194),
        Color32::from_rgb(23, 190, 207),
    ];
    PALETTE[i % PALETTE.len()]
}

/// One curve of a plot: its legend name, colour and `[x, y]` points (raw values).
pub struct Curve {
    pub name: String,
    pub colour: Color32,
    pub points: Vec<[f64; 2]>,
}

/// How a plot treats its values.
#[derive(Clone, Copy)]
pub struct PlotStyle {
    /// EMA-smoothed with the raw curve faint behind.
    pub smooth: bool,
    /// Follows the log-scale toggle (not for rates in 0..1 or memory).
    pub log: bool,
    /// Shares the x axis and cursor with the other linked plots (over steps or time); unlinked
    /// plots are over epochs.
    pub link: bool,
    pub height: f32,
}

/// The group that links the monitor's x axes and cursors.
const LINK: &str = "finetune-monitor";

/// Draw one metric plot with its curves as `view` says, and record what was drawn.
pub fn metric_plot(
    ui: &mut egui::Ui,
    id: &str,
    title: &str,
    curves: Vec<Curve>,
    style: PlotStyle,
    view: &MonitorView,
    drawn: &mut Vec<PlottedSeries>,
) {
    ui.label(RichText::new(title).strong());
    let log = style.log && view.log_y;
    let smoothing = if style.smooth { view.smoothing } else { 0.0 };
    let mut dropped = 0usize;
    let mut lines: Vec<(String, Color32, Option<Vec<[f64; 2]>>, Vec<[f64; 2]>)> = Vec::new();
    for c in curves {
        let raw = c.points;
        let smoothed = (smoothing > 0.0).then(|| {
            let ys: Vec<f64> = raw.iter().map(|p| p[1]).collect();
            raw.iter().zip(ema(&ys, smoothing)).map(|(p, y)| [p[0], y]).collect::<Vec<_>>()
        });
        let (raw, smoothed) = if log {
            let (r, d) = log10_points(&raw);
            dropped += d;
            (r, smoothed.map(|s| log10_points(&s).0))
        } else {
            (raw, smoothed)
        };
        drawn.push(PlottedSeries {
            plot: title.to_string(),
            name: c.name.clone(),
            points: raw.len(),
        });
        lines.push((c.name, c.colour, smoothed, raw));
    }
    let mut plot = Plot::new(id)
        .height(style.height)
        .legend(Legend::default().color_conflict_handling(ColorConflictHandling::PickLast));
    if style.link {
        plot = plot
            .link_axis(LINK, [true, false])
            .link_cursor(LINK, [true, false])
            .x_axis_label(match view.x_axis {
                XAxis::Step => tr!("finetune.axis_step"),
                XAxis::WallTime => tr!("finetune.axis_wall_time"),
            });
    } else {
        // The only unlinked plots are RFNet's per-epoch ones.
        plot = plot.x_axis_label(tr!("finetune.axis_epoch"));
    }
    if log {
        plot = plot
            .y_axis_formatter(|mark: GridMark, _| log_tick_label(mark.value))
            .label_formatter(|h: &HoverPosition<'_>| {
                Some(match h {
                    HoverPosition::NearDataPoint { plot_name, position, .. } => {
                        format!("{plot_name}\nx = {:.1}\ny = {}", position.x, log_tick_label(position.y))
                    }
                    HoverPosition::Elsewhere { position } => format!("x = {:.1}\ny = {}", position.x, log_tick_label(position.y)),
                })
            });
    }
    // A curve of one point, or of values equal up to rounding, spans (almost) nothing: egui_plot
    // then derives bounds of zero width and stops (a debug assertion). Pad such spans.
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for (_, _, smoothed, raw) in &lines {
        for p in raw.iter().chain(smoothed.iter().flatten()).filter(|p| p[0].is_finite() && p[1].is_finite()) {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
    }
    if lo[0] <= hi[0] {
        let thin = |k: usize| hi[k] - lo[k] <= 1e-9 * lo[k].abs().max(hi[k].abs()).max(1.0);
        if thin(0) {
            plot = plot.include_x(lo[0] - 0.5).include_x(hi[0] + 0.5);
        }
        if thin(1) {
            let pad = (lo[1].abs() * 0.05).max(1e-3);
            plot = plot.include_y(lo[1] - pad).include_y(hi[1] + pad);
        }
    }
    plot.show(ui, |p| {
        for (i, (name, colour, smoothed, raw)) in lines.into_iter().enumerate() {
            match smoothed {
                Some(s) => {
                    // The raw curve first, faint, so the smoothed one is drawn over it; both
                    // share the run's legend entry (and its colour, the last one drawn).
                    p.line(
                        Line::new(name.clone(), PlotPoints::new(raw))
                            .id(egui::Id::new((id, i, "raw")))
                            .color(colour.gamma_multiply(0.3))
                            .allow_hover(false),
                    );
                    p.line(Line::new(name, PlotPoints::new(s)).id(egui::Id::new((id, i))).color(colour));
                }
                None => p.line(Line::new(name, PlotPoints::new(raw)).id(egui::Id::new((id, i))).color(colour)),
            }
        }
    });
    if dropped > 0 {
        ui.label(RichText::new(tr!("finetune.log_dropped", n = dropped)).small().weak());
    }
}

/// The controls above the plots: smoothing, log scale, x axis. `wall_why` says why the
/// wall-clock axis is off for the selected run (then it is disabled and falls back to steps).
pub fn view_controls(ui: &mut egui::Ui, view: &mut MonitorView, wall_why: Option<&str>) {
    if wall_why.is_some() && view.x_axis == XAxis::WallTime {
        view.x_axis = XAxis::Step;
    }
    ui.horizontal_wrapped(|ui| {
        ui.label(tr!("finetune.smoothing"));
        ui.add(egui::Slider::new(&mut view.smoothing, 0.0..=MAX_SMOOTHING).fixed_decimals(2))
            .on_hover_text(tr!("finetune.smoothing_hint"));
        ui.checkbox(&mut view.log_y, tr!("finetune.log_scale"))
            .on_hover_text(tr!("finetune.log_scale_hint"));
        ui.label(tr!("finetune.x_axis"));
        ui.selectable_value(&mut view.x_axis, XAxis::Step, tr!("finetune.x_step"));
        ui.add_enabled_ui(wall_why.is_none(), |ui| {
            let r = ui.selectable_value(&mut view.x_axis, XAxis::WallTime, tr!("finetune.x_wall_time"));
            match wall_why {
                Some(why) => r.on_disabled_hover_text(why),
                None => r.on_hover_text(tr!("finetune.x_wall_time_hint")),
            };
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_debiased_like_tensorboard() {
        // weight 0.5: last = 0.5, 1.75, 2.375; debias 0.5, 0.75, 0.875.
        let s = ema(&[1.0, 3.0, 3.0], 0.5);
        let want = [1.0, 1.75 / 0.75, 2.375 / 0.875];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        assert_eq!(ema(&[2.0, f64::NAN, 2.0], 0.9)[0], 2.0);
        assert!(ema(&[2.0, f64::NAN, 2.0], 0.9)[1].is_nan());
        assert!((ema(&[2.0, f64::NAN, 2.0], 0.9)[2] - 2.0).abs() < 1e-12);
        assert_eq!(ema(&[1.0, 5.0], 0.0), vec![1.0, 5.0]);
    }

    #[test]
    fn log_scale_drops_non_positive_values_and_labels_real_values() {
        let (pts, dropped) = log10_points(&[[1.0, 100.0], [2.0, 0.0], [3.0, -1.0], [4.0, 0.01]]);
        assert_eq!(dropped, 2);
        assert_eq!(pts, vec![[1.0, 2.0], [4.0, -2.0]]);
        assert_eq!(log_tick_label(2.0), "100");
        assert_eq!(log_tick_label(-2.0), "0.01");
        assert_eq!(log_tick_label(-6.0), "1.0e-6");
    }

    #[test]
    fn eval_steps_map_onto_wall_time() {
        let times = [(1usize, 2.0), (2, 4.0), (4, 9.0)];
        let x = on_x_axis(vec![[0.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]], Some(&times), XAxis::WallTime).unwrap();
        assert_eq!(x.iter().map(|p| p[0]).collect::<Vec<_>>(), vec![0.0, 4.0, 4.0, 9.0]);
        assert_eq!(on_x_axis(vec![[1.0, 1.0]], None, XAxis::WallTime), None);
    }
}
