//! `--plot FILE.svg`: the results as a chart. Left, total time (open +
//! access) per pattern, one bar per mode, log scale, whiskers from the
//! fastest to the slowest repetition; right, open time per mode. The
//! headline ratios are written under the title.

use super::report::{Report, fmt_ratio, median};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;

const W: u32 = 1200;
const H: u32 = 700;
/// Height of the title, headline and legend rows.
const TOP: u32 = 96;

/// Evenly spaced groups on the x axis, labelled at their centres.
struct Groups(usize);

impl Ranged for Groups {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = (limit.1 - limit.0) as f64;
        limit.0 + (v / self.0 as f64 * span).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }
    fn range(&self) -> Range<f64> {
        0.0..self.0 as f64
    }
}

fn color(mode: &str) -> RGBColor {
    match mode {
        "eager" => RGBColor(230, 126, 34),
        "lazy" => RGBColor(41, 128, 185),
        "native" => RGBColor(127, 140, 141),
        "fuse" => RGBColor(142, 68, 173),
        "eager-image" => RGBColor(243, 180, 120),
        "lazy-image" => RGBColor(133, 193, 233),
        "raw" => RGBColor(22, 160, 133),
        "memcpy" => RGBColor(192, 57, 43),
        "run" => RGBColor(241, 196, 15),
        "fuse-read" => RGBColor(187, 143, 206),
        "run-read" => RGBColor(247, 220, 111),
        _ => RGBColor(39, 174, 96),
    }
}

