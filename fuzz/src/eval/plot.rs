//! The evaluation's plot: time to first finding per variant, one bar group per method, on a
//! log scale, as SVG (plotters' SVG backend needs no system fonts).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::Row;

/// Colours of the methods, in [`super::Method::ALL`] order.
const COLOURS: [RGBColor; 3] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];

/// Draws `rows` (one per variant and method) to `path`; `limit` is the per-run time limit,
/// drawn as the ceiling that "not found" bars reach.
pub fn draw(
    path: &Path,
    variants: &[String],
    methods: &[&str],
    rows: &[Row],
    limit: f64,
) -> Result<()> {
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let groups = variants.len() as f64;
    let floor = 0.01_f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "nmifuzz: seconds to the first finding (median of seeds; log scale)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, (floor..limit * 2.0).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(variants.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < variants.len() {
                variants[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("seconds (not found = the time limit)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / methods.len() as f64;
    for (m, method) in methods.iter().enumerate() {
        let colour = COLOURS[m % COLOURS.len()];
        let bars = variants.iter().enumerate().filter_map(|(v, variant)| {
            let row = rows.iter().find(|r| &r.variant == variant && r.method == *method)?;
            let left = v as f64 + 0.1 + m as f64 * width;
            let top = row.seconds.median.max(floor);
            Some(Rectangle::new([(left, floor), (left + width * 0.9, top)], colour.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(*method)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .draw_series(LineSeries::new([(0.0, limit), (groups, limit)], BLACK.stroke_width(1)))
        .map_err(|e| anyhow!("{e}"))?
        .label("time limit (campaign, random)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 10, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
