//! The subject's own latency histograms over one phase of `compare`, read from its
//! Prometheus page before and after the phase.
//!
//! Why: on this machine the load generator, the broker and the subject share two cores,
//! so the latency a client sees is the subject's time plus every wait for a core along
//! the way. The subject's own histograms over the same requests separate the two in
//! every run, instead of in one-off experiments. Over the whole run they also count the
//! answers slower than 250 ms (for ingest's acknowledgements: a broker in trouble).
//!
//! Only what is needed to read one histogram from our own exporters' text format
//! (`name_bucket{labels,le="x"} n`): a Prometheus text parser crate would bring a data
//! model for every metric type to read a dozen lines.

use std::net::SocketAddr;

use anyhow::{bail, Context};

use crate::attributor::scrape;

/// Histograms of one subject, watched from the start of a run.
#[derive(Debug)]
pub struct Watch {
    admin: SocketAddr,
    selectors: Vec<String>,
    /// None for a series not exported yet: a labelled series appears with its first
    /// observation, so before the first request there is nothing to read.
    start: Vec<Option<Buckets>>,
}

impl Watch {
    /// Reads `selectors` (see [`buckets`]) from `admin`'s /metrics: the run's start.
    pub async fn start(admin: SocketAddr, selectors: Vec<String>) -> anyhow::Result<Self> {
        let page = scrape(admin).await?;
        let start = selectors
            .iter()
            .map(|s| find(&page, s))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            admin,
            selectors,
            start,
        })
    }

    /// The histograms as they are now, for a later [`Watch::report`].
    pub async fn now(&self) -> anyhow::Result<Vec<Buckets>> {
        read(self.admin, &self.selectors).await
    }

    /// Prints each histogram over the phase since `before` and over the whole run, and
    /// returns the first one's phase p99 for the summary line ("" without requests).
    pub async fn report(&self, name: &str, before: &[Buckets]) -> anyhow::Result<String> {
        let after = self.now().await?;
        let mut summary = None;
        for (((selector, after), before), start) in self
            .selectors
            .iter()
            .zip(&after)
            .zip(before)
            .zip(&self.start)
        {
            let phase = after.since(before)?;
            println!(
                "{name} subject's own {selector} over that phase: {}",
                phase.describe()
            );
            let whole = match start {
                Some(start) => after.since(start)?,
                None => after.clone(),
            };
            println!(
                "{name} subject's own {selector} over the whole run: {}",
                whole.describe()
            );
            summary.get_or_insert_with(|| phase.p99_summary());
        }
        Ok(summary.unwrap_or_default())
    }
}

/// Each of `selectors`' histograms from one scrape of `admin`'s /metrics.
async fn read(admin: SocketAddr, selectors: &[String]) -> anyhow::Result<Vec<Buckets>> {
    let page = scrape(admin).await?;
    selectors.iter().map(|s| buckets(&page, s)).collect()
}

/// A histogram's cumulative buckets: (upper bound in the metric's unit, count ≤ bound),
/// ascending, the last bound `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets(Vec<(f64, u64)>);

/// The buckets of the series that `selector` names on `page`. `selector` is
/// `name{label="value",…}` or a bare `name`; every given label must match exactly, and
/// together they must pick a single series. Label values are taken to hold no commas
/// (true of every label our services export).
pub fn buckets(page: &str, selector: &str) -> anyhow::Result<Buckets> {
    find(page, selector)?.with_context(|| {
        let name = selector.split_once('{').map_or(selector, |(n, _)| n);
        format!("no {name}_bucket series matching {selector:?} on the page")
    })
}