/// Microseconds, short: "61µs", "219ms", "1.2s".
fn short_us(us: f64) -> String {
    let (v, unit) = if us < 1e3 {
        (us, "µs")
    } else if us < 1e6 {
        (us / 1e3, "ms")
    } else {
        (us / 1e6, "s")
    };
    if v >= 10.0 || v == v.trunc() {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}

/// A log range covering `lo..hi` with some room above for labels.
fn log_span(lo: f64, hi: f64) -> Range<f64> {
    let lo = 10f64.powf(lo.max(0.1).log10().floor());
    let hi = 10f64.powf((hi.max(lo) * 3.0).log10().ceil());
    lo..hi
}

/// The one-line summary of the ratios the targets are stated in.
fn headline(r: &Report) -> String {
    let find = |pat: &str, name: &str| {
        r.ratios
            .iter()
            .find(|x| x.pattern == pat && x.name == name)
            .map(|x| x.value)
    };
    let mut parts = Vec::new();
    if let Some(t) = r.targets.first().and_then(|t| t.measured) {
        parts.push(format!("open {} faster", fmt_ratio(t)));
    }
    if let Some(x) = find("random:0.01", "total_lazy_over_eager") {
        parts.push(format!("random:0.01 total {} faster", fmt_ratio(1.0 / x)));
    }
    if let Some(x) = find("seq", "total_lazy_over_eager") {
        parts.push(format!("seq total {} of eager", fmt_ratio(x)));
    }
    let mut line = String::new();
    if !parts.is_empty() {
        line = format!("lazy vs eager: {}", parts.join(", "));
    }
    if let Some(x) = find("seq", "total_speedup_lazy_vs_fuse") {
        if !line.is_empty() {
            line.push_str("  ·  ");
        }
        line.push_str(&format!("lazy vs fuse2fs: seq {} faster", fmt_ratio(x)));
    }
    line
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

pub fn draw(r: &Report, path: &Path) -> DrawResult<()> {
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let m = &r.machine;
    let title = format!(
        "shadowfd bench: {} file, {} reps ({} CPUs, {}, Linux {})",
        crate::units::format_size(r.config.size),
        r.config.reps,
        m.nproc,
        m.cpu,
        m.kernel
    );
    let (top, rest) = root.split_vertically(TOP);
    top.draw(&Text::new(
        title,
        (20, 12),
        ("sans-serif", 22).into_font().color(&BLACK),
    ))?;
    top.draw(&Text::new(
        headline(r),
        (20, 44),
        ("sans-serif", 15).into_font().color(&RGBColor(60, 60, 60)),
    ))?;
    // The legend: one swatch per mode, in a row under the headline (outside
    // the plot, so it never hides a bar).
    let mut x = 20;
    for mode in r
        .config
        .modes
        .iter()
        .filter(|m| r.rows.iter().any(|x| x.mode == **m))
    {
        top.draw(&Rectangle::new(
            [(x, 72), (x + 14, 86)],
            color(mode).filled(),
        ))?;
        top.draw(&Text::new(
            mode.to_string(),
            (x + 20, 72),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))?;
        x += 40 + 9 * mode.len() as i32;
    }
    let (body, foot) = rest.split_vertically(H - TOP - 28);
    let mut foot_text = "bars: median; whiskers: fastest..slowest rep; total = open + access; \
                         file warm in the page cache for every mode"
        .to_string();
    for s in &r.skipped {
        foot_text.push_str(&format!("  ·  {} skipped: {}", s.mode, s.reason));
    }
    foot.draw(&Text::new(
        foot_text,
        (20, 6),
        ("sans-serif", 12).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    // The open panel needs room for one labelled bar per mode.
    let modes = r.config.modes.len() as u32;
    let split = if modes > 4 { W * 5 / 8 } else { W * 3 / 4 };
    let (left, right) = body.split_horizontally(split);
    draw_totals(r, &left)?;
    draw_open(r, &right)?;
    root.present()?;
    Ok(())
}

fn draw_totals<DB: DrawingBackend>(
    r: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    let patterns = &r.config.patterns;
    let modes: Vec<&str> = r
        .config
        .modes
        .iter()
        .copied()
        .filter(|m| r.rows.iter().any(|x| x.mode == *m))
        .collect();
    if modes.is_empty() {
        return Ok(());
    }
    let lo = r
        .rows
        .iter()
        .map(|x| x.spread.total_us.min)
        .fold(f64::INFINITY, f64::min);
    let hi = r
        .rows
        .iter()
        .map(|x| x.spread.total_us.max)
        .fold(0.0, f64::max);
    let span = log_span(lo, hi);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(
            "total time per access pattern (log scale, lower is better)",
            ("sans-serif", 17),
        )
        .x_label_area_size(40)
        .y_label_area_size(78)
        .build_cartesian_2d(Groups(patterns.len()), span.clone().log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| {
            patterns
                .get(v.floor() as usize)
                .cloned()
                .unwrap_or_default()
        })
        .y_label_formatter(&|v| short_us(*v))
        .y_desc("total time (open + access)")
        .x_desc("access pattern")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .draw()?;
    let group = 0.8;
    let bw = group / modes.len() as f64;
    for (mi, mode) in modes.iter().enumerate() {
        let c = color(mode);
        let rows: Vec<(usize, &super::report::Row)> = patterns
            .iter()
            .enumerate()
            .filter_map(|(pi, p)| {
                r.rows
                    .iter()
                    .find(|x| &x.pattern == p && x.mode == *mode)
                    .map(|x| (pi, x))
            })
            .collect();
        let x0 = |pi: usize| pi as f64 + (1.0 - group) / 2.0 + mi as f64 * bw;
        chart.draw_series(rows.iter().map(|&(pi, x)| {
            let a = x0(pi) + bw * 0.06;
            Rectangle::new([(a, span.start), (a + bw * 0.88, x.total_us)], c.filled())
        }))?;
        // Whiskers: fastest..slowest repetition.
        chart.draw_series(rows.iter().map(|&(pi, x)| {
            let mid = x0(pi) + bw / 2.0;
            let s = &x.spread.total_us;
            PathElement::new(vec![(mid, s.min), (mid, s.max)], BLACK.stroke_width(1))
        }))?;
        for cap in [true, false] {
            chart.draw_series(rows.iter().map(|&(pi, x)| {
                let mid = x0(pi) + bw / 2.0;
                let y = if cap {
                    x.spread.total_us.max
                } else {
                    x.spread.total_us.min
                };
                PathElement::new(
                    vec![(mid - bw * 0.2, y), (mid + bw * 0.2, y)],
                    BLACK.stroke_width(1),
                )
            }))?;
        }
        chart.draw_series(rows.iter().map(|&(pi, x)| {
            let mid = x0(pi) + bw / 2.0;
            let top = x.spread.total_us.max.max(x.total_us) * 1.25;
            value_label(short_us(x.total_us), (mid, top))
        }))?;
    }
    Ok(())
}

/// A small value printed centred above a bar whose top is at `at`.
fn value_label<'a>(text: String, at: (f64, f64)) -> Text<'a, (f64, f64), String> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let style = ("sans-serif", 11)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    Text::new(text, at, style)
}

fn draw_open<DB: DrawingBackend>(
    r: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    // Open does not depend on the pattern: the median over all rows.
    let opens: Vec<(&str, f64, f64, f64)> = r
        .config
        .modes
        .iter()
        .filter_map(|m| {
            let rows: Vec<_> = r.rows.iter().filter(|x| x.mode == *m).collect();
            if rows.is_empty() {
                return None;
            }
            let med = median(&rows.iter().map(|x| x.open_us).collect::<Vec<_>>());
            let lo = rows
                .iter()
                .map(|x| x.spread.open_us.min)
                .fold(f64::INFINITY, f64::min);
            let hi = rows
                .iter()
                .map(|x| x.spread.open_us.max)
                .fold(0.0, f64::max);
            Some((*m, med, lo, hi))
        })
        .collect();
    if opens.is_empty() {
        return Ok(());
    }
    let lo = opens.iter().map(|x| x.2).fold(f64::INFINITY, f64::min);
    let hi = opens.iter().map(|x| x.3).fold(0.0, f64::max);
    let span = log_span(lo, hi);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption("open time per mode", ("sans-serif", 17))
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(Groups(opens.len()), span.clone().log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| {
            opens
                .get(v.floor() as usize)
                .map(|x| x.0.to_string())
                .unwrap_or_default()
        })
        .y_label_formatter(&|v| short_us(*v))
        .x_desc("mode")
        .label_style(("sans-serif", if opens.len() > 4 { 11 } else { 14 }))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .draw()?;
    chart.draw_series(opens.iter().enumerate().map(|(i, x)| {
        Rectangle::new(
            [(i as f64 + 0.15, span.start), (i as f64 + 0.85, x.1)],
            color(x.0).filled(),
        )
    }))?;
    chart.draw_series(opens.iter().enumerate().map(|(i, x)| {
        PathElement::new(
            vec![(i as f64 + 0.5, x.2), (i as f64 + 0.5, x.3)],
            BLACK.stroke_width(1),
        )
    }))?;
    chart.draw_series(
        opens
            .iter()
            .enumerate()
            .map(|(i, x)| value_label(short_us(x.1), (i as f64 + 0.5, x.3.max(x.1) * 1.25))),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_times() {
        assert_eq!(short_us(61.3), "61µs");
        assert_eq!(short_us(5.27), "5.3µs");
        assert_eq!(short_us(218_900.0), "219ms");
        assert_eq!(short_us(1_234_000.0), "1.2s");
    }

    #[test]
    fn log_span_covers_the_data() {
        let s = log_span(23.0, 2_000_000.0);
        assert!(s.start <= 23.0 && s.end >= 2_000_000.0);
        assert_eq!(s.start, 10.0);
    }
}
