//! The report: a table of latencies with ratios to each scenario's base, a
//! summary of the other figures, and the latency plot. The prose of
//! docs/benchmarks.md is the template `report.md`; only figures are filled in.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::Result;
use crate::plot;
use crate::stats::Samples;

/// The written report's prose, with `{placeholders}` for the figures.
const TEMPLATE: &str = include_str!("report.md");

pub(crate) struct Report {
    table: String,
    summary: String,
    /// Latency distributions to plot: a title and named series.
    panels: Vec<(String, Vec<(String, Samples)>)>,
}

impl Report {
    pub(crate) fn new() -> Report {
        let mut table = String::new();
        let _ = writeln!(table, "| scenario | contender | median | p99 | ratio (median) |");
        let _ = writeln!(table, "|---|---|---|---|---|");
        Report {
            table,
            summary: String::new(),
            panels: Vec::new(),
        }
    }

    /// A table row: `samples` of `who` in `scenario`, with the ratio of its
    /// median to `base`.
    pub(crate) fn row(&mut self, scenario: &str, who: &str, samples: &Samples, base: Duration) {
        let _ = writeln!(
            self.table,
            "| {scenario} | {who} | {:?} | {:?} | {:.2}x |",
            samples.median(),
            samples.p99(),
            ratio(samples.median(), base)
        );
    }

    /// A line of the summary.
    pub(crate) fn line(&mut self, line: impl std::fmt::Display) {
        let _ = writeln!(self.summary, "{line}");
    }

    /// A panel of the latency plot.
    pub(crate) fn panel(&mut self, title: &str, series: Vec<(&str, &Samples)>) {
        let series = series
            .into_iter()
            .map(|(name, samples)| (name.to_owned(), samples.clone()))
            .collect();
        self.panels.push((title.to_owned(), series));
    }

    pub(crate) fn print(&self) {
        println!("{}\n{}", self.table, self.summary);
    }

    /// Writes `benchmarks.md` and `benchmarks-latency.svg` into `dir`.
    pub(crate) fn write(&self, dir: &Path, redis_version: &str, date: &str) -> Result {
        let cores = std::thread::available_parallelism()
            .map_or(0, usize::from)
            .to_string();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|line| {
                line.strip_prefix("model name")
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let text = fill(
            TEMPLATE,
            &[
                ("date", date),
                ("cores", &cores),
                ("cpu", &cpu),
                ("redis_version", redis_version),
                ("dlock_version", env!("CARGO_PKG_VERSION")),
                ("table", &self.table),
                ("summary", &self.summary),
            ],
        )?;
        let panels: Vec<(&str, Vec<(&str, &Samples)>)> = self
            .panels
            .iter()
            .map(|(title, series)| {
                let series = series
                    .iter()
                    .map(|(name, samples)| (name.as_str(), samples))
                    .collect();
                (title.as_str(), series)
            })
            .collect();
        let panels: Vec<(&str, &[(&str, &Samples)])> = panels
            .iter()
            .map(|(title, series)| (*title, series.as_slice()))
            .collect();
        std::fs::write(dir.join("benchmarks.md"), text)?;
        std::fs::write(dir.join("benchmarks-latency.svg"), plot::latency_svg(&panels))?;
        Ok(())
    }
}

/// `value` over `base`, as a factor.
pub(crate) fn ratio(value: Duration, base: Duration) -> f64 {
    value.as_secs_f64() / base.as_secs_f64().max(1e-9)
}

/// `template` with every `{name}` replaced by its value; a placeholder left
/// unfilled is an error, so that the template and the code cannot drift.
fn fill(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let candidate = &rest[start + 1..];
        let end = candidate.find('}').unwrap_or(candidate.len());
        let name = &candidate[..end];
        let is_placeholder = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if is_placeholder && !values.iter().any(|(known, _)| *known == name) {
            return Err(format!("report.md has a placeholder {{{name}}} that nothing fills").into());
        }
        rest = candidate;
    }
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{name}}}"), value);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_filled_completely() {
        let values = [
            ("date", "d"),
            ("cores", "2"),
            ("cpu", "c"),
            ("redis_version", "v"),
            ("dlock_version", "0"),
            ("table", "T"),
            ("summary", "S"),
        ];
        let text = fill(TEMPLATE, &values).expect("every placeholder has a value");
        assert!(text.contains("T\n") && text.contains("S"));
        assert!(fill("a {unknown} b", &values).is_err());
    }
}