/// As [`buckets`], but Ok(None) when no series matches.
fn find(page: &str, selector: &str) -> anyhow::Result<Option<Buckets>> {
    let (name, wanted) = match selector.split_once('{') {
        Some((n, rest)) => (
            n,
            rest.strip_suffix('}')
                .with_context(|| format!("selector {selector:?}: no closing brace"))?,
        ),
        None => (selector, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    let prefix = format!("{name}_bucket{{");
    let mut found: Vec<(String, f64, u64)> = Vec::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (labels, value) = rest
            .rsplit_once("} ")
            .with_context(|| format!("bucket line {line:?}"))?;
        let labels: Vec<&str> = labels.split(',').collect();
        if !wanted.iter().all(|w| labels.contains(w)) {
            continue;
        }
        let le = labels
            .iter()
            .find_map(|l| l.strip_prefix("le=\""))
            .and_then(|l| l.strip_suffix('"'))
            .with_context(|| format!("bucket line without le: {line:?}"))?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()
                .with_context(|| format!("bucket bound {le:?} in {line:?}"))?
        };
        let count = value
            .trim()
            .parse::<f64>()
            .with_context(|| format!("bucket count in {line:?}"))? as u64;
        let series: Vec<&str> = labels
            .iter()
            .copied()
            .filter(|l| !l.starts_with("le="))
            .collect();
        found.push((series.join(","), bound, count));
    }
    let Some(first) = found.first().map(|f| f.0.clone()) else {
        return Ok(None);
    };
    if let Some(other) = found.iter().find(|f| f.0 != first) {
        bail!(
            "{selector:?} matches more than one series ({{{first}}} and {{{}}}); name its labels",
            other.0
        );
    }
    let mut b: Vec<(f64, u64)> = found.into_iter().map(|(_, le, n)| (le, n)).collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    if b.last().is_none_or(|l| l.0 != f64::INFINITY) {
        bail!("{selector:?} has no +Inf bucket");
    }
    Ok(Some(Buckets(b)))
}

impl Buckets {
    /// What was observed between `before` and `self` (two scrapes of one series).
    pub fn since(&self, before: &Buckets) -> anyhow::Result<Buckets> {
        if self.0.len() != before.0.len() || self.0.iter().zip(&before.0).any(|(a, b)| a.0 != b.0) {
            bail!("the histogram's buckets changed between the two scrapes");
        }
        let mut out = Vec::with_capacity(self.0.len());
        for (a, b) in self.0.iter().zip(&before.0) {
            let n =
                a.1.checked_sub(b.1)
                    .context("a bucket count went down between the scrapes (restart?)")?;
            out.push((a.0, n));
        }
        Ok(Buckets(out))
    }

    pub fn total(&self) -> u64 {
        self.0.last().map_or(0, |l| l.1)
    }

    /// The share of observations at or below the bucket bound `le`; None when `le` is not
    /// one of the bounds or nothing was observed.
    pub fn share_at_most(&self, le: f64) -> Option<f64> {
        let total = self.total();
        let (_, n) = self.0.iter().find(|b| b.0 == le)?;
        (total > 0).then(|| *n as f64 / total as f64)
    }

    /// `requests, p99 in (a, b] ms`, then the shares at or below 5 and 10 ms and the count
    /// above 250 ms, for those of these bounds the histogram has.
    pub fn describe(&self) -> String {
        let p99 = self
            .quantile_bucket(0.99)
            .map_or("no requests".into(), |(lo, hi)| {
                format!("p99 in ({}, {}] ms", ms(lo), ms(hi))
            });
        let mut out = format!("{} requests, {p99}", self.total());
        for le in [0.005, 0.01] {
            if let Some(s) = self.share_at_most(le) {
                out += &format!(", {:.2}% <= {} ms", s * 100.0, ms(le));
            }
        }
        if let Some((_, n)) = self.0.iter().find(|b| b.0 == 0.25) {
            out += &format!(", {} over 250 ms", self.total() - n);
        }
        out
    }

    /// `server-side p99 <= b ms; ` for the summary line, or nothing without requests.
    pub fn p99_summary(&self) -> String {
        self.quantile_bucket(0.99).map_or(String::new(), |(_, hi)| {
            format!("server-side p99 <= {} ms; ", ms(hi))
        })
    }

    /// The bucket `(lower, upper]` that holds quantile `q`: all a histogram can say.
    pub fn quantile_bucket(&self, q: f64) -> Option<(f64, f64)> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut lower = 0.0;
        for &(le, n) in &self.0 {
            if n >= rank {
                return Some((lower, le));
            }
            lower = le;
        }
        None
    }
}

