//! The latency plot in docs/benchmarks-latency.svg: one panel per scenario,
//! one line per contender, showing the share of samples at or below each
//! latency (an empirical CDF) on a logarithmic time axis. Written by hand
//! as SVG text, so the harness needs no plotting library.

use std::fmt::Write as _;

use crate::stats::Samples;

const WIDTH: f64 = 760.0;
const PANEL_HEIGHT: f64 = 240.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// One SVG with a panel per `(title, series)`.
pub(crate) fn latency_svg(panels: &[(&str, &[(&str, &Samples)])]) -> String {
    let height = PANEL_HEIGHT * panels.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (index, (title, series)) in panels.iter().enumerate() {
        panel(&mut svg, index as f64 * PANEL_HEIGHT, title, series);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, top: f64, title: &str, series: &[(&str, &Samples)]) {
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = PANEL_HEIGHT - TOP - BOTTOM;
    let (x0, y0) = (LEFT, top + TOP);
    let micros = |sample: &std::time::Duration| (sample.as_secs_f64() * 1e6).max(1.0);
    let all = series
        .iter()
        .flat_map(|(_, samples)| samples.0.iter().map(micros));
    let (low, high) = all.fold((f64::MAX, 1.0_f64), |(low, high), value| {
        (low.min(value), high.max(value))
    });
    if low > high {
        return; // no samples
    }
    // Whole decades around the data, so the tick labels are round numbers.
    let (first_decade, last_decade) = (
        low.log10().floor(),
        high.log10().ceil().max(low.log10().floor() + 1.0),
    );
    let x_of = |value: f64| x0 + (value.log10() - first_decade) / (last_decade - first_decade) * plot_width;
    let y_of = |share: f64| y0 + (1.0 - share) * plot_height;

    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        top + 18.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#444"/>"##
    );
    for share in [0.0, 0.25, 0.5, 0.75, 0.99] {
        let y = y_of(share);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + plot_width,
            x0 - 4.0,
            y + 4.0,
            if share == 0.99 {
                "p99".to_owned()
            } else {
                format!("{:.0}%", share * 100.0)
            }
        );
    }
    let mut decade = first_decade;
    while decade <= last_decade {
        let value = 10f64.powf(decade);
        let x = x_of(value);
        let label = if value >= 1000.0 {
            format!("{} ms", value / 1000.0)
        } else {
            format!("{value} µs")
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            y0 + plot_height,
            y0 + plot_height + 14.0
        );
        decade += 1.0;
    }
    for (index, (name, samples)) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let mut sorted: Vec<f64> = samples.0.iter().map(micros).collect();
        sorted.sort_by(f64::total_cmp);
        // At most ~400 points per line: every n-th sample, and the last.
        let step = (sorted.len() / 400).max(1);
        let mut points = String::new();
        for (rank, value) in sorted.iter().enumerate() {
            if rank % step == 0 || rank + 1 == sorted.len() {
                let share = (rank + 1) as f64 / sorted.len() as f64;
                let _ = write!(points, "{:.1},{:.1} ", x_of(*value), y_of(share));
            }
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.trim_end()
        );
        let legend_y = y0 + 12.0 + index as f64 * 16.0;
        let legend_x = x0 + plot_width + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            legend_x + 18.0,
            legend_x + 24.0,
            legend_y + 4.0,
            escape(name)
        );
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
