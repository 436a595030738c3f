//! The result of a run: the figures `--json` writes (at least `scenario`,
//! `duration_s`, `delivered_per_sec`, `acks_per_sec`, `latency_us`
//! {p50, p90, p99, p999, max}, `gaps`, `duplicates`, `out_of_order`,
//! `errors` and the parameters), the summary printed at the end, and the
//! `--plot` SVG (latency distribution and throughput over time), drawn by
//! hand so the bench needs no plotting library.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::stats::Shared;

/// Everything a run measured.
pub struct BenchResult {
    pub scenario: String,
    pub params: Value,
    pub duration_s: f64,
    pub delivered: u64,
    pub acks: u64,
    pub errors: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
    /// Deliveries and acks per second since the start (warm-up included).
    pub delivered_timeline: Vec<u64>,
    pub ack_timeline: Vec<u64>,
    pub warmup_s: f64,
    pub server_cpu_s: Option<f64>,
    pub server_rss: Option<u64>,
    pub load: (Option<f64>, Option<f64>),
    pub extra: Map<String, Value>,
}

impl BenchResult {
    /// Merges what every task recorded.
    pub fn collect(scenario: &str, params: Value, shared: &Shared, duration: Duration) -> Self {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        let mut ack_latency = latency.clone();
        let (mut gaps, mut duplicates, mut out_of_order) = (0, 0, 0);
        for r in shared.finished.lock().expect("not poisoned").iter() {
            let _ = latency.add(&r.latency);
            let _ = ack_latency.add(&r.ack_latency);
            gaps += r.gaps;
            duplicates += r.duplicates;
            out_of_order += r.out_of_order;
        }
        let timeline = |t: &[std::sync::atomic::AtomicU64]| {
            let mut v: Vec<u64> = t.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            while v.last() == Some(&0) {
                v.pop();
            }
            v
        };
        BenchResult {
            scenario: scenario.to_string(),
            params,
            duration_s: duration.as_secs_f64(),
            delivered: shared.delivered.load(Ordering::Relaxed),
            acks: shared.acks.load(Ordering::Relaxed),
            errors: shared.errors.load(Ordering::Relaxed),
            gaps,
            duplicates,
            out_of_order,
            latency,
            ack_latency,
            delivered_timeline: timeline(&shared.delivered_timeline),
            ack_timeline: timeline(&shared.ack_timeline),
            warmup_s: (shared.measure_from - shared.start).as_secs_f64(),
            server_cpu_s: None,
            server_rss: None,
            load: (None, None),
            extra: Map::new(),
        }
    }

    /// Order violations seen by any receiver.
    pub fn violations(&self) -> u64 {
        self.gaps + self.duplicates + self.out_of_order
    }

    fn percentiles(h: &Histogram<u64>) -> Value {
        if h.is_empty() {
            return Value::Null;
        }
        json!({"p50": h.value_at_quantile(0.5), "p90": h.value_at_quantile(0.9), "p99": h.value_at_quantile(0.99),
               "p999": h.value_at_quantile(0.999), "max": h.max(), "count": h.len()})
    }

    /// The `--json` document.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "scenario": self.scenario,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "delivered": self.delivered,
            "delivered_per_sec": self.delivered as f64 / self.duration_s,
            "acks": self.acks,
            "acks_per_sec": self.acks as f64 / self.duration_s,
            "latency_us": Self::percentiles(&self.latency),
            "ack_latency_us": Self::percentiles(&self.ack_latency),
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "errors": self.errors,
            "params": self.params,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_percent": self.server_cpu_s.map(|s| 100.0 * s / self.duration_s),
            "server_rss_bytes": self.server_rss,
            "loadavg_start": self.load.0,
            "loadavg_end": self.load.1,
            "delivered_timeline": self.delivered_timeline,
            "ack_timeline": self.ack_timeline,
        });
        for (k, x) in &self.extra {
            v[k] = x.clone();
        }
        v
    }
}