/// Milliseconds of a bucket bound given in seconds.
fn ms(secs: f64) -> String {
    if secs.is_finite() {
        // Rounded to a microsecond: 0.025 s is not 25.000000000000004 ms.
        format!("{}", (secs * 1e6).round() / 1e3)
    } else {
        "+Inf".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP x_seconds Request latency.
# TYPE x_seconds histogram
x_seconds_bucket{route="/a",le="0.005"} 90
x_seconds_bucket{route="/a",le="0.01"} 99
x_seconds_bucket{route="/a",le="+Inf"} 100
x_seconds_sum{route="/a"} 0.5
x_seconds_count{route="/a"} 100
x_seconds_bucket{route="/b",le="0.005"} 1
x_seconds_bucket{route="/b",le="0.01"} 1
x_seconds_bucket{route="/b",le="+Inf"} 1
"#;

    #[test]
    fn reads_one_series_and_its_quantile_bucket() -> anyhow::Result<()> {
        let b = buckets(PAGE, r#"x_seconds{route="/a"}"#)?;
        assert_eq!(b.total(), 100);
        assert_eq!(b.share_at_most(0.005), Some(0.9));
        assert_eq!(b.share_at_most(0.007), None, "not a bound");
        assert_eq!(b.quantile_bucket(0.5), Some((0.0, 0.005)));
        assert_eq!(b.quantile_bucket(0.99), Some((0.005, 0.01)));
        assert_eq!(b.quantile_bucket(0.999), Some((0.01, f64::INFINITY)));
        Ok(())
    }

    #[test]
    fn a_phase_is_the_difference_of_two_scrapes() -> anyhow::Result<()> {
        let before = buckets(PAGE, r#"x_seconds{route="/a"}"#)?;
        let later = PAGE.replace("} 90", "} 1090").replace("} 99\n", "} 1099\n");
        let later = later.replace(r#""+Inf"} 100"#, r#""+Inf"} 1100"#);
        let phase = buckets(&later, r#"x_seconds{route="/a"}"#)?.since(&before)?;
        assert_eq!(phase.total(), 1000);
        assert_eq!(phase.share_at_most(0.005), Some(1.0));
        assert_eq!(phase.quantile_bucket(0.99), Some((0.0, 0.005)));
        assert!(before.since(&phase).is_err(), "counts went down: refused");
        Ok(())
    }

    /// The error text of a call that must fail.
    fn error_of(r: anyhow::Result<Buckets>) -> String {
        match r {
            Ok(b) => panic!("expected an error, got {b:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_ambiguous_or_missing_selector_is_an_error_that_says_so() {
        let e = error_of(buckets(PAGE, "x_seconds"));
        assert!(e.contains("more than one series"), "{e}");
        let e = error_of(buckets(PAGE, r#"x_seconds{route="/c"}"#));
        assert!(e.contains("no x_seconds_bucket"), "{e}");
        let e = error_of(buckets(PAGE, r#"x_seconds{route="/a""#));
        assert!(e.contains("no closing brace"), "{e}");
        let e = error_of(buckets("y_bucket{le=\"1\"} 3\n", "y"));
        assert!(e.contains("+Inf"), "{e}");
    }

    #[test]
    fn own_histogram_lines_name_bucket_bounds_in_milliseconds() -> anyhow::Result<()> {
        let page =
            "h_bucket{le=\"0.0025\"} 10\nh_bucket{le=\"0.025\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        let phase = buckets(page, "h")?;
        assert_eq!(
            phase.describe(),
            "100 requests, p99 in (2.5, 25] ms",
            "no 5, 10 or 250 ms bound here, so no figure for them"
        );
        assert_eq!(phase.p99_summary(), "server-side p99 <= 25 ms; ");
        assert_eq!(ms(f64::INFINITY), "+Inf");
        assert_eq!(phase.since(&phase)?.p99_summary(), "");
        Ok(())
    }

    #[test]
    fn the_count_above_250_ms_is_what_the_slowest_buckets_hold() -> anyhow::Result<()> {
        let page = "h_bucket{le=\"0.005\"} 90\nh_bucket{le=\"0.01\"} 95\nh_bucket{le=\"0.25\"} 97\nh_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(
            buckets(page, "h")?.describe(),
            "100 requests, p99 in (250, +Inf] ms, 90.00% <= 5 ms, 95.00% <= 10 ms, 3 over 250 ms"
        );
        Ok(())
    }

    #[test]
    fn nothing_observed_has_no_quantile() -> anyhow::Result<()> {
        let b = buckets(PAGE, r#"x_seconds{route="/a"}"#)?;
        // Before its first observation a labelled series is not on the page at all.
        assert_eq!(find(PAGE, r#"x_seconds{route="/c"}"#)?, None);
        let none = b.since(&b)?;
        assert_eq!(none.total(), 0);
        assert_eq!(none.quantile_bucket(0.99), None);
        assert_eq!(none.share_at_most(0.01), None);
        Ok(())
    }
}
