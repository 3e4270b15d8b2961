//! A strict reader of the Prometheus text exposition format (version 0.0.4), for tests: it
//! refuses what Prometheus' own parser refuses (bad names, bad escapes, unparsable values, a
//! family's TYPE after its samples or twice, a family's samples split by another's, the same
//! series twice) and what makes a family meaningless (a counter below 0, histogram buckets that
//! are not cumulative or whose +Inf bucket is not the count).
use std::collections::{BTreeMap, BTreeSet};

/// Labels in the order written.
pub type Labels = Vec<(String, String)>;
/// One sample: metric name, labels and value.
pub type Sample = (String, Labels, f64);

/// The samples of `text`, or what is wrong with it (with the line).
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = BTreeSet::new();
    // Families whose samples ended (another family's began).
    let mut closed = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kw != "HELP" && kw != "TYPE" {
                continue;
            }
            if !metric_name(name) {
                return Err(err("bad metric name"));
            }
            if closed.contains(name) || current.as_deref() == Some(name) {
                return Err(err("HELP/TYPE after the family's samples"));
            }
            if kw == "HELP" && !helps.insert(name.to_string()) {
                return Err(err("second HELP"));
            }
            if kw == "TYPE" {
                let t = parts.next().unwrap_or("");
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                    return Err(err("unknown type"));
                }
                if types.insert(name.to_string(), t.to_string()).is_some() {
                    return Err(err("second TYPE"));
                }
            }
            continue;
        }
        let (name, labels, value) = sample_line(line).map_err(|e| err(&e))?;
        let family = family_of(&name, &types);
        if current.as_deref() != Some(family.as_str()) {
            if closed.contains(&family) {
                return Err(err("the family's samples are split by another family's"));
            }
            if let Some(c) = current.replace(family.clone()) {
                closed.insert(c);
            }
        }
        let mut key: Vec<_> = labels.clone();
        key.sort();
        if !series.insert((name.clone(), key)) {
            return Err(err("the same series twice"));
        }
        if types.get(&family).is_some_and(|t| t == "counter") && (value < 0.0 || name != family) {
            return Err(err("a counter's sample must be named as its family and not below 0"));
        }
        out.push((name, labels, value));
    }
    check_histograms(&out, &types)?;
    Ok(out)
}

/// The value of the sample `name` with exactly these labels (in any order).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    samples.iter().find_map(|(n, l, v)| {
        let mut l = l.clone();
        l.sort();
        (n == name && l == want).then_some(*v)
    })
}

fn metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn label_name(s: &str) -> bool {
    metric_name(s) && !s.contains(':')
}

/// The family a sample belongs to: its name, or for a histogram's series the name without
/// `_bucket`, `_sum` or `_count`.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram" || t == "summary") {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

fn sample_line(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !metric_name(name) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = &rest[..eq];
            if !label_name(lname) || labels.iter().any(|(k, _): &(String, String)| k == lname) {
                return Err(format!("bad or repeated label name {lname:?}"));
            }
            let (value, after) = label_value(rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?)?;
            labels.push((lname.to_string(), value));
            rest = after.strip_prefix(',').unwrap_or(after);
            if !after.starts_with(',') && !after.starts_with('}') {
                return Err("expected , or }".into());
            }
        }
    }
    let mut fields = rest.strip_prefix(' ').ok_or("no space before the value")?.split(' ');
    let v = fields.next().ok_or("no value")?;
    let value = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok((name.to_string(), labels, value))
}

/// A quoted label value's text (escapes resolved) and what follows its closing quote.
fn label_value(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape \\{other:?}")),
            },
            '\n' => return Err("newline in a label value".into()),
            c => out.push(c),
        }
    }
    Err("unterminated label value".into())
}

/// Every histogram: buckets cumulative in increasing `le`, the +Inf bucket equal to `_count`.
fn check_histograms(samples: &[Sample], types: &BTreeMap<String, String>) -> Result<(), String> {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        // Per label set (without le): (le, count) of each bucket.
        let mut buckets: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for (name, labels, v) in samples.iter().filter(|(n, _, _)| *n == format!("{family}_bucket")) {
            let le = labels.iter().find(|(k, _)| k == "le").ok_or(format!("{name} without le"))?;
            let le: f64 = if le.1 == "+Inf" { f64::INFINITY } else { le.1.parse().map_err(|_| format!("{name}: bad le {:?}", le.1))? };
            let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            buckets.entry(rest).or_default().push((le, *v));
        }
        for (labels, b) in buckets {
            if b.windows(2).any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1) {
                return Err(format!("{family}{labels:?}: buckets not increasing and cumulative: {b:?}"));
            }
            let count =
                value(samples, &format!("{family}_count"), &labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
            if b.last().map(|l| l.0) != Some(f64::INFINITY) || count != b.last().map(|l| l.1) {
                return Err(format!("{family}{labels:?}: the +Inf bucket must be there and equal _count"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_prometheus_refuses_is_refused() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\ng NaN\n";
        let s = parse(good).unwrap();
        assert_eq!(value(&s, "a_total", &[("y", "q\"\\\n"), ("x", "1")]), Some(3.0));
        for bad in [
            "a b\n",
            "a{x=1} 1\n",
            "a{x=\"1\"} 1\na{x=\"1\"} 2\n",
            "a 1\nb 1\na 2\n",
            "a 1\n# TYPE a gauge\n",
            "# TYPE a counter\na -1\n",
            "a{x=\"\\t\"} 1\n",
            "1a 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n",
            "# TYPE a foo\n",
            "a{x=\"1\",x=\"2\"} 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad:?}");
        }
    }
}
