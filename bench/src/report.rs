//! Results: rows of figure / baseline / ratio / target, printed as a table or as JSON.
use serde::Serialize;

/// One measured figure beside its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub baseline_name: Option<String>,
    pub baseline: Option<f64>,
    /// value ÷ baseline.
    pub ratio: Option<f64>,
    pub target: Option<String>,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(scenario: &str, metric: &str, value: f64, unit: &str) -> Self {
        Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline_name: None,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub fn baseline(mut self, name: &str, value: f64) -> Self {
        self.baseline_name = Some(name.to_owned());
        self.baseline = Some(value);
        self.ratio = (value != 0.0).then(|| self.value / value);
        self
    }

    pub fn target(mut self, text: &str, met: bool) -> Self {
        self.target = Some(text.to_owned());
        self.met = Some(met);
        self
    }
}

/// CPU use during one scenario: percent of one core per process, and the machine's busy %.
#[derive(Debug, Clone, Serialize)]
pub struct CpuRow {
    pub scenario: String,
    pub usage: Vec<(String, f64)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub rows: Vec<Row>,
    pub cpu: Vec<CpuRow>,
    pub notes: Vec<String>,
    /// Answers that were not 2xx, by scenario and status (every scenario has a row).
    pub non_2xx: Vec<StatusRow>,
    pub failed_scenarios: Vec<String>,
}

/// The non-2xx answers one scenario got, by status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub scenario: String,
    pub statuses: std::collections::BTreeMap<u16, u64>,
}

impl StatusRow {
    /// Why the run fails because of this scenario's answers: any 5xx.
    pub fn failure(&self) -> Option<String> {
        let server_errors: u64 = self
            .statuses
            .iter()
            .filter(|(status, _)| **status >= 500)
            .map(|(_, n)| n)
            .sum();
        (server_errors > 0).then(|| {
            format!(
                "{}: {server_errors} answer(s) 5xx ({})",
                self.scenario,
                self.text()
            )
        })
    }

    fn text(&self) -> String {
        if self.statuses.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status}×{n}"))
            .collect();
        parts.join(", ")
    }
}

impl Report {
    pub fn push(&mut self, row: Row) {
        eprintln!(
            "  => {} {}: {} {}{}",
            row.scenario,
            row.metric,
            fmt_num(row.value),
            row.unit,
            row.ratio
                .map(|r| format!(
                    " ({:.2}× {})",
                    r,
                    row.baseline_name.as_deref().unwrap_or("")
                ))
                .unwrap_or_default()
        );
        self.rows.push(row);
    }

    pub fn note(&mut self, text: String) {
        eprintln!("  note: {text}");
        self.notes.push(text);
    }

    pub fn print_table(&self) {
        let header = [
            "scenario",
            "metric",
            "value",
            "baseline",
            "base value",
            "ratio",
            "target",
            "met",
        ];
        let mut lines: Vec<[String; 8]> = Vec::new();
        for r in &self.rows {
            lines.push([
                r.scenario.clone(),
                r.metric.clone(),
                format!("{} {}", fmt_num(r.value), r.unit),
                r.baseline_name.clone().unwrap_or_default(),
                r.baseline.map(fmt_num).unwrap_or_default(),
                r.ratio.map(|x| format!("{x:.3}")).unwrap_or_default(),
                r.target.clone().unwrap_or_default(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => String::new(),
                },
            ]);
        }
        let mut widths = header.map(str::len);
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let row = |cells: Vec<String>| {
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(widths.iter()) {
                s.push_str(&format!(" {c:<w$} |"));
            }
            s
        };
        println!("{}", row(header.iter().map(|s| (*s).to_owned()).collect()));
        println!(
            "|{}",
            widths
                .iter()
                .map(|w| format!("{}|", "-".repeat(w + 2)))
                .collect::<String>()
        );
        for l in lines {
            println!("{}", row(l.to_vec()));
        }
        if !self.cpu.is_empty() {
            println!();
            println!(
                "CPU (% of one core; 200% = both cores; machine_busy = % of the whole machine, every process):"
            );
            for c in &self.cpu {
                let parts: Vec<String> = c
                    .usage
                    .iter()
                    .map(|(n, p)| format!("{n} {p:.0}%"))
                    .collect();
                println!("  {:<12} {}", c.scenario, parts.join(", "));
            }
        }
        if !self.non_2xx.is_empty() {
            println!();
            println!("Answers that were not 2xx (any 5xx fails the run):");
            for r in &self.non_2xx {
                println!("  {:<12} {}", r.scenario, r.text());
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        for f in &self.failed_scenarios {
            println!("FAILED: {f}");
        }
    }
}

pub fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{count_status, take_non_2xx};

    #[test]
    fn non_2xx_answers_are_counted_by_status_and_any_5xx_fails_the_scenario() {
        for status in [200, 202, 204, 404, 429, 429, 503] {
            count_status(status);
        }
        let row = StatusRow {
            scenario: "ingest".into(),
            statuses: take_non_2xx(),
        };
        assert_eq!(
            row.statuses.clone().into_iter().collect::<Vec<_>>(),
            [(404, 1), (429, 2), (503, 1)]
        );
        assert_eq!(
            row.failure().as_deref(),
            Some("ingest: 1 answer(s) 5xx (404×1, 429×2, 503×1)")
        );
        let refused_only = StatusRow {
            scenario: "reads".into(),
            statuses: [(429, 7)].into(),
        };
        assert_eq!(refused_only.failure(), None);
        assert!(take_non_2xx().is_empty(), "taking the counts resets them");
    }
}
