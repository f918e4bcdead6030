//! `vmig verify --report FILE.html`: the verify report as one self-contained
//! page (no scripts, no external files), with recall@k of both sides drawn
//! as an inline SVG chart: people would rather look at a curve than read a
//! table. The same report as JSON is embedded for machines.

use std::fmt::Write;

use crate::engine::recall::RecallReport;
use crate::engine::verify::{SampleReport, VerifyReport};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn row(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(name), esc(value));
}

/// Recall@k of both sides as polylines over k (evenly spaced), y from 0 to 1.
fn chart(r: &RecallReport) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 320.0, 56.0, 40.0, 20.0, 120.0);
    let n = r.source.curve.len().max(1);
    let x = |i: usize| left + (w - left - right) * if n == 1 { 0.5 } else { i as f64 / (n - 1) as f64 };
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v.clamp(0.0, 1.0));
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="recall at k">"#
    );
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{t:.2}</text>"##,
            w - right,
            left - 6.0,
            y(t) + 4.0,
            yy = y(t)
        );
    }
    for (i, (k, _)) in r.source.curve.iter().enumerate() {
        let _ = write!(svg, r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">k={k}</text>"#, x(i), h - bottom + 18.0);
    }
    // The target dashed over the source: equal curves stay both visible.
    for (name, side, colour, dash) in [("source", &r.source, "#1f77b4", "none"), ("target", &r.target, "#d62728", "6 4")] {
        let points: Vec<String> = side.curve.iter().enumerate().map(|(i, (_, v))| format!("{:.1},{:.1}", x(i), y(*v))).collect();
        let _ = write!(
            svg,
            r#"<polyline class="{name}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" points="{}"/>"#,
            points.join(" ")
        );
        for (i, (k, v)) in side.curve.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{name} recall@{k} = {v:.4}</title></circle>"#,
                x(i),
                y(*v)
            );
        }
        let ly = if name == "source" { top + 10.0 } else { top + 28.0 };
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{colour}"/><text x="{}" y="{}" font-size="12">{name} {:.4}</text>"#,
            w - right + 12.0,
            ly - 4.0,
            w - right + 30.0,
            ly,
            side.recall
        );
    }
    svg.push_str("</svg>");
    svg
}

pub fn render(rows: Option<&VerifyReport>, sample: Option<&SampleReport>, recall: Option<&RecallReport>, passed: bool, json: &str) -> String {
    let mut body = String::new();
    let verdict = if passed { "PASSED" } else { "FAILED" };
    let _ = writeln!(body, r#"<h1>vmig verify: <span class="{}">{verdict}</span></h1>"#, verdict.to_lowercase());
    if let Some(r) = rows {
        let _ = writeln!(body, "<h2>Rows</h2><table>");
        row(&mut body, "source", &r.source);
        row(&mut body, "target", &r.target);
        row(&mut body, "rows", &format!("source {} · target {}", r.source_rows, r.target_rows));
        row(&mut body, "chunks", &format!("{} compared by count and content hash, {} differ", r.chunks, r.differing_chunks.len()));
        row(&mut body, "vectors", &r.vector_comparison);
        row(&mut body, "timestamps", &r.timestamp_comparison);
        for n in &r.not_compared {
            row(&mut body, "not compared", n);
        }
        body.push_str("</table>\n");
        if !r.differing_chunks.is_empty() {
            body.push_str("<h3>Differing chunks</h3><ul>");
            for d in &r.differing_chunks {
                let _ = write!(body, "<li>{}</li>", esc(&d.describe()));
            }
            body.push_str("</ul>\n");
        }
    }
    if let Some(s) = sample {
        let _ = writeln!(body, "<h2>Sample</h2><table>");
        row(&mut body, "source", &s.source);
        row(&mut body, "target", &s.target);
        row(&mut body, "rows", &format!("source {} · target {}", s.source_rows, s.target_rows));
        row(&mut body, "sampled", &format!("{} (seed {})", s.sampled, s.seed));
        row(&mut body, "result", &s.statement());
        for n in &s.not_compared {
            row(&mut body, "not compared", n);
        }
        body.push_str("</table>\n");
    }
    if let Some(r) = recall {
        let _ = writeln!(body, "<h2>Recall@{}</h2>", r.k);
        let _ = writeln!(body, r#"<p class="statement">{}</p>"#, esc(&r.statement()));
        body.push_str(&chart(r));
        body.push_str("<table><tr><th>k</th><th>source recall</th><th>target recall</th></tr>");
        for ((k, s), (_, t)) in r.source.curve.iter().zip(&r.target.curve) {
            let _ = write!(body, "<tr><td>{k}</td><td>{s:.4}</td><td>{t:.4}</td></tr>");
        }
        body.push_str("</table><table>");
        row(&mut body, "metric", &r.metric);
        row(&mut body, "search breadth", &format!("{} ({})", r.ef, r.ef_from));
        row(&mut body, "queries", &format!("{} sampled from the source, noise {}", r.queries, r.noise));
        row(&mut body, "exact top-K", &r.exact);
        row(&mut body, "source search", &format!("{} · p50 {:.1} ms · p99 {:.1} ms", r.source.search, r.source.latency_p50_ms, r.source.latency_p99_ms));
        row(&mut body, "target search", &format!("{} · p50 {:.1} ms · p99 {:.1} ms", r.target.search, r.target.latency_p50_ms, r.target.latency_p99_ms));
        body.push_str("</table>\n");
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vmig verify report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }}
.passed {{ color: #2a7d2a; }} .failed {{ color: #b00020; }}
</style></head><body>
{body}<script type="application/json" id="vmig-report">{}</script>
</body></html>
"#,
        json.replace("</", "<\\/")
    )
}
