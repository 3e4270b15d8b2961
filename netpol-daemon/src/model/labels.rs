//! Labels and label selectors (matchLabels + matchExpressions), validated at parse time.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// An object's labels, by key.
pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

/// All requirements must hold. No requirements selects everything (`{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::In(vals) => v.is_some_and(|v| vals.contains(v)),
                // NotIn also matches objects without the key.
                Op::NotIn(vals) => v.is_none_or(|v| !vals.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }

    /// Parses an API selector; on error returns (sub-path, message).
    pub fn from_k8s(s: &LabelSelector) -> Result<Selector, (String, String)> {
        let mut requirements = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            let field = format!(".matchLabels[{k:?}]");
            validate_key(k).map_err(|m| (field.clone(), m))?;
            validate_value(v).map_err(|m| (field.clone(), m))?;
            requirements.push(Requirement { key: k.clone(), op: Op::In(vec![v.clone()]) });
        }
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let field = format!(".matchExpressions[{i}]");
            validate_key(&e.key).map_err(|m| (format!("{field}.key"), m))?;
            let values = e.values.clone().unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                validate_value(v).map_err(|m| (format!("{field}.values[{j}]"), m))?;
            }
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err((format!("{field}.values"), format!("must be non-empty for operator {}", e.operator)))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err((format!("{field}.values"), format!("must be empty for operator {}", e.operator)))
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err((
                        format!("{field}.operator"),
                        format!("unknown operator {other:?} (want In, NotIn, Exists or DoesNotExist)"),
                    ))
                }
            };
            requirements.push(Requirement { key: e.key.clone(), op });
        }
        Ok(Selector { requirements })
    }
}

fn name_part_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label key: optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
pub fn validate_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("invalid label key {k:?}: prefix must be a DNS subdomain"));
        }
    }
    if !name_part_ok(name) {
        return Err(format!("invalid label key {k:?}: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"));
    }
    Ok(())
}

pub fn validate_value(v: &str) -> Result<(), String> {
    if v.is_empty() || name_part_ok(v) {
        Ok(())
    } else {
        Err(format!("invalid label value {v:?}: at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"))
    }
}
