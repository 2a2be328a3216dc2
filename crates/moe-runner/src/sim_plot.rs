//! The PNG of `simulate`: per scenario (node-limited, unlimited, or traced layer), the nodes a
//! token reaches, the bytes it moves over InfiniBand and NVLink, and the all-to-all time
//! against the expert compute, as grouped bars side by side.

use std::path::Path;

use moe_parallel::sim::SimReport;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::plots::{PlotError, fonts};

/// One bar per scenario.
struct Bars<'a> {
    label: &'a str,
    values: Vec<f64>,
    color: RGBColor,
}

/// Draws the three panels of `report` into a PNG at `path`.
pub fn plot_simulation(path: &Path, report: &SimReport) -> Result<(), PlotError> {
    fonts();
    let err = |message: String| PlotError { path: path.display().to_string(), message };
    let names: Vec<&str> = report.scenarios.iter().map(|s| s.name.as_str()).collect();
    if names.is_empty() {
        return Err(err("the report has no scenario".into()));
    }
    let column = |f: fn(&moe_parallel::sim::ScenarioReport) -> f64| report.scenarios.iter().map(f).collect();
    let root = BitMapBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let title = format!(
        "EP {} GPUs on {} nodes, experts per GPU: {}, copies of the group: {}",
        report.ep_gpus, report.ep_nodes, report.experts_per_gpu, report.ep_copies
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((1, 3));
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let green = RGBColor(44, 160, 44);
    bar_panel(
        &panels[0],
        "Nodes per token",
        "nodes",
        &names,
        &[
            Bars { label: "mean", values: column(|s| s.mean_nodes), color: blue },
            Bars { label: "max", values: column(|s| s.max_nodes as f64), color: orange },
        ],
    )
    .map_err(err)?;
    bar_panel(
        &panels[1],
        "Bytes per token (dispatch + combine)",
        "KB",
        &names,
        &[
            Bars { label: "InfiniBand", values: column(|s| s.ib_bytes_per_token / 1e3), color: blue },
            Bars { label: "NVLink", values: column(|s| s.nvlink_bytes_per_token / 1e3), color: orange },
        ],
    )
    .map_err(err)?;
    bar_panel(
        &panels[2],
        "Time per layer (slowest GPU)",
        "microseconds",
        &names,
        &[
            Bars { label: "all-to-all", values: column(|s| s.all_to_all_time_s() * 1e6), color: blue },
            Bars { label: "expert compute", values: column(|s| s.compute_time_s * 1e6), color: green },
        ],
    )
    .map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Grouped bars: one group per category, one bar per series.
fn bar_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    y_label: &str,
    categories: &[&str],
    series: &[Bars],
) -> Result<(), String> {
    let top = series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let n = categories.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..(top * 1.35).max(1e-9))
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y_label).draw().map_err(|e| e.to_string())?;
    // The scenario names above their groups (a float x axis has no category ticks).
    let centred = ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    chart
        .draw_series(
            categories
                .iter()
                .enumerate()
                .map(|(i, c)| Text::new(c.to_string(), (i as f64 + 0.5, top * 1.07), centred.clone())),
        )
        .map_err(|e| e.to_string())?;
    let width = 0.8 / series.len() as f64;
    for (j, s) in series.iter().enumerate() {
        let color = s.color;
        chart
            .draw_series(s.values.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + j as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v.max(0.0))], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(s.label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}
