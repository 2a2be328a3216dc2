//! PNG plots of a run: the loss curves and, per MoE layer, a heatmap of expert load over steps
//! (the balance dashboard). Text uses DejaVu Sans embedded in the binary, so plotting needs no
//! system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::metrics::StepMetrics;

/// A plot that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    /// The PNG.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

fn fail(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError { path: path.display().to_string(), message }
}

pub(crate) fn fonts() {
    static ONCE: Once = Once::new();
    // The embedded font is valid; if registering failed, plots would still draw without text.
    ONCE.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// One series of a line plot.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub color: RGBColor,
}

/// Draws `series` into a PNG at `path`.
pub fn line_plot(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<(), PlotError> {
    fonts();
    let err = fail(path);
    let points = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Err(err("no finite points".into()));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{}", *v as usize))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied().filter(|p| p.1.is_finite()), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Exponential moving average, to make a noisy training curve readable.
pub fn smooth(values: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut acc = None;
    values
        .iter()
        .map(|&(x, y)| {
            let v = acc.map_or(y, |a: f64| weight * a + (1.0 - weight) * y);
            acc = Some(v);
            (x, v)
        })
        .collect()
}

/// The loss curves: training (smoothed) and validation, nats per byte.
pub fn plot_losses(path: &Path, metrics: &[StepMetrics]) -> Result<(), PlotError> {
    let train: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
    let val: Vec<(f64, f64)> = metrics.iter().filter_map(|m| m.eval.map(|e| (m.step as f64, e.val_loss))).collect();
    line_plot(
        path,
        "Loss",
        "optimizer step",
        "nats per byte",
        &[
            Series { label: "training (EMA 0.9)", points: smooth(&train, 0.9), color: RGBColor(31, 119, 180) },
            Series { label: "validation", points: val, color: RGBColor(214, 39, 40) },
        ],
    )
}

/// Colour of a load ratio (load / mean load): white at 1, blue below, red above, saturating at
/// a factor of 4 either way.
fn ratio_color(ratio: f64) -> RGBColor {
    let t = (ratio.max(1e-9).log2() / 2.0).clamp(-1.0, 1.0);
    let fade = |c: f64| (255.0 * (1.0 - t.abs()) + c * t.abs()) as u8;
    if t < 0.0 { RGBColor(fade(33.0), fade(102.0), fade(172.0)) } else { RGBColor(fade(178.0), fade(24.0), fade(43.0)) }
}

/// The balance dashboard of MoE layer `layer`: experts down, steps across, each cell the
/// expert's load over the mean (white: even; red: hot; blue: cold).
pub fn plot_load_heatmap(path: &Path, metrics: &[StepMetrics], layer: usize) -> Result<(), PlotError> {
    fonts();
    let err = fail(path);
    let rows: Vec<(usize, &Vec<u64>)> = metrics.iter().filter_map(|m| m.load.get(layer).map(|l| (m.step, l))).collect();
    let Some(experts) = rows.first().map(|r| r.1.len()) else {
        return Err(err(format!("no load recorded for MoE layer {layer}")));
    };
    // At most 200 columns: consecutive steps are summed into one.
    let per_col = rows.len().div_ceil(200).max(1);
    let columns: Vec<(usize, Vec<u64>)> = rows
        .chunks(per_col)
        .map(|c| {
            let mut sum = vec![0u64; experts];
            for (_, load) in c {
                sum.iter_mut().zip(load.iter()).for_each(|(s, &l)| *s += l);
            }
            (c[0].0, sum)
        })
        .collect();
    let last_step = rows.last().map_or(1, |r| r.0);
    let root = BitMapBackend::new(path, (900, 60 + 18 * experts.clamp(8, 40) as u32 + 60)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("MoE layer {layer}: expert load / mean (white even, red hot, blue cold)"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(last_step as f64), 0f64..experts as f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("optimizer step")
        .y_desc("expert")
        .x_label_formatter(&|v| format!("{}", *v as usize))
        .y_label_formatter(&|v| format!("{}", *v as usize))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let width = last_step as f64 / columns.len() as f64;
    let cells = columns.iter().enumerate().flat_map(|(c, (_, load))| {
        let mean = load.iter().sum::<u64>() as f64 / experts as f64;
        load.iter().enumerate().map(move |(e, &l)| {
            let x = c as f64 * width;
            Rectangle::new(
                [(x, e as f64), (x + width, e as f64 + 1.0)],
                ratio_color(l as f64 / mean.max(1e-9)).filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_load_is_white_and_skew_saturates() {
        assert_eq!(ratio_color(1.0), RGBColor(255, 255, 255));
        assert_eq!(ratio_color(4.0), RGBColor(178, 24, 43));
        assert_eq!(ratio_color(0.0), RGBColor(33, 102, 172));
    }

    #[test]
    fn smoothing_is_an_exponential_average() {
        let s = smooth(&[(0.0, 1.0), (1.0, 3.0), (2.0, 3.0)], 0.5);
        assert_eq!(s, vec![(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]);
    }
}