/// The summary on stdout.
pub fn print(r: &BenchResult) {
    let j = r.to_json();
    println!("scenario      {} {}", r.scenario, r.params);
    println!("delivered/s   {:.0}", j["delivered_per_sec"].as_f64().unwrap_or(0.0));
    println!("acks/s        {:.0}", j["acks_per_sec"].as_f64().unwrap_or(0.0));
    for (name, h) in [("latency", &r.latency), ("ack latency", &r.ack_latency)] {
        if !h.is_empty() {
            println!(
                "{name:<13} p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max()
            );
        }
    }
    println!(
        "verification  gaps {}  duplicates {}  out of order {}  errors {}",
        r.gaps, r.duplicates, r.out_of_order, r.errors
    );
    if let Some(cpu) = r.server_cpu_s {
        println!("server cpu    {:.1}% of one core", 100.0 * cpu / r.duration_s);
    }
    if let Some(rss) = r.server_rss {
        println!("server rss    {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
    for (k, v) in &r.extra {
        println!("{k:<13} {v}");
    }
    if let (Some(a), Some(b)) = r.load {
        println!("loadavg       {a:.2} -> {b:.2}");
    }
}

/// Two panels: the latency percentile curve, and deliveries/acks per second.
pub fn svg(r: &BenchResult) -> String {
    let (w, h, pad) = (900.0, 300.0, 50.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        2.0 * h + 40.0
    );
    out.push_str(&format!(
        r#"<text x="{pad}" y="20" font-size="14">chat-bench {} {}</text>"#,
        r.scenario,
        xml(&r.params.to_string())
    ));
    // Latency: x = percentile on a "nines" scale, y = latency (log).
    let hist = if r.latency.is_empty() { &r.ack_latency } else { &r.latency };
    if !hist.is_empty() {
        let top = 30.0;
        let qs: Vec<f64> = (0..=200).map(|i| 1.0 - 10f64.powf(-(i as f64) / 50.0)).filter(|q| *q < 1.0).collect();
        let max_nines = 4.0;
        let ymax = (hist.max().max(2) as f64).log10().ceil();
        let x = |q: f64| pad + (-(1.0 - q).log10()).min(max_nines) / max_nines * (w - 2.0 * pad);
        let y = |v: f64| top + (h - 2.0 * pad) * (1.0 - v.max(1.0).log10() / ymax);
        let points: Vec<String> =
            qs.iter().map(|&q| format!("{:.1},{:.1}", x(q), y(hist.value_at_quantile(q) as f64))).collect();
        out.push_str(&axes(pad, top, w - 2.0 * pad, h - 2.0 * pad));
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        ));
        for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("p99.99", 0.9999)] {
            out.push_str(&format!(
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                x(q),
                top + h - 2.0 * pad + 15.0
            ));
        }
        for e in 0..=(ymax as i32) {
            let v = 10f64.powi(e);
            let label = if v >= 1000.0 { format!("{} ms", v / 1000.0) } else { format!("{v} us") };
            out.push_str(&format!(
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
                pad - 4.0,
                y(v) + 4.0
            ));
        }
        let what = if r.latency.is_empty() { "publish→ack latency" } else { "delivery latency" };
        out.push_str(&format!(r#"<text x="{:.1}" y="{:.1}">{what} by percentile</text>"#, pad + 10.0, top + 14.0));
    }
    // Throughput over time.
    let top = h + 20.0;
    let n = r.delivered_timeline.len().max(r.ack_timeline.len()).max(1);
    let ymax = r.delivered_timeline.iter().chain(r.ack_timeline.iter()).copied().max().unwrap_or(1).max(1) as f64;
    let x = |i: usize| pad + (i as f64 + 0.5) / n as f64 * (w - 2.0 * pad);
    let y = |v: u64| top + (h - 2.0 * pad) * (1.0 - v as f64 / ymax);
    out.push_str(&axes(pad, top, w - 2.0 * pad, h - 2.0 * pad));
    for (series, color, label) in
        [(&r.delivered_timeline, "darkorange", "delivered/s"), (&r.ack_timeline, "seagreen", "acks/s")]
    {
        if series.iter().any(|v| *v > 0) {
            let pts: Vec<String> =
                series.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v))).collect();
            out.push_str(&format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            ));
            out.push_str(&format!(
                r#"<text x="{:.1}" y="{:.1}" fill="{color}">{label}</text>"#,
                x(series.len().saturating_sub(1)) - 60.0,
                y(*series.iter().max().unwrap_or(&0)) - 4.0
            ));
        }
    }
    out.push_str(&format!(r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}/s</text>"#, pad - 4.0, top + 4.0, ymax));
    out.push_str(&format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds (warm-up {:.0} s)</text>"#,
        w / 2.0,
        top + h - 2.0 * pad + 15.0,
        r.warmup_s
    ));
    out.push_str("</svg>\n");
    out
}

fn axes(x: f64, y: f64, w: f64, h: f64) -> String {
    format!(r##"<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
